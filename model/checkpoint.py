"""Checkpoints: one self-describing directory, written only by this module.

    save_checkpoint(path, model, tokenizer, meta={"step": 1000, "labels": {"sentiment": ["pos", "neg"]}})
    ckpt = load_checkpoint(path, device="cpu", dtype=torch.float32)   # ckpt.model (eval), .tokenizer, ...

Layout (Hugging Face compatible, so `transformers` loads the directory unchanged):
    config.json            HF LlamaConfig keys (ModelConfig.to_hf)
    model.safetensors      HF tensor names ("model." + our module name; lm_head dropped when tied)
    tokenizer.model | tokenizer.json, tokenizer_config.json
    seedling.json          our metadata: format version, name, step, data, labels per task, metrics, source

Saving never changes a checkpoint in place: `path` is a symlink to one immutable version in
`path.versions/`, and a save writes a new version, then swaps the symlink with one atomic rename
(model/versioned.py says how a kill -9 at any moment is recovered). Loading first recovers, then reads
every file from the one version the link points at. It never unpickles and turns every problem into a
one-line CheckpointError saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import versioned
from model.config import ConfigError, ModelConfig
from model.tokenizer import Tokenizer, TokenizerError
from model.transformer import Transformer

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, META_FILE = "config.json", "model.safetensors", "seedling.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message is one line and says what to do."""


DEFAULT = "default"  # the converted SmolLM2-135M-Instruct, fetched on first use (model/convert.py)


def resolve_checkpoint(spec: str | Path | None) -> Path:
    """The one reading of a checkpoint argument: None, '' or 'default' -> the default model (fetched
    and converted on first use); anything else is a directory that must exist."""
    if spec is None or str(spec) in ("", DEFAULT):
        from model.convert import ensure_default_model  # heavy (network, conversion); only when needed

        return Path(ensure_default_model())
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (a checkpoint directory, or {DEFAULT!r})")
    return path


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    meta: dict[str, Any]
    path: Path


# ------------------------------------------------------------------------------- tensor names
def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict under HF Llama names, contiguous and detached (safetensors refuses shared storage)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if model.config.tie_embeddings:
                continue
            out[name] = t
        else:
            out["model." + name] = t
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a model of `config` (no tied lm_head), without allocating weights."""
    with torch.device("meta"):
        model = Transformer(config)
    return {k: tuple(v.shape) for k, v in to_hf_state_dict(model).items()}


# ------------------------------------------------------------------------------- save
def save_checkpoint(directory: str | Path, model: Transformer, tokenizer: Tokenizer,
                    meta: dict[str, Any] | None = None, *, version: str | None = None, publish: bool = True,
                    keep: int | None = 1) -> Path:
    """Write the checkpoint as a new immutable version of `directory` and, with `publish`, point
    `directory` (a symlink) at it atomically; the version it replaces is never modified.

    version: the version dir's name in `<directory>.versions/` (e.g. "step_00000100"; default a UTC
        time stamp; "-2", "-3", ... is appended rather than overwrite an existing one).
    publish: False writes an intermediate checkpoint that nothing loads by default.
    keep: afterwards delete all versions but the published one and the `keep` newest others
        (None: delete nothing).
    Returns `directory` when published, else the version dir."""
    link = versioned.absolute(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}; build the model with vocab_size >= the tokenizer's")
    staged = versioned.stage(link)
    try:
        _write_files(staged.path, link.name, model, tokenizer, meta)
        written = versioned.commit(staged, version or versioned.version_name())
        if publish:
            versioned.publish(link, written)
    finally:
        versioned.release(staged)
    if keep is not None:
        versioned.prune(link, keep)
    return link if publish else written


def _write_files(directory: Path, name: str, model: Transformer, tokenizer: Tokenizer,
                 meta: dict[str, Any] | None) -> None:
    """The checkpoint's files; meta "name" (the model id a server lists) defaults to the published
    path's name, as the directory the server is given is a symlink to a version with another name."""
    from safetensors.torch import save_file

    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.cpu() for k, v in to_hf_state_dict(model).items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})
    tokenizer.save(directory)
    full_meta = {"format_version": FORMAT_VERSION, "name": name, "step": None, "data": None, "labels": {},
                 "metrics": {}, "source": None, **(meta or {})}
    (directory / META_FILE).write_text(json.dumps(full_meta, indent=2, ensure_ascii=False, default=str))


def recover_checkpoint(directory: str | Path) -> Path | None:
    """Clean up after a save that was killed at `directory` (see model.versioned): the path to load,
    or None when there is no checkpoint there at all."""
    return versioned.recover(directory)


# ------------------------------------------------------------------------------- load
def read_meta(directory: str | Path) -> dict[str, Any]:
    """seedling.json of a checkpoint ({} for a plain HF directory without one)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it or re-save the checkpoint") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object; re-save the checkpoint")
    return meta


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a checkpoint needs config.json (re-save or re-convert it)")
    try:
        return ModelConfig.from_hf(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        kind = "invalid" if isinstance(e, ConfigError) else "not valid JSON"
        raise CheckpointError(f"{path} is {kind}: {e}".replace("\n", " ")) from e


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing; re-save or re-convert the checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({msg}); re-save or re-convert the "
                              "checkpoint") from e


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load and validate a checkpoint directory; the model is in eval mode on `device` in `dtype`."""
    path = Path(directory)
    found = versioned.recover(path)
    if found is None:
        raise CheckpointError(f"checkpoint directory {path} does not exist; run `python -m model.convert "
                              "default` or pass the directory a training job wrote")
    with versioned.reading(found) as real:  # every file from the one version the link points at now
        return _load_files(real, path, device, dtype)


def _load_files(real: Path, path: Path, device: str | torch.device, dtype: torch.dtype) -> Checkpoint:
    """Read and validate the files of the real directory `real`; `path` is what the caller asked for."""
    config = read_config(real)
    meta = read_meta(real)
    try:
        tokenizer = Tokenizer.load(real)
    except (TokenizerError, OSError, RuntimeError) as e:
        raise CheckpointError(f"tokenizer in {real} cannot be loaded: {e}".replace("\n", " ")) from e
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer in {real} has {tokenizer.vocab_size} tokens but config.json "
                              f"vocab_size is {config.vocab_size}; the tokenizer does not belong to this model")
    tensors = _read_weights(real / WEIGHTS_FILE)
    model = model_from_tensors(config, tensors, str(real / WEIGHTS_FILE), device=device, dtype=dtype)
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, meta=meta, path=path)


def model_from_tensors(config: ModelConfig, hf_tensors: dict[str, torch.Tensor], source: str,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer (eval mode) holding `hf_tensors` (HF names), checked against `config`; `source`
    names where the tensors came from in error messages."""
    tensors = {from_hf_name(k): v for k, v in hf_tensors.items()}
    expected = {from_hf_name(k): v for k, v in expected_hf_shapes(config).items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exporters write the tied copy too
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = "; ".join(([f"missing tensors {_few(missing)}"] if missing else [])
                         + ([f"unexpected tensors {_few(unexpected)}"] if unexpected else []))
        raise CheckpointError(f"{source} does not match config.json: {what}; re-save or re-convert the checkpoint")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)} but "
                                  f"config.json implies {shape}; the weights and config.json come from "
                                  "different models")
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty unties shared params; tie again
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name in tensors:
                p.copy_(tensors[name])  # casts to fp32; .to(dtype) below
    return model.to(dtype=dtype).eval()


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")
