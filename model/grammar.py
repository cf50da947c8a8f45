"""Constrained decoding: a response format (JSON object / JSON schema) -> a token mask per step.

    compiler = GrammarCompiler(tokenizer)                      # one per engine (owns the LRU of grammars)
    fmt = ResponseFormat.json_schema({"type": "object", ...})  # raises GrammarError for a bad schema
    constraint = compiler.compile(fmt).start()                 # one per sequence: the matcher state
    constraint.fill_mask(bitmask, row); ...; constraint.advance(token)

Built on xgrammar (docs/structured-output.md says why, with numbers: its per-step mask is ~15x cheaper
than llguidance's on our tokenizer, and the mask sits on every constrained decode step). It reads the
raw bytes of every token, so our SentencePiece and byte-level BPE tokenizers look alike to it. Compiled
grammars are cached per schema in an LRU owned by the compiler (no global state). Masks are packed
int32 bitmasks; `apply_bitmask` turns them into -inf on the logits with plain torch ops, after the
forward, so the q4 CPU path and the torch path share it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from model.sampling import SamplingError
from model.tokenizer import Tokenizer

PARAM = "response_format"  # the request field every error here names
MAX_SCHEMA_CHARS = 100_000  # a schema is compiled on the engine thread: bound its size
_BITS = torch.arange(32, dtype=torch.int32)


class GrammarError(SamplingError):
    """A response format that cannot be compiled (a client error: the HTTP layer maps it to 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param=PARAM)


@dataclass(frozen=True)
class ResponseFormat:
    """What a request's output must be: any JSON object, or JSON valid for `schema` (canonical JSON text,
    so equal schemas share one cache entry and the dataclass stays hashable)."""

    schema_json: str  # '{"type": "object"}' for json_object

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls('{"type":"object"}')

    @classmethod
    def json_schema(cls, schema: Any) -> ResponseFormat:
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise GrammarError(f"{PARAM}.json_schema.schema must be a JSON object, got {type(schema).__name__}")
        _check_supported(schema, f"{PARAM}.json_schema.schema")
        text = json.dumps(schema, separators=(",", ":"))  # key order kept: it is the order fields are generated in
        if len(text) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"{PARAM}.json_schema.schema is {len(text)} characters, over {MAX_SCHEMA_CHARS}")
        return cls(text)


def _check_supported(node: Any, where: str) -> None:
    """Refuse what xgrammar would silently drop (it only warns on stderr): an output that ignored part of
    the schema would not validate against it."""
    if isinstance(node, dict):
        if "pattern" in node and ("minLength" in node or "maxLength" in node):
            raise GrammarError(f"{where}: pattern combined with minLength/maxLength is not supported; "
                               "put the length into the pattern (e.g. ^[0-9]{2,3}$)")
        for key, value in node.items():
            _check_supported(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_supported(value, f"{where}[{i}]")


class Constraint:
    """One sequence's grammar state: which tokens may come next, advanced by every sampled token.
    Stop tokens are allowed exactly when the grammar accepts what was generated so far."""

    def __init__(self, matcher: xgr.GrammarMatcher, no_controls: torch.Tensor) -> None:
        self.matcher = matcher
        self.no_controls = no_controls

    @property
    def vocab_size(self) -> int:
        return self.no_controls.numel() * 32

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bitmask into `bitmask[row]` (int32, CPU, from `allocate_bitmask`)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
        bitmask[row] &= self.no_controls

    def advance(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"grammar rejected token {token}")  # the mask allowed it: a bug, not input

    @property
    def accepting(self) -> bool:
        return self.matcher.is_completed()


@dataclass(frozen=True)
class CompiledGrammar:
    compiled: xgr.CompiledGrammar
    # bitmask (W,) of the tokens without a raw control byte: xgrammar's JSON strings admit U+0000-U+001F
    # unescaped, which JSON forbids; our one-line JSON never needs one (escapes are plain ASCII)
    no_controls: torch.Tensor

    def start(self, stop_ids: Sequence[int] | None = None) -> Constraint:
        """A fresh matcher; `stop_ids` (a request's own stop tokens) replace the tokenizer's."""
        return Constraint(xgr.GrammarMatcher(self.compiled, override_stop_tokens=sorted(stop_ids)
                                             if stop_ids else None), self.no_controls)


class GrammarCompiler:
    """Compiles response formats against one tokenizer; the `cache_size` most recent stay compiled."""

    def __init__(self, tok: Tokenizer, cache_size: int = 64, threads: int = 1) -> None:
        self.vocab_size = tok.vocab_size
        # RAW vocabulary: each token's own bytes (b"" for special tokens), so SentencePiece and byte-level
        # BPE tokenizers look the same to xgrammar
        vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=sorted(tok.stop_ids))
        self._no_controls = _bitmask_of([not any(b < 0x20 for b in token) for token in vocab])
        # xgrammar's own cache is off: ours is an LRU bounded in entries, keyed by the canonical schema
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.cache_size = cache_size
        self._cache: OrderedDict[ResponseFormat, CompiledGrammar] = OrderedDict()

    def compile(self, fmt: ResponseFormat) -> CompiledGrammar:
        hit = self._cache.get(fmt)
        if hit is not None:
            self._cache.move_to_end(fmt)
            return hit
        compiled = self._compile(fmt)
        self._cache[fmt] = compiled
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def compile_json_schema(self, schema: dict[str, Any]) -> CompiledGrammar:
        return self.compile(ResponseFormat.json_schema(schema))

    def _compile(self, fmt: ResponseFormat) -> CompiledGrammar:
        try:  # one line, ", " and ": " (what json.dumps writes), no free whitespace: a small model left
            # free to pad with spaces can do so until max_tokens
            compiled = self._compiler.compile_json_schema(fmt.schema_json, any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GrammarError(f"{PARAM}: unsupported or invalid JSON schema: {first}") from None
        return CompiledGrammar(compiled, self._no_controls)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.vocab_size)


def _bitmask_of(allowed: list[bool]) -> torch.Tensor:
    """Pack booleans into xgrammar's layout: bit j of word w is token 32 * w + j."""
    bits = torch.zeros((len(allowed) + 31) // 32 * 32, dtype=torch.int64)
    bits[:len(allowed)] = torch.tensor(allowed, dtype=torch.int64)
    words = (bits.view(-1, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def mask_logits(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
    """Mask, in place, row rows[j] of logits (K, V) with constraints[j]'s allowed tokens."""
    bitmask = xgr.allocate_token_bitmask(len(rows), constraints[0].vocab_size)
    for j, c in enumerate(constraints):
        c.fill_mask(bitmask, j)
    index = torch.tensor(rows, device=logits.device)
    picked = logits.index_select(0, index)
    apply_bitmask(picked, bitmask)
    logits.index_copy_(0, index, picked)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, every logit whose bit is 0: logits (K, V) on any device, bitmask (K, W)
    int32 on CPU. Ids past the bitmask's vocabulary (a model's padding rows) are disallowed too."""
    rows, width = bitmask.shape
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).bool().reshape(rows, width * 32)
    v = logits.shape[1]
    if v > allowed.shape[1]:
        logits[:, allowed.shape[1]:] = float("-inf")
    logits[:, :min(v, allowed.shape[1])].masked_fill_(~allowed[:, :v].to(logits.device), float("-inf"))
