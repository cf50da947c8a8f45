#!/usr/bin/env bash
# One install script for every place Seedling runs: the README quick start, CI and the Dockerfile.
#   .ci/setup.sh            runtime install into $VENV (default .venv)
#   .ci/setup.sh --dev      runtime + test/dev tools (pytest, transformers, openai, ...)
# Environment:
#   VENV=path               where the virtual environment lives ("none" installs into the current python)
#   TORCH_SPEC=...          torch requirement (default torch==2.13.0, the CPU wheel). For CUDA use e.g.
#                           TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
VENV=${VENV:-.venv}
if [ "$VENV" = "none" ]; then
  py=python3
else
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  py="$VENV/bin/python"
fi
pip=("$py" -m pip install --disable-pip-version-check -q)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ -n "${TORCH_INDEX:-}" ]; then
  "${pip[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX"
else
  "${pip[@]}" "$TORCH_SPEC"
fi
"${pip[@]}" -e ".${extras}"
echo "setup: $("$py" -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")')"
