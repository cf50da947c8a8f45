"""The task prompts: the ONE place the wording for chat / summarize / translate / classify lives.

Fine-tuning (`training.finetune`) renders its examples with these functions and the server
(`app/`) renders its requests with the same ones, so training and serving never drift apart.
Each function returns a list of chat messages (`{"role": ..., "content": ...}`) for
`model.tokenizer.render_chat`; none of them adds a system message, so the tokenizer's default
system prompt (if any) applies exactly as it does for plain chat.

    messages = classify_messages("I lost my card", ["lost_or_stolen_card", "card_arrival"])
    # score each label: sum log p(classify_answer(label) + <|im_end|> | rendered prompt)

Pure Python, no torch: the prompts are short and plain so an instruct model such as
SmolLM2-135M-Instruct does reasonably zero-shot and a fine-tuned model learns them quickly.
"""

from __future__ import annotations

from collections.abc import Sequence

Message = dict[str, str]

# task names (used as keys in checkpoint metadata `labels: {task: [...]}` and in SFT mixtures)
CHAT = "chat"
SUMMARIZE = "summarize"
TRANSLATE = "translate"
CLASSIFY = "classify"
TASKS: tuple[str, ...] = (CHAT, SUMMARIZE, TRANSLATE, CLASSIFY)

# language codes the prompts spell out in words; any other value is used as given
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "ja": "Japanese", "ko": "Korean",
    "zh": "Chinese", "zh-hans": "Simplified Chinese", "zh-hant": "Traditional Chinese",
    "ar": "Arabic", "hi": "Hindi", "tr": "Turkish", "pl": "Polish", "sv": "Swedish",
}


class TaskError(ValueError):
    """A task request that cannot be turned into a prompt (empty text, no labels, ...)."""


def language_name(code_or_name: str) -> str:
    """'de' -> 'German'; a name or an unknown code is returned stripped, unchanged."""
    value = code_or_name.strip()
    if not value:
        raise TaskError("language must not be empty")
    return LANGUAGE_NAMES.get(value.lower(), value)


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
        raise TaskError(f"max_words must be a positive integer, got {max_words!r}")
    limit = f" in at most {max_words} words" if max_words else ""
    return [{"role": "user",
             "content": f"Summarize the following text{limit}. Reply with the summary only.\n\n{text}"}]


def translate_messages(text: str, target_lang: str, source_lang: str | None = None) -> list[Message]:
    """Prompt asking to translate `text` into `target_lang` (a code like 'de' or a name).

    The expected assistant answer is the translation only."""
    text = _require_text(text)
    target = language_name(target_lang)
    source = f" from {language_name(source_lang)}" if source_lang else ""
    return [{"role": "user",
             "content": f"Translate the following text{source} to {target}. "
                        f"Reply with the translation only.\n\n{text}"}]


def classify_messages(text: str, labels: Sequence[str]) -> list[Message]:
    """Prompt listing the candidate `labels` and asking for the single best one for `text`.

    The expected assistant answer is exactly `classify_answer(label)`; the server ranks labels by
    the log-likelihood of that answer, so the wording here matters for zero-shot accuracy."""
    text = _require_text(text)
    clean = [str(label).strip() for label in labels]
    if not clean or any(not label for label in clean):
        raise TaskError("labels must be a non-empty list of non-empty strings")
    if len(set(clean)) != len(clean):
        raise TaskError("labels must be unique")
    options = "\n".join(f"- {label}" for label in clean)
    return [{"role": "user",
             "content": f"Classify the text into one of these labels:\n{options}\n\n"
                        f"Text: {text}\n\nAnswer with the single best label only."}]


def classify_answer(label: str) -> str:
    """The assistant text for a label: the label itself (what fine-tuning teaches, what is scored)."""
    return str(label).strip()
