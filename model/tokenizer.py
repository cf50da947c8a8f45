"""Tokenizers and the chat format: the ONE place text becomes token ids.

    tok = Tokenizer.load(checkpoint_dir)              # SentencePiece or byte-level BPE, by the files present
    ids = tok.encode("any text, 你好 🙂")             # literal text: "<|im_start|>" in it is NOT a special token
    chat = render_chat(tok, [{"role": "user", "content": "Hi"}])   # ChatML ids + assistant-only loss mask

Two implementations of one interface:
  * SentencePieceTokenizer: what our training jobs produce (`train_sentencepiece`). Byte fallback, no dummy
    prefix, identity normalization and unescaped whitespace, so decode(encode(x)) == x for any Unicode.
  * BPETokenizer: byte-level BPE (GPT-2 style) built with `tokenizers` from a vocabulary + merges (imported
    models: the SmolLM2 GGUF) and saved as a Hugging Face `tokenizer.json` that `transformers` loads too.

The chat format is ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n`, rendered only by `render_chat`.
"""

from __future__ import annotations

import io
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's result (model.tool_calls)
TOKENIZER_CONFIG = "tokenizer_config.json"
SP_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or loaded."""


# ------------------------------------------------------------------------------- the interface
class Tokenizer(ABC):
    """Text <-> ids. Subclasses set every attribute below in their constructor."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]  # includes IM_START and IM_END
    stop_ids: frozenset[int]  # ids that end a generation (eos, <|im_end|>)
    default_system_prompt: str | None  # injected by render_chat when the chat has no system message

    @abstractmethod
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of `text` taken literally (special-token spellings in it are ordinary text)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes one token stands for (b"" for special tokens); a streaming detokenizer
        concatenates these and emits only complete characters."""

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @property
    def im_start_id(self) -> int:
        return self.special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.special_tokens[IM_END]

    @staticmethod
    def load(directory: str | Path) -> Tokenizer:
        """Load the tokenizer saved in `directory`: tokenizer.model -> SentencePiece, tokenizer.json -> BPE."""
        directory = Path(directory)
        if (directory / SP_MODEL_FILE).is_file():
            return SentencePieceTokenizer.load(directory)
        if (directory / HF_TOKENIZER_FILE).is_file():
            return BPETokenizer.load(directory)
        raise TokenizerError(f"no tokenizer in {directory}: expected {SP_MODEL_FILE} or {HF_TOKENIZER_FILE}")

    def _config(self, kind: str) -> dict[str, Any]:
        """tokenizer_config.json: HF's keys (so transformers loads the dir) plus ours under "seedling"."""
        by_id = {v: k for k, v in self.special_tokens.items()}
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": by_id.get(self.bos_id) if self.bos_id is not None else None,
            "eos_token": by_id.get(self.eos_id),
            "pad_token": by_id.get(self.pad_id),
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": chatml_template(self.default_system_prompt),
            "seedling": {
                "kind": kind, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "default_system_prompt": self.default_system_prompt,
            },
        }


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot parse {path}: {e}") from e


def _stop_ids(eos_id: int, special_tokens: dict[str, int]) -> frozenset[int]:
    return frozenset({eos_id} | ({special_tokens[IM_END]} if IM_END in special_tokens else set()))


# ------------------------------------------------------------------------------- SentencePiece
SP_SPACE = "\u2581"  # SentencePiece's spelling of a space
SP_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", IM_START, IM_END)  # ids 0..5 in every model we train


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model trained by `train_sentencepiece` (ids 0..5 = SP_SPECIALS)."""

    def __init__(self, model_proto: bytes, default_system_prompt: str | None = None) -> None:
        import sentencepiece as spm

        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        # special = control / unknown / user-defined pieces (ours: SP_SPECIALS; ChatML ones are required)
        self.special_tokens = {
            self.sp.id_to_piece(i): i for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.IdToPiece(i) in SP_SPECIALS
        }
        for name in (IM_START, IM_END):
            if name not in self.special_tokens:
                raise TokenizerError(f"SentencePiece model lacks the control piece {name!r} that ChatML needs; "
                                     "train it with model.tokenizer.train_sentencepiece")
        if self.sp.eos_id() < 0:
            raise TokenizerError("SentencePiece model has no eos piece; train it with train_sentencepiece")
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = _stop_ids(self.eos_id, self.special_tokens)
        self.default_system_prompt = default_system_prompt
        self._special_ids = frozenset(self.special_tokens.values())
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self._space_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SP_SPACE.encode("utf-8")]

    def _piece_bytes(self, i: int) -> bytes:
        if i in self._special_ids or self.sp.is_control(i) or self.sp.is_unknown(i):
            return b""
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SP_SPACE, " ").encode("utf-8")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # SentencePiece spells " " as U+2581, so a literal U+2581 in the text is encoded as its UTF-8
        # bytes (byte-fallback pieces) to keep decode(encode(x)) == x. Control symbols are never matched.
        parts = text.split(SP_SPACE)
        ids = self.sp.encode(parts[0])
        for part in parts[1:]:
            ids += self._space_bytes
            ids += self.sp.encode(part)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        if not skip_special:
            return b"".join(
                self.sp.id_to_piece(i).encode() if i in self._special_ids else self.token_bytes(i) for i in ids
            ).decode("utf-8", errors="replace")
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        # ids past the vocabulary (padding rows of a larger model embedding) stand for nothing
        return self._bytes[token_id] if 0 <= token_id < self.vocab_size else b""

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        (directory / SP_MODEL_FILE).write_bytes(self._proto)
        cfg = self._config("sentencepiece")
        cfg["tokenizer_class"] = "LlamaTokenizer"
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> SentencePieceTokenizer:
        directory = Path(directory)
        cfg = _read_config(directory).get("seedling", {})
        return cls((directory / SP_MODEL_FILE).read_bytes(), cfg.get("default_system_prompt"))


def train_sentencepiece(texts_or_file: Iterable[str] | str | Path, out_dir: str | Path | None = None,
                        vocab_size: int = 8192, model_type: str = "bpe",
                        default_system_prompt: str | None = None,
                        max_sentences: int = 2_000_000) -> SentencePieceTokenizer:
    """Train a byte-fallback SentencePiece model on an iterable of texts or a text file (one document
    per line); save it into `out_dir` when given. `vocab_size` is an upper bound for small corpora."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if isinstance(texts_or_file, (str, Path)):  # a file: SentencePiece streams it (one sentence a line)
        if not Path(texts_or_file).is_file():
            raise TokenizerError(f"train_sentencepiece: no such file {texts_or_file}; pass a path or a list of texts")
        source: dict[str, Any] = {"input": str(texts_or_file), "input_sentence_size": max_sentences,
                                  "shuffle_input_sentence": True}
    else:
        lines = [ln for text in texts_or_file for ln in str(text).splitlines() if ln.strip()][:max_sentences]
        if not lines:
            raise TokenizerError("train_sentencepiece got no text")
        source = {"sentence_iterator": iter(lines)}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        **source, model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True,
        character_coverage=0.9995, hard_vocab_limit=False, max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        pad_piece="<pad>", control_symbols=[IM_START, IM_END], num_threads=2, minloglevel=2,
        train_extremely_large_corpus=False,
    )
    tok = SentencePieceTokenizer(model.getvalue(), default_system_prompt)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save(Path(out_dir))
    return tok


# ------------------------------------------------------------------------------- byte-level BPE
def _pre_tokenizer(name: str) -> Any:
    """The split applied before byte-level BPE, by llama.cpp's `tokenizer.ggml.pre` name."""
    from tokenizers import Regex, pre_tokenizers

    if name == "smollm":  # SmolLM/SmolLM2: every digit alone, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name in ("llama3", "llama-bpe", "llama-v3"):
        split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # "gpt2", "default" and anything unknown: GPT-2's regex (what transformers falls back to as well)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _gpt2_alphabet() -> list[str]:
    """GPT-2's printable spelling of each byte value 0..255 (byte-level BPE vocabularies use it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


class BPETokenizer(Tokenizer):
    """Byte-level BPE over a `tokenizers.Tokenizer` whose special tokens are its special added tokens."""

    def __init__(self, hf_tokenizer: Any, eos_id: int, bos_id: int | None = None, pad_id: int | None = None,
                 default_system_prompt: str | None = None) -> None:
        self.tk = hf_tokenizer
        self.tk.encode_special_tokens = True  # text is literal: never split out special tokens
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        for name in (IM_START, IM_END):
            if name not in self.special_tokens:
                raise TokenizerError(f"tokenizer has no special token {name!r}; ChatML needs it")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.stop_ids = _stop_ids(eos_id, self.special_tokens)
        self.default_system_prompt = default_system_prompt
        self._special_ids = frozenset(self.special_tokens.values())
        byte_of = {ch: b for b, ch in enumerate(_gpt2_alphabet())}
        self._bytes: list[bytes] = [b""] * self.vocab_size
        for piece, i in self.tk.get_vocab(with_added_tokens=True).items():
            if i not in self._special_ids:
                self._bytes[i] = (bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece)
                                  else piece.encode("utf-8"))

    @classmethod
    def from_vocab_merges(cls, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None,
                          eos_id: int, bos_id: int | None = None, pad_id: int | None = None,
                          pre: str = "gpt2", default_system_prompt: str | None = None) -> BPETokenizer:
        """Build from GGUF-style metadata: tokens in GPT-2 byte spelling, merges "a b", llama.cpp token
        types (3 = control -> special token, 4 = user-defined -> added token)."""
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tk.pre_tokenizer = _pre_tokenizer(pre)
        tk.decoder = decoders.ByteLevel()
        types = list(token_types or [1] * len(tokens))
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                               for t, ty in zip(tokens, types, strict=True) if ty == 3])
        user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types, strict=True) if ty == 4]
        if user:
            tk.add_tokens(user)
        return cls(tk, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, default_system_prompt=default_system_prompt)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        # ids past the vocabulary (padding rows of a larger model embedding) stand for nothing
        return self.tk.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < self.vocab_size else b""

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.tk.encode_special_tokens = False  # not part of the file format; HF parses specials by default
        try:
            self.tk.save(str(directory / HF_TOKENIZER_FILE))
        finally:
            self.tk.encode_special_tokens = True
        cfg = self._config("bpe")
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> BPETokenizer:
        """Load tokenizer.json (+ tokenizer_config.json): ours, or a Hugging Face model's."""
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        try:
            tk = HFTokenizer.from_file(str(directory / HF_TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot parse {directory / HF_TOKENIZER_FILE}: {e}") from e
        cfg = _read_config(directory)
        ours = cfg.get("seedling", {})

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            if isinstance(tok, dict):  # HF serialises AddedToken as a dict
                tok = tok.get("content")
            return tk.token_to_id(tok) if isinstance(tok, str) else None

        eos = ours.get("eos_id", token_id("eos_token"))
        if eos is None:
            eos = tk.token_to_id(IM_END)
        if eos is None:
            raise TokenizerError(f"{directory / TOKENIZER_CONFIG} names no eos_token")
        system = ours.get("default_system_prompt") if "seedling" in cfg else \
            default_system_prompt_from_template(cfg.get("chat_template"))
        return cls(tk, eos_id=eos, bos_id=ours.get("bos_id", token_id("bos_token")),
                   pad_id=ours.get("pad_id", token_id("pad_token")), default_system_prompt=system)


# ------------------------------------------------------------------------------- the chat format
@dataclass
class ChatRendering:
    ids: list[int]
    loss_mask: list[bool]  # True on assistant content tokens and their closing <|im_end|>


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a chat is a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    return messages


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]],
                add_generation_prompt: bool = True) -> ChatRendering:
    """ChatML ids for a conversation, as HF's chat template + tokenizer would give them: each text
    segment between special tokens is encoded on its own. Injects tokenizer.default_system_prompt when
    the first message is not a system message."""
    messages = validate_messages(messages)
    if messages[0]["role"] != "system" and tokenizer.default_system_prompt is not None:
        messages = [{"role": "system", "content": tokenizer.default_system_prompt}, *messages]
    start, end = tokenizer.im_start_id, tokenizer.im_end_id
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        header = m["role"] + "\n"
        seg = tokenizer.encode(header + m["content"])
        if m["role"] == "assistant":
            seg_mask = _content_mask(tokenizer, seg, len(header.encode("utf-8")))
        else:
            seg_mask = [False] * len(seg)
        ids += [start, *seg, end, *newline]
        mask += [False, *seg_mask, m["role"] == "assistant", *([False] * len(newline))]
    if add_generation_prompt:
        prompt = tokenizer.encode("assistant\n")
        ids += [start, *prompt]
        mask += [False] * (1 + len(prompt))
    return ChatRendering(ids, mask)


def _content_mask(tokenizer: Tokenizer, seg: list[int], header_bytes: int) -> list[bool]:
    """True for tokens holding any byte past the role header (a token straddling "\\n" + content counts)."""
    mask, pos = [], 0
    for i in seg:
        pos += len(tokenizer.token_bytes(i))
        mask.append(pos > header_bytes)
    return mask


def chatml_template(default_system_prompt: str | None) -> str:
    """The Jinja chat template equivalent to render_chat, for transformers' apply_chat_template."""
    inject = ""
    if default_system_prompt is not None:
        literal = json.dumps(f"{IM_START}system\n{default_system_prompt}{IM_END}\n")
        inject = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ " + literal + " }}{% endif %}")
    return ("{% for message in messages %}" + inject
            + "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
            + "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def default_system_prompt_from_template(template: str | None) -> str | None:
    """The system prompt a ChatML Jinja template injects when the chat has none (SmolLM2's does)."""
    if not template or "!= 'system'" not in template:
        return None
    found = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
    return found.group(1) if found else None
