"""The task logic: the ONE place the prompts, the label scoring and the length rule live.

Fine-tuning (`training.finetune`), evaluation (`training.evaluate`) and the server (`app/`) all call
these functions, so the three never drift apart (tests/test_tasks.py checks the token ids):

    ids = render_prompt(tokenizer, summarize_messages(text))           # prompt ids, assistant header last
    ids = render_prompt(tokenizer, extract_messages(text, schema))     # /extract (decoded under the schema)
    spec = ClassifySpec.build(["lost_or_stolen_card", "card_arrival"])  # canonical label order
    prompt = render_prompt(tokenizer, spec.messages("I lost my card"))
    loglik = engine.score(prompt, label_continuations(tokenizer, spec))
    prior = content_free_prior([engine.score(p, conts) for p in content_free_prompts(tokenizer, spec)])
    probs = label_probabilities(loglik, [len(c) for c in conts], prior, Calibration.PRIOR)  # softmax

Messages are lists of chat messages (`{"role": ..., "content": ...}`) for
`model.tokenizer.render_chat`; none of them adds a system message, so the tokenizer's default system
prompt (or the server's override, passed to `render_prompt`) applies exactly as it does for plain chat.
The prompts are short and plain so an instruct model such as SmolLM2-135M-Instruct does reasonably
zero-shot and a fine-tuned model learns them quickly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.tokenizer import ChatRendering, Tokenizer

Message = dict[str, str]

# task names (used as keys in checkpoint metadata `labels: {task: [...]}` and in SFT mixtures)
CHAT = "chat"
SUMMARIZE = "summarize"
TRANSLATE = "translate"
CLASSIFY = "classify"
TASKS: tuple[str, ...] = (CHAT, SUMMARIZE, TRANSLATE, CLASSIFY)
EXTRACT = "extract"  # served only (decoded under the schema's grammar); no fine-tuning data yet, so not in TASKS

# language codes the prompts spell out in words; any other value is used as given
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "ja": "Japanese", "ko": "Korean",
    "zh": "Chinese", "zh-hans": "Simplified Chinese", "zh-hant": "Traditional Chinese",
    "ar": "Arabic", "hi": "Hindi", "tr": "Turkish", "pl": "Polish", "sv": "Swedish",
}


class TaskError(ValueError):
    """A task request that cannot be turned into a prompt (empty text, no labels, ...). `param` names
    the request field at fault, so the server's 400 can point at it without parsing the message."""

    def __init__(self, message: str, param: str = "text") -> None:
        super().__init__(message)
        self.param = param


class ContextTooLong(TaskError):
    """Prompt + the tokens it needs after it do not fit in max_model_len (never truncated silently)."""

    def __init__(self, prompt_tokens: int, needed: int, max_model_len: int, param: str = "messages") -> None:
        super().__init__(f"prompt is {prompt_tokens} tokens and needs {needed} more, but the maximum "
                         f"context length is {max_model_len} tokens", param)
        self.prompt_tokens, self.needed, self.max_model_len = prompt_tokens, needed, max_model_len


def language_name(code_or_name: str, param: str = "target_lang") -> str:
    """'de' -> 'German'; a name or an unknown code is returned stripped, unchanged."""
    value = code_or_name.strip()
    if not value:
        raise TaskError("language must not be empty", param)
    return LANGUAGE_NAMES.get(value.lower(), value)


def check_length(prompt_tokens: int, max_model_len: int, needed: int = 1, param: str = "messages") -> None:
    """The length rule, for generation and scoring alike: the prompt plus the `needed` tokens after it
    (1 to generate anything, max_tokens when the caller set it, the longest scored continuation) must
    fit in max_model_len; a prompt is never truncated. Raises ContextTooLong."""
    if prompt_tokens <= 0:
        raise TaskError("prompt is empty", param)
    if prompt_tokens + needed > max_model_len:
        raise ContextTooLong(prompt_tokens, needed, max_model_len, param)


def with_system(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """`messages` with `system_prompt` (the server's configured default) in front when the chat has no
    system message of its own; None leaves the tokenizer's default to `render_chat`."""
    out = [dict(m) for m in messages]
    if system_prompt and out and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Message], system_prompt: str | None = None) -> list[int]:
    """Prompt ids ending with the assistant header: what the server and the evaluator feed the engine,
    and the prefix of what `render_example` trains on. Bad messages raise ValueError."""
    from model.tokenizer import render_chat

    return list(render_chat(tokenizer, with_system(messages, system_prompt), add_generation_prompt=True).ids)


def render_conversation(tokenizer: Tokenizer, messages: Sequence[Message], system_prompt: str | None = None
                        ) -> ChatRendering:
    """A whole conversation (answers included) with its loss mask: what fine-tuning trains on. Its
    ids up to an assistant answer are exactly `render_prompt` of the messages before it."""
    from model.tokenizer import render_chat

    return render_chat(tokenizer, with_system(messages, system_prompt), add_generation_prompt=False)


def _require_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise TaskError("text must be a non-empty string")
    return text.strip()


def chat_messages(messages: Sequence[Message]) -> list[Message]:
    """Plain chat: the caller's messages, copied (roles system/user/assistant)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def summarize_messages(text: str, max_words: int | None = None) -> list[Message]:
    """Prompt asking for a short summary of `text`; `max_words` adds a length limit.

    The expected assistant answer is the summary itself, with no preamble."""
    text = _require_text(text)
    if max_words is not None and (not isinstance(max_words, int) or max_words <= 0):
        raise TaskError(f"max_words must be a positive integer, got {max_words!r}", "max_words")
    limit = f" in at most {max_words} words" if max_words else ""
    return [{"role": "user",
             "content": f"Summarize the following text{limit}. Reply with the summary only.\n\n{text}"}]


def translate_messages(text: str, target_lang: str, source_lang: str | None = None) -> list[Message]:
    """Prompt asking to translate `text` into `target_lang` (a code like 'de' or a name).

    The expected assistant answer is the translation only."""
    text = _require_text(text)
    target = language_name(target_lang)
    source = f" from {language_name(source_lang, 'source_lang')}" if source_lang else ""
    return [{"role": "user",
             "content": f"Translate the following text{source} to {target}. "
                        f"Reply with the translation only.\n\n{text}"}]


def extract_messages(text: str, schema: Mapping[str, object]) -> list[Message]:
    """Prompt asking for the facts in `text` as JSON valid for `schema` (a JSON schema object, shown
    compact). The expected assistant answer is the JSON only; the server decodes it under the schema's
    grammar, so it always parses."""
    text = _require_text(text)
    if not isinstance(schema, Mapping):
        raise TaskError("schema must be a JSON object", "schema")
    shown = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    return [{"role": "user",
             "content": f"Extract the information from the text below as JSON matching this JSON schema:\n{shown}\n"
                        f"Reply with the JSON only.\n\nText: {text}"}]


# ---------------------------------------------------------------------------- classify
CONTENT_FREE_TEXTS: tuple[str, ...] = ("N/A", "[MASK]", "")  # Zhao et al. 2021, contextual calibration
MAX_EXAMPLES = 64  # few-shot examples per request, all labels together (the prompt grows with each)


class Calibration(str, Enum):
    """How a label's scores become its probability (chosen on validation data, docs/classify.md).

    direct: the log-likelihood of the label as the answer to the classify prompt (`label_continuations`)
    none        sum log p(answer | prompt): favours short, frequent labels and whatever the prompt primes
    mean        the same per answer token (length-normalised)
    prior       minus the label's log-likelihood after content-free inputs ("N/A", ...): contextual
                calibration / domain-conditional PMI — removes each label's prior
    prior_mean  `prior` per answer token (length-normalised PMI)
    channel: the log-likelihood of the text after each label's prompt (`channel_prompts`; the noisy
    channel of Min et al. 2022: every label explains the same tokens, so no label prior to remove)
    channel     log p(text | label prompt)
    channel+prior_mean  log_softmax(channel) + CHANNEL_DIRECT_WEIGHT * log_softmax(prior_mean)
    """

    NONE = "none"
    MEAN = "mean"
    PRIOR = "prior"
    PRIOR_MEAN = "prior_mean"
    CHANNEL = "channel"
    CHANNEL_PRIOR_MEAN = "channel+prior_mean"


PRIOR_CALIBRATIONS = (Calibration.PRIOR, Calibration.PRIOR_MEAN, Calibration.CHANNEL_PRIOR_MEAN)
CHANNEL_CALIBRATIONS = (Calibration.CHANNEL, Calibration.CHANNEL_PRIOR_MEAN)
# what the server uses; chosen on validation splits with `training.evaluate` (docs/classify.md)
DEFAULT_CALIBRATION = Calibration.CHANNEL_PRIOR_MEAN
CHANNEL_DIRECT_WEIGHT = 1.5  # the direct scores' weight in channel+prior_mean (validation, docs/classify.md)
LIST_LABELS_UP_TO = 0  # the prompt names the labels when there are at most this many (else: only their answers)
CHANNEL_REQUEST = "Write a short message about: {label}"  # the label's prompt; the text is its answer
CHANNEL_MAX_TOKENS = 64  # the text's first tokens scored after each label prompt (cost: labels x tokens)


def needs_direct(calibration: Calibration, multi_label: bool = False) -> bool:
    """Whether scoring needs the direct log-likelihoods (multi_label always does: its per-label
    probability comes from the direct per-token score)."""
    return multi_label or Calibration(calibration) != Calibration.CHANNEL


def needs_prior(calibration: Calibration, multi_label: bool = False) -> bool:
    """Whether scoring needs the content-free prior (multi_label: for every calibration that removes
    label priors, the channel ones included)."""
    cal = Calibration(calibration)
    return cal in PRIOR_CALIBRATIONS or (multi_label and cal == Calibration.CHANNEL)


def needs_channel(calibration: Calibration, multi_label: bool = False) -> bool:
    """Whether scoring needs the channel log-likelihoods (not for multi_label, which is direct only)."""
    return not multi_label and Calibration(calibration) in CHANNEL_CALIBRATIONS


def label_text(label: str) -> str:
    """How a label reads in prompts and answers: identifier-style labels as words
    ('lost_or_stolen_card' -> 'lost or stolen card'), which a language model scores far more sensibly."""
    return " ".join(str(label).replace("_", " ").split())


@dataclass(frozen=True)
class ClassifySpec:
    """Everything a classify prompt depends on besides the text, in ONE canonical order (labels sorted,
    examples by label then text), so the order a caller lists labels in cannot change the prompt or
    the scores. Hashable: the server caches each spec's content-free prior under it."""

    labels: tuple[str, ...]
    descriptions: tuple[tuple[str, str], ...] = ()  # (label, description), label order
    examples: tuple[tuple[str, str], ...] = ()  # (label, text), label order
    list_labels: bool = False  # name every label in the prompt (else: described labels only)

    @classmethod
    def build(cls, labels: Sequence[str], descriptions: Mapping[str, str] | None = None,
              examples: Mapping[str, Sequence[str]] | None = None,
              list_labels: bool | None = None) -> ClassifySpec:
        """Validate and canonicalise; TaskError names the field at fault. `list_labels` None: name
        the labels in the prompt when there are at most LIST_LABELS_UP_TO of them."""
        clean = sorted(str(label).strip() for label in labels)
        if not clean or any(not label for label in clean):
            raise TaskError("labels must be a non-empty list of non-empty strings", "labels")
        if len(set(clean)) != len(clean):
            raise TaskError("labels must be unique", "labels")
        texts = [label_text(label) for label in clean]
        if len(set(texts)) != len(texts):
            raise TaskError("labels must stay distinct with '_' read as a space", "labels")
        known = set(clean)
        desc = {str(k).strip(): str(v).strip() for k, v in (descriptions or {}).items()}
        _check_keys(desc, known, "descriptions")
        if any(not v for v in desc.values()):
            raise TaskError("descriptions must be non-empty strings", "descriptions")
        shots = {str(k).strip(): [str(t).strip() for t in v] for k, v in (examples or {}).items()}
        _check_keys(shots, known, "examples")
        if any(not t for v in shots.values() for t in v):
            raise TaskError("examples must be non-empty strings", "examples")
        if sum(len(v) for v in shots.values()) > MAX_EXAMPLES:
            raise TaskError(f"at most {MAX_EXAMPLES} examples in all", "examples")
        return cls(tuple(clean), tuple((lab, desc[lab]) for lab in clean if lab in desc),
                   tuple((lab, t) for lab in clean for t in sorted(shots.get(lab, ()))),
                   len(clean) <= LIST_LABELS_UP_TO if list_labels is None else list_labels)

    def messages(self, text: str) -> list[Message]:
        """The prompt for one text; the expected assistant answer is `classify_answer(label)`."""
        return self._messages(_require_text(text))

    def _messages(self, text: str) -> list[Message]:
        parts = []
        described = dict(self.descriptions)
        if self.list_labels or described:
            shown = self.labels if self.list_labels else [lab for lab in self.labels if lab in described]
            lines = [f"- {label_text(lab)}" + (f": {described[lab]}" if lab in described else "") for lab in shown]
            parts.append("Classify the text into one of these labels:\n" + "\n".join(lines))
        else:
            parts.append("Classify the text with a short label.")
        if self.examples:
            parts.append("Examples:\n" + "\n".join(f"Text: {t}\nLabel: {label_text(lab)}" for lab, t in self.examples))
        parts.append(f"Text: {text}\n\nAnswer with the single best label only.")
        return [{"role": "user", "content": "\n\n".join(parts)}]


def _check_keys(mapping: Mapping[str, object], known: set[str], param: str) -> None:
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise TaskError(f"{param} names labels that are not in labels: {unknown[:5]}", param)


def classify_messages(text: str, labels: Sequence[str], descriptions: Mapping[str, str] | None = None,
                      examples: Mapping[str, Sequence[str]] | None = None) -> list[Message]:
    """The classify prompt for `text` (labels in canonical order, whatever order they come in)."""
    return ClassifySpec.build(labels, descriptions, examples).messages(text)


def classify_answer(label: str) -> str:
    """The assistant text for a label (what fine-tuning teaches, what is scored)."""
    return label_text(label)


def label_continuations(tokenizer: Tokenizer, spec: ClassifySpec) -> list[list[int]]:
    """Token ids scored per label, in `spec.labels` order: the answer then <|im_end|> (the answer ends)."""
    return [tokenizer.encode(classify_answer(label)) + [tokenizer.im_end_id] for label in spec.labels]


def content_free_prompts(tokenizer: Tokenizer, spec: ClassifySpec, system_prompt: str | None = None
                         ) -> list[list[int]]:
    """The spec's prompt around each content-free text: what the model answers when the text says nothing."""
    return [render_prompt(tokenizer, spec._messages(text), system_prompt) for text in CONTENT_FREE_TEXTS]


def channel_prompts(tokenizer: Tokenizer, spec: ClassifySpec, system_prompt: str | None = None) -> list[list[int]]:
    """Per label (spec order), the prompt the text is scored after in the channel direction: a request
    for a message about the label (and its description, when the request gives one)."""
    described = dict(spec.descriptions)
    out = []
    for lab in spec.labels:
        topic = label_text(lab) + (f" ({described[lab]})" if lab in described else "")
        out.append(render_prompt(tokenizer, [{"role": "user", "content": CHANNEL_REQUEST.format(label=topic)}],
                                 system_prompt))
    return out


def channel_continuation(tokenizer: Tokenizer, text: str) -> list[int]:
    """What the channel direction scores after each label prompt: the text's first CHANNEL_MAX_TOKENS
    tokens, then <|im_end|> when the text ended within them."""
    ids = tokenizer.encode(_require_text(text))
    return ids[:CHANNEL_MAX_TOKENS] if len(ids) > CHANNEL_MAX_TOKENS else ids + [tokenizer.im_end_id]


def content_free_prior(logliks: Sequence[Sequence[float]]) -> list[float]:
    """Per label: log of the mean probability of its answer over the content-free inputs."""
    return [_logmeanexp(column) for column in zip(*logliks, strict=True)]


def label_scores(loglik: Sequence[float] | None, lengths: Sequence[int], prior: Sequence[float] | None,
                 calibration: Calibration, channel: Sequence[float] | None = None) -> list[float]:
    """Calibrated scores (higher is better), one per label; see `Calibration`. `loglik` (the direct
    log-likelihoods) may be None for `channel`; `channel` is needed by the channel calibrations."""
    cal = Calibration(calibration)
    if cal in CHANNEL_CALIBRATIONS:
        if channel is None:
            raise ValueError(f"calibration {cal.value!r} needs the channel log-likelihoods")
        if cal == Calibration.CHANNEL:
            return list(channel)
        direct = _log_softmax(label_scores(loglik, lengths, prior, Calibration.PRIOR_MEAN))
        return [c + CHANNEL_DIRECT_WEIGHT * d for c, d in zip(_log_softmax(channel), direct, strict=True)]
    if loglik is None:
        raise ValueError(f"calibration {cal.value!r} needs the direct log-likelihoods")
    if cal in PRIOR_CALIBRATIONS:
        if prior is None:
            raise ValueError(f"calibration {cal.value!r} needs the content-free prior")
        loglik = [v - p for v, p in zip(loglik, prior, strict=True)]
    if cal in (Calibration.MEAN, Calibration.PRIOR_MEAN):
        return [v / n for v, n in zip(loglik, lengths, strict=True)]
    return list(loglik)


def label_probabilities(loglik: Sequence[float] | None, lengths: Sequence[int], prior: Sequence[float] | None,
                        calibration: Calibration, multi_label: bool = False,
                        channel: Sequence[float] | None = None) -> list[float]:
    """Single-label: softmax over the calibrated scores (sums to 1). Multi-label: each label on its own,
    from its direct per-token score: exp(mean log p) in (0, 1] without a prior; with one, the sigmoid
    of the per-token PMI, where 0.5 means "the text makes this label no likelier than no text does"."""
    cal = Calibration(calibration)
    if multi_label:
        assert loglik is not None, "multi_label needs the direct log-likelihoods"
        with_prior = needs_prior(cal, multi_label=True)
        per_token = label_scores(loglik, lengths, prior, Calibration.PRIOR_MEAN if with_prior else Calibration.MEAN)
        return [_sigmoid(s) if with_prior else math.exp(s) for s in per_token]
    scores = label_scores(loglik, lengths, prior, cal, channel)
    return [math.exp(v) for v in _log_softmax(scores)]


def rank_labels(labels: Sequence[str], probs: Sequence[float]) -> list[tuple[str, float]]:
    """(label, probability), best first; ties keep the labels' canonical order (stable sort)."""
    return sorted(zip(labels, probs, strict=True), key=lambda lp: -lp[1])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _log_softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def _logmeanexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))
