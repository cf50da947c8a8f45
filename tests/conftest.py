"""Shared pytest fixtures (session-scoped; reuse them in engine, server and training tests).

    tiny_checkpoint      Path to a random "test"-preset model + a small SentencePiece tokenizer, written with
                         save_checkpoint. Milliseconds to load: `load_checkpoint(tiny_checkpoint)`.
    tiny_sp_tokenizer    that SentencePiece tokenizer (trained on TINY_CORPUS, English + Chinese).
    tiny_bpe_tokenizer   a byte-level BPETokenizer (~400 ids; 0..2 = <|endoftext|>, <|im_start|>, <|im_end|>)
                         built like an imported one (vocab + merges); `build_tiny_bpe()` makes a fresh one.
    smollm2_checkpoint   Path to the real SmolLM2-135M-Instruct checkpoint (ensure_default_model(): cached
                         under $SEEDLING_HOME; `make test` runs `python -m model.convert default` first).
                         Tests using it are marked `@pytest.mark.slow` (they still run in CI).
    hf_reference         transformers' LlamaForCausalLM + tokenizer loaded from the same GGUF, fp32, once
                         per session (~30 s) — for reference comparisons only.

Treat these directories as read-only; copy them (shutil.copytree) before corrupting or re-saving.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Small language models can be trained on a laptop in a few minutes.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 3.14159 and 2,900 appear in text: 42, 1024, 65536.",
    "今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "你好，世界！这是一个小小的测试语料。",
    "我喜欢读书和写代码。",
    "Translate to Chinese: I love reading books. 我喜欢读书。",
]
TINY_SEED = 1234


@pytest.fixture(scope="session")
def _session_torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def _keep_torch_threads(_session_torch_threads: int) -> None:
    """Jobs run in-process (in tests or module fixtures) set torch's thread count (`--threads 1`); every
    test starts from the session's count, so numerics that depend on it (fbgemm's w8a8 kernels round
    differently on one thread) do not depend on test order."""
    import torch

    torch.set_num_threads(_session_torch_threads)


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """ServerSettings() reads SEEDLING_* variables: the developer's own never reach a test (model/'s
    SEEDLING_HOME and SEEDLING_NATIVE_DIR stay)."""
    for name in list(os.environ):
        if name.startswith("SEEDLING_") and name not in ("SEEDLING_HOME", "SEEDLING_NATIVE_DIR"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from model.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("tiny_sp")
    return train_sentencepiece(TINY_CORPUS * 20, out, vocab_size=400, model_type="bpe")


def tiny_bpe_parts() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, llama.cpp token types) of a small byte-level BPE trained on TINY_CORPUS: what a
    GGUF stores as tokenizer.ggml.tokens / merges / token_type."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TINY_CORPUS * 20, trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if i < 3 else 1 for i in range(len(tokens))]
    return tokens, merges, types


def build_tiny_bpe(default_system_prompt: str | None = None) -> Any:
    from model.tokenizer import BPETokenizer

    tokens, merges, types = tiny_bpe_parts()
    return BPETokenizer.from_vocab_merges(tokens, merges, types, eos_id=2, bos_id=1, pre="smollm",
                                          default_system_prompt=default_system_prompt)


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer() -> Any:
    return build_tiny_bpe()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_sp_tokenizer: Any) -> Path:
    """A random tiny model (preset "test", vocab 512 >= tokenizer's) saved as a full checkpoint."""
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.transformer import Transformer

    model = Transformer(preset("test")).init_weights(TINY_SEED).eval()
    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny"
    meta = {"step": 0, "source": "tests/conftest.py random init",
            "labels": {"sentiment": ["positive", "negative"]}}
    return save_checkpoint(path, model, tiny_sp_tokenizer, meta)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The converted default model (SmolLM2-135M-Instruct, BPE tokenizer)."""
    from model.convert import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_checkpoint: Path) -> Path:
    """The GGUF file the default checkpoint was converted from."""
    from model.convert import default_gguf_path

    path = default_gguf_path()
    assert path.is_file(), f"{path} missing; run `python -m model.convert default`"
    return path


@pytest.fixture(scope="session")
def hf_reference(smollm2_gguf: Path) -> Any:
    """(model, tokenizer) from transformers, loaded from the GGUF in fp32, once per session."""
    import torch

    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model, tok
