"""Tokenizers and the chat format.

    .venv/bin/pytest -q tests/test_tokenizer.py -m "not slow"    # hermetic, seconds
    .venv/bin/pytest -q tests/test_tokenizer.py                  # + SmolLM2's BPE vs transformers
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.tokenizer import (
    IM_END,
    IM_START,
    BPETokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    render_chat,
    train_sentencepiece,
)
from tests.conftest import build_tiny_bpe

MIXED = ("Hello, world! The year 2024 had 366 days.\n\n你好，世界！机器学习 🤖🎉👍🏽 café naïve\n"
         "def f(x):\n\treturn x ** 2  # square\r\n   \u00a0trailing   \n\n\n  {\"key\": [1, 2.5e-3]}  "
         "<|im_start|> is literal text here ▁ \u200b\u3000 ")
UNICODE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


def _trained_bpe(_: Path | None = None) -> BPETokenizer:
    return build_tiny_bpe(default_system_prompt="Be brief.")


# ------------------------------------------------------------------------------- SentencePiece
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=UNICODE)
def test_sentencepiece_round_trips_any_unicode(tiny_sp_tokenizer: SentencePieceTokenizer, text: str) -> None:
    ids = tiny_sp_tokenizer.encode(text)
    assert tiny_sp_tokenizer.decode(ids) == text
    assert b"".join(tiny_sp_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert not set(ids) & set(tiny_sp_tokenizer.special_tokens.values())


@pytest.mark.parametrize("text", [MIXED, "", " ", "  leading", "\n", "▁▁x▁", "你好", "🙂" * 5, "\x00\x01\x7f",
                                  "<|im_end|></s><s><unk>"])
def test_sentencepiece_round_trips_examples(tiny_sp_tokenizer: SentencePieceTokenizer, text: str) -> None:
    assert tiny_sp_tokenizer.decode(tiny_sp_tokenizer.encode(text)) == text


def test_sentencepiece_specials_and_ids(tiny_sp_tokenizer: SentencePieceTokenizer) -> None:
    tok = tiny_sp_tokenizer
    assert {IM_START, IM_END} <= set(tok.special_tokens)
    assert tok.stop_ids == {tok.eos_id, tok.im_end_id}
    assert tok.vocab_size <= 400
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.im_start_id not in tok.encode(IM_START)  # literal text, never the control token
    assert tok.token_bytes(tok.im_end_id) == b""
    assert tok.decode([tok.im_start_id, *tok.encode("x")]) == "x"
    assert tok.decode([tok.im_start_id, *tok.encode("x")], skip_special=False) == IM_START + "x"
    assert len(tok.encode("机器学习")) < len("机器学习".encode())  # it learned Chinese pieces


def test_sentencepiece_save_load(tiny_sp_tokenizer: SentencePieceTokenizer, tmp_path: Path) -> None:
    tiny_sp_tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode(MIXED) == tiny_sp_tokenizer.encode(MIXED)
    assert loaded.special_tokens == tiny_sp_tokenizer.special_tokens


def test_train_sentencepiece_unigram_from_file(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["hello world, how are you", "我们一起学习机器学习", "numbers 12345"] * 100),
                      encoding="utf-8")
    tok = train_sentencepiece(corpus, tmp_path / "tok", vocab_size=320, model_type="unigram")
    assert (tmp_path / "tok" / "tokenizer.model").is_file()
    assert tok.decode(tok.encode(MIXED)) == MIXED
    with pytest.raises(TokenizerError):
        train_sentencepiece(["x"], None, model_type="wordpiece")
    with pytest.raises(TokenizerError, match="no such file"):
        train_sentencepiece(str(tmp_path / "missing.txt"))
    with pytest.raises(TokenizerError, match="no text"):
        train_sentencepiece(["", "  "])


def test_load_without_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.load(tmp_path)


# ------------------------------------------------------------------------------- byte-level BPE
_BPE_CACHE: dict[str, BPETokenizer] = {}


@settings(max_examples=100, deadline=None)
@given(text=UNICODE)
def test_bpe_round_trips_any_unicode(text: str) -> None:
    if "tok" not in _BPE_CACHE:
        _BPE_CACHE["tok"] = _trained_bpe(Path("."))
    tok = _BPE_CACHE["tok"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_bpe_specials_literal_and_save_load(tmp_path: Path) -> None:
    tok = _trained_bpe(tmp_path)
    assert tok.special_tokens == {"<|endoftext|>": 0, IM_START: 1, IM_END: 2}
    assert tok.stop_ids == {2}
    assert not set(tok.encode(MIXED)) & {0, 1, 2}  # "<|im_start|>" in MIXED stays text
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(MIXED) == tok.encode(MIXED)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 2)
    assert loaded.default_system_prompt == "Be brief."


# ------------------------------------------------------------------------------- render_chat
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."},
        {"role": "user", "content": "和 3+3 呢？"}, {"role": "assistant", "content": "6 🙂"}]


@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_render_chat_mask_covers_assistant_content(which: str, tiny_sp_tokenizer: Any, tmp_path: Path) -> None:
    tok = tiny_sp_tokenizer if which == "sp" else _trained_bpe(tmp_path)
    r = render_chat(tok, CHAT, add_generation_prompt=False)
    assert len(r.ids) == len(r.loss_mask)
    text = tok.decode(r.ids, skip_special=False)
    system = f"{IM_START}system\n{tok.default_system_prompt}{IM_END}\n" if tok.default_system_prompt else ""
    assert text == system + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in CHAT)
    masked = [i for i, m in zip(r.ids, r.loss_mask, strict=True) if m]
    assert tok.decode(masked, skip_special=False) == f"4, of course.{IM_END}6 🙂{IM_END}"
    assert sum(1 for i, m in zip(r.ids, r.loss_mask, strict=True) if m and i == tok.im_end_id) == 2


def test_render_chat_mask_token_straddling_header(tmp_path: Path) -> None:
    """Content starting with newlines may merge with the header's "\n"; that token counts as content."""
    tok = _trained_bpe(tmp_path)
    r = render_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\n x"}],
                    add_generation_prompt=False)
    masked = tok.decode([i for i, m in zip(r.ids, r.loss_mask, strict=True) if m], skip_special=False)
    assert masked.endswith("\n\n x" + IM_END) and len(masked) <= len("\n\n\n x" + IM_END)


def test_render_chat_generation_prompt_and_system(tmp_path: Path) -> None:
    tok = _trained_bpe(tmp_path)
    r = render_chat(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(r.ids, skip_special=False) == (
        f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n")
    assert not any(r.loss_mask)
    own = render_chat(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])
    assert tok.decode(own.ids, skip_special=False).startswith(f"{IM_START}system\nS{IM_END}\n")
    # each segment between specials is encoded on its own (like HF)
    assert r.ids[:3] == [tok.im_start_id, *tok.encode("system\nBe brief.")[:2]]


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": "user", "content": 3}], "content must be a string"),
])
def test_render_chat_validates(tiny_sp_tokenizer: Any, messages: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_chat(tiny_sp_tokenizer, messages)


# ------------------------------------------------------------------------------- SmolLM2 (slow)
@pytest.mark.slow
def test_smollm2_bpe_matches_transformers(smollm2_checkpoint: Path, smollm2_gguf: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.load(smollm2_checkpoint)
    theirs = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    text = MIXED.replace("<|im_start|>", "<im_start>")  # HF would parse the special token; we never do
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(MIXED)) == MIXED
    # transformers loads our saved directory and encodes the same; its chat template = render_chat
    from_dir = transformers.AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    assert from_dir.encode(text, add_special_tokens=False) == ours.encode(text)
    chat = [{"role": "user", "content": "Hi there"}]
    hf_ids = from_dir.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == render_chat(ours, chat).ids
