"""Streaming detokenization: deltas are whole characters (never U+FFFD for valid text) and add up to
the full decode; stop strings are cut wherever the token boundaries fall."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.engine.detokenizer import IncrementalDetokenizer

# English, CJK, emoji (incl. 4-byte and ZWJ sequences), accents, whitespace
ALPHABET = st.sampled_from(list("abc xyz\n\t.,!?éüß中文字机器学习你好世界") + ["😀", "🚀", "👩‍💻", "🇯🇵", "𝔘", "  "])
TEXTS = st.lists(ALPHABET, min_size=1, max_size=40).map("".join)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_checkpoint):
    from model.tokenizer import Tokenizer

    return Tokenizer.load(smollm2_checkpoint)


def stream(tokenizer, ids, stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer.token_bytes, stop)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok


def streamed_text(tokenizer, text: str) -> str:
    """Encode `text`, stream it back through the detokenizer, check no delta shows U+FFFD, and return
    the joined deltas."""
    deltas, _ = stream(tokenizer, tokenizer.encode(text))
    assert all("\ufffd" not in d for d in deltas)
    return "".join(deltas)


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_sentencepiece_stream_never_shows_replacement_char(tiny_sp_tokenizer, text):
    assert streamed_text(tiny_sp_tokenizer, text) == text == tiny_sp_tokenizer.decode(tiny_sp_tokenizer.encode(text))


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_byte_level_bpe_stream_never_shows_replacement_char(tiny_bpe_tokenizer, text):
    assert streamed_text(tiny_bpe_tokenizer, text) == text


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(text=TEXTS)
def test_smollm2_tokenizer_stream(smollm2_tokenizer, text):
    assert streamed_text(smollm2_tokenizer, text) == text


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, data=st.data())
def test_stop_string_is_cut_at_any_token_boundary(tiny_bpe_tokenizer, text, data):
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start:start + data.draw(st.integers(1, 4))]
    deltas, detok = stream(tiny_bpe_tokenizer, tiny_bpe_tokenizer.encode(text), stop=[stop])
    shown = "".join(deltas)
    assert detok.stopped_by == stop
    assert shown == text[:text.index(stop)]
    assert "\ufffd" not in shown


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    tokens = {1: b"ab", 2: b"c", 3: b"d"}
    detok = IncrementalDetokenizer(tokens.__getitem__, stop=["abx"])
    assert detok.add(1) == ""  # "ab" could still become "abx"
    assert detok.add(2) == "abc"
    assert detok.add(3) == "d"
    assert detok.flush() == "" and detok.stopped_by is None


def first_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Reference: scan the text; the first stop string to be completed wins (at a tie, the longest)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[:end - len(stop)], stop
    return text, None


def held_back(text: str, stops: list[str]) -> int:
    """Reference: the longest tail of `text` that is a proper prefix of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@settings(max_examples=300, deadline=None)
@given(text=st.text("abc é中", min_size=1, max_size=40), stops=st.lists(st.text("abc é中", min_size=1, max_size=5),
                                                                        min_size=1, max_size=4), data=st.data())
def test_stop_strings_match_the_reference_whatever_the_token_boundaries(text, stops, data):
    """Overlapping stop strings ("abcd" and "bc") give the same cut however the text is split into
    tokens, and every delta releases all text that can no longer start a stop string."""
    raw = text.encode()
    cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=len(raw))) if len(raw) > 1 else [])
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    detok = IncrementalDetokenizer(pieces.__getitem__, stop=stops)
    shown = ""
    for i in range(len(pieces)):
        shown += detok.add(i)
        if detok.stopped_by is None:  # the decoded text so far (a split character is not out yet)
            complete = raw[:sum(map(len, pieces[:i + 1]))].decode("utf-8", errors="ignore")
            assert shown == complete[:len(complete) - held_back(complete, stops)]
    shown += detok.flush()
    assert (shown, detok.stopped_by) == first_stop(text, stops)
