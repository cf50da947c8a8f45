# Seedling image: the HTTP server (default command) and the training jobs (`seedling-train ...`).
#
#   docker build --network host -t seedling .                                   # CPU torch (default)
#   docker build --network host -t seedling:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .         # CUDA torch
#   docker run --rm --network host -v seedling-data:/data -e SEEDLING_API_KEYS=change-me seedling   # :8000
#
# The server binds 0.0.0.0 here, so it refuses to start without a key: SEEDLING_API_KEYS, a key file
# (SEEDLING_API_KEYS_FILE, or a Docker secret named seedling_api_keys, read from /run/secrets), or
# SEEDLING_ALLOW_UNAUTHENTICATED=1 to serve without authentication on purpose (docs/security.md).
#
# Python is installed by .ci/setup.sh, the same script as the README quick start and CI, so a green
# CI run proves this image's Python set-up. No weights and no secrets are baked in: checkpoints live
# in the /data volume (SEEDLING_HOME) and every setting is a SEEDLING_* environment variable.

ARG BASE_IMAGE=debian:bookworm-slim
# the runtime stage's base (default: the same); its / must be world-traversable (mode 0755)
ARG RUNTIME_IMAGE=${BASE_IMAGE}

# ---- build: a virtual environment in /opt/venv, made by .ci/setup.sh ---------------------------
FROM ${BASE_IMAGE} AS build
# TORCH_INDEX: the wheel index for torch. The CPU index gives a small CPU-only image; a CUDA index
# (e.g. https://download.pytorch.org/whl/cu128) gives an image that uses the GPU with no code change;
# empty means PyPI (whose Linux torch wheels bundle CUDA libraries: large, but run on CPU too).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
# PIP_FIND_LINKS: an optional local wheel directory/URL (air-gapped builds; see docs/troubleshooting.md)
ARG PIP_FIND_LINKS=
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PIP_FIND_LINKS=${PIP_FIND_LINKS} \
    VENV=/opt/venv \
    TORCH_INDEX=${TORCH_INDEX} \
    TORCH_SPEC=${TORCH_SPEC}
# Debian's python3 is pinned by the bookworm release itself. g++ builds the native CPU kernels
# (SEEDLING_QUANTIZE=q4) in this stage, so the runtime image needs no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/seedling
# 1. dependencies first (torch and the rest; cached until pyproject.toml or setup.sh change):
#    setup.sh on the project metadata alone, with empty packages and README.
COPY pyproject.toml ./
COPY .ci/setup.sh .ci/setup.sh
RUN mkdir model training app && touch README.md && .ci/setup.sh
# 2. the code (the .dockerignore allow-list: pyproject.toml, README.md, .ci/setup.sh, model/,
#    training/, app/), then the same script again (dependencies satisfied: installs the project)
COPY . .
RUN .ci/setup.sh && rm -rf ./*.egg-info/ .ci/ \
    && SEEDLING_NATIVE_DIR=/opt/seedling/native /opt/venv/bin/python -m model.native \
    && find /opt/venv /opt/seedling -name __pycache__ -prune -exec rm -rf {} +

# ---- runtime: python3, the venv and the code; runs as a non-root user -------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# Metadata first and the big layer (venv + code) last: each later instruction would otherwise
# snapshot the whole image again on storage drivers without copy-on-write (vfs).
# Settings: SEEDLING_* variables (docs/configuration.md); only the container-specific ones here.
# NVIDIA_*: read by the NVIDIA container toolkit when the CUDA build runs with a GPU reservation.
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/seedling \
    SEEDLING_HOME=/data \
    SEEDLING_HOST=0.0.0.0 \
    SEEDLING_PORT=8000 \
    SEEDLING_NATIVE_DIR=/opt/seedling/native \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-log-init --create-home --home-dir /home/seedling \
       --shell /usr/sbin/nologin seedling \
    && mkdir -p /data \
    && chown seedling:seedling /data
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# /ready is 503 until the model is loaded and warm, and while draining after SIGTERM.
# The first start may download the default model, hence the long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('SEEDLING_PORT', '8000'), timeout=4)"]
# SIGTERM reaches the server directly (exec-form CMD, python is PID 1): it stops admitting new
# requests, drains in-flight ones for up to SEEDLING_DRAIN_TIMEOUT_S, then exits.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
USER 10001:10001
# /opt holds only the venv and the code (root-owned: read-only to the server). The venv's editable
# install points at /opt/seedling, so both keep their paths.
COPY --from=build /opt /opt
