"""PromptGuard: keep tokenization off the event loop, and skip it for text that cannot fit anyway.

Tokenizing 1 MB of text (the body limit) takes seconds; on the event loop that would stall every
other request's stream. So prompt building runs in a worker thread (`run`; the Rust and C++
tokenizers release the GIL while they work), and text that is longer in characters than any prompt
that fits is refused before it is tokenized at all (`check`).

The character bound is safe: a token spells at most `longest_token_bytes` bytes and a character
takes at least one byte, so a text of more than max_model_len x longest_token_bytes characters has
more than max_model_len tokens. (The one exception, a tokenizer that folds a run of unknown
characters into one <unk>, would be refused a prompt it could have taken; byte-fallback and
byte-level tokenizers, ours, have no such runs.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TypeVar

from model.tokenizer import Tokenizer

from .errors import PromptTooLongError

T = TypeVar("T")
# below this many characters a prompt is always tokenized (milliseconds), so a prompt that is too long
# gets its exact token count in the error; the character bound is for the megabyte cases
EXACT_BELOW_CHARS = 65_536


class PromptGuard:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        longest = max((len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)), default=1)
        self.max_chars = max(max_model_len * max(longest, 1), EXACT_BELOW_CHARS)

    def check(self, texts: Iterable[str], param: str) -> None:
        """`texts` make up one prompt: refuse it (400, context_length_exceeded) if their characters
        alone prove it cannot fit."""
        chars = sum(len(t) for t in texts)
        if chars > self.max_chars:
            raise PromptTooLongError(
                f"prompt is {chars} characters: more than the {self.max_chars} that could fit in this model's "
                f"maximum context length of {self.max_model_len} tokens; shorten it (it is never truncated "
                "silently)", param=param, code="context_length_exceeded")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in a worker thread (prompt building: tokenizing, length checks)."""
        return await asyncio.to_thread(fn, *args)
