"""Tool calls: the ONE place the tool-call format lives — how tools are shown to the model, how a call
reads in its output, the grammar format that constrains it, and the parser that reads calls back.

    tools = [ToolSpec.build("get_weather", "Weather now", {"type": "object", ...}), ...]
    messages = render_messages(chat, tools, system_prompt)          # ChatML messages for render_chat
    fmt = ToolCallFormat.build(tools, required=True, parallel=False)  # SamplingParams.response_format
    parsed = parse(text)                                             # content + [Call(name, arguments)]
    parser = CallParser(); events = parser.feed(delta) + parser.finish()   # the same, streamed

The format is Hermes / Qwen2.5 style on ChatML, because SmolLM2-135M-Instruct's chat template has no
tool syntax of its own (it renders every message as `<|im_start|>role\\ncontent<|im_end|>`): the tools
go into the system message inside <tools></tools>, each call the model makes is

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(one line of JSON, ", " and ": ", no free whitespace: the rule of model.grammar's JSON), several calls
are separated by one newline, and a tool's result comes back as a message with role "tool" whose
content is wrapped in <tool_response></tool_response>. Decoding is constrained by model.grammar with a
`ToolCallFormat`: "required" / a named function allow nothing but calls (at least one); "auto" allows
free text and, once the model writes `<tool_call>`, only a well-formed call to a declared tool.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TRIGGER = "<tool_call>"
CALL_OPEN = TRIGGER + "\n"
CALL_CLOSE = "\n</tool_call>"
SEPARATOR = "\n"  # between two calls
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
_HEADER = re.compile(r'\n\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')
_HEADER_MAX = len('\n{"name": "') + 64 + len('", "arguments": ')

Message = dict[str, str]


class ToolError(ValueError):
    """A tool list or tool message that cannot be rendered (a client error); `param` names the field."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call; `parameters_json` is its JSON schema as canonical text."""

    name: str
    description: str
    parameters_json: str

    @classmethod
    def build(cls, name: str, description: str | None, parameters: dict[str, Any] | None,
              where: str = "tools[0]") -> ToolSpec:
        if not NAME_RE.fullmatch(name or ""):
            raise ToolError(f"{where}.function.name must match [a-zA-Z0-9_-]{{1,64}}, got {name!r}")
        schema = {"type": "object", "properties": {}} if parameters is None else parameters
        if not isinstance(schema, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON object")
        return cls(name, description or "", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @property
    def parameters(self) -> dict[str, Any]:
        return json.loads(self.parameters_json)


def check_unique(tools: Sequence[ToolSpec]) -> None:
    names = [t.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ToolError(f"tools has duplicate function names: {dupes}")


# ----------------------------------------------------------------------------
# what the model reads

def tools_text(tools: Sequence[ToolSpec]) -> str:
    """The block appended to the system message: the signatures and how to call them."""
    lines = [json.dumps({"type": "function", "function": {"name": t.name, "description": t.description,
                                                          "parameters": t.parameters}}, ensure_ascii=False)
             for t in tools]
    return ("# Tools\n\nYou may call one or more functions to answer the user. The functions you can call "
            "are listed as JSON signatures inside <tools></tools>:\n<tools>\n" + "\n".join(lines) + "\n</tools>\n\n"
            "To call a function, write its name and its arguments as one JSON object inside <tool_call>"
            "</tool_call> tags:\n" + CALL_OPEN + '{"name": <function-name>, "arguments": <arguments-object>}'
            + CALL_CLOSE)


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it; `arguments` is a JSON text (re-serialized on one line when it parses)."""
    try:
        args = json.dumps(json.loads(arguments), ensure_ascii=False)
    except json.JSONDecodeError:
        args = arguments
    return f'{CALL_OPEN}{{"name": "{name}", "arguments": {args}}}{CALL_CLOSE}'


@dataclass(frozen=True)
class CallIn:
    """A call from the conversation's history (an assistant message's `tool_calls`)."""

    name: str
    arguments: str


@dataclass
class ChatTurn:
    """A chat message as the OpenAI API carries it: content may be empty when `calls` are set; role
    "tool" carries a tool's result."""

    role: str
    content: str = ""
    calls: list[CallIn] = field(default_factory=list)


def render_messages(turns: Sequence[ChatTurn], tools: Sequence[ToolSpec], system_prompt: str | None) -> list[Message]:
    """ChatML messages for model.tokenizer.render_chat: assistant calls written out as calls, tool results
    wrapped in <tool_response>, and (when `tools` is not empty) the tools block appended to the system
    message — the conversation's own, else `system_prompt` (the server's or the tokenizer's default)."""
    out: list[Message] = []
    for turn in turns:
        if turn.role == "assistant" and turn.calls:
            parts = ([turn.content] if turn.content else []) + [call_text(c.name, c.arguments) for c in turn.calls]
            out.append({"role": "assistant", "content": SEPARATOR.join(parts)})
        elif turn.role == "tool":
            out.append({"role": "tool", "content": f"<tool_response>\n{turn.content}\n</tool_response>"})
        else:
            out.append({"role": turn.role, "content": turn.content})
    if tools:
        block = tools_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": f"{system_prompt}\n\n{block}" if system_prompt else block})
    return out


# ----------------------------------------------------------------------------
# what constrains decoding (compiled by model.grammar)

@dataclass(frozen=True)
class ToolCallFormat:
    """Output that may (auto) or must (required) be calls to `tools`, each call's arguments valid for
    its tool's schema. Hashable: model.grammar caches the compiled grammar under it."""

    tools: tuple[ToolSpec, ...]
    required: bool  # nothing but calls, at least one; False: free text, and calls when the model starts one
    parallel: bool  # more than one call allowed

    @classmethod
    def build(cls, tools: Sequence[ToolSpec], required: bool, parallel: bool = True) -> ToolCallFormat:
        if not tools:
            raise ToolError("tools must not be empty when tool_choice is not 'none'")
        check_unique(tools)
        return cls(tuple(tools), required, parallel)

    def call_prefix(self, name: str) -> str:
        return f'{CALL_OPEN}{{"name": "{name}", "arguments": '

    @property
    def call_suffix(self) -> str:
        return "}" + CALL_CLOSE


# ----------------------------------------------------------------------------
# what the model wrote

@dataclass
class Call:
    name: str
    arguments: str = ""  # JSON text, as generated (cut short when the output hit max_tokens)
    complete: bool = False


@dataclass
class Parsed:
    content: str | None
    calls: list[Call]


@dataclass(frozen=True)
class Event:
    """One streamed piece: text ("content"), a call starting ("call": index, name), or a piece of a
    call's arguments ("arguments": index, text)."""

    kind: str
    text: str = ""
    index: int = 0


class CallParser:
    """Incremental reader of model output in this format. Text outside calls is content; whitespace
    between or after calls is dropped; a call is announced once its name is complete, then its
    arguments stream as they are generated. A trigger half written is held back until it resolves."""

    def __init__(self) -> None:
        self._buf = ""
        self._state = "text"  # text | header | args | close
        self._calls: list[Call] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._held_space = ""  # whitespace in text, emitted only when text follows it

    @property
    def calls(self) -> list[Call]:
        return self._calls

    def feed(self, delta: str) -> list[Event]:
        self._buf += delta
        events: list[Event] = []
        while True:
            step = getattr(self, f"_{self._state}")(events)
            if not step:
                return events

    def finish(self) -> list[Event]:
        """The output ended: text held back is content (trailing whitespace only when there is no call)."""
        events: list[Event] = []
        if self._state == "text":
            tail = self._held_space + self._buf if not self._calls else self._buf.rstrip()
            if tail.strip() or (tail and not self._calls):
                events.append(Event("content", tail))
        self._buf = self._held_space = ""
        return events

    def _text(self, events: list[Event]) -> bool:
        at = self._buf.find(TRIGGER)
        if at < 0:
            keep = _partial_suffix(self._buf, TRIGGER)
            self._emit_text(self._buf[:len(self._buf) - keep], events)
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._emit_text(self._buf[:at], events)  # whitespace before the trigger stays held
        self._buf = self._buf[at + len(TRIGGER):]
        self._state = "header"
        return True

    def _emit_text(self, text: str, events: list[Event]) -> None:
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body):]
        if body.strip() or (body and not self._calls):
            events.append(Event("content", body))

    def _header(self, events: list[Event]) -> bool:
        found = _HEADER.match(self._buf)
        if found is None:
            if len(self._buf) >= _HEADER_MAX or not _could_be_header(self._buf):
                # not our syntax (unconstrained output): the trigger was text after all
                events.append(Event("content", self._held_space + TRIGGER + self._buf))
                self._buf, self._state, self._held_space = "", "text", ""
                return True
            return False
        self._held_space = ""  # whitespace before a call is not content
        self._calls.append(Call(found.group(1)))
        events.append(Event("call", found.group(1), len(self._calls) - 1))
        self._buf = self._buf[found.end():]
        self._state, self._depth, self._in_string, self._escaped = "args", 0, False, False
        return True

    def _args(self, events: list[Event]) -> bool:
        used, piece = self._scan()
        if piece:
            self._calls[-1].arguments += piece
            events.append(Event("arguments", piece, len(self._calls) - 1))
        self._buf = self._buf[used:]
        if self._depth == 0 and self._calls[-1].arguments:
            self._state = "close"
            return True
        return False

    def _scan(self) -> tuple[int, str]:
        """(characters of the buffer that belong to the arguments, those characters as valid JSON): up to
        the arguments' closing bracket, else all. A raw control character inside a string (xgrammar's
        strings with a length bound admit them) is written as its JSON escape."""
        out = []
        for i, ch in enumerate(self._buf):
            if self._in_string:
                if ch < " ":
                    ch = json.dumps(ch)[1:-1]
                    self._escaped = False
                else:
                    self._escaped, self._in_string = (False, True) if self._escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    out.append(ch)
                    return i + 1, "".join(out)
            out.append(ch)
        return len(self._buf), "".join(out)

    def _close(self, events: list[Event]) -> bool:
        suffix = "}" + CALL_CLOSE
        if len(self._buf) < len(suffix) and suffix.startswith(self._buf):
            return False
        if self._buf.startswith(suffix):
            self._calls[-1].complete = True
            self._buf = self._buf[len(suffix):]
        self._state = "text"
        return True


def _could_be_header(text: str) -> bool:
    """Could `text` still grow into a call header?"""
    head = '\n{"name": "'
    if len(text) <= len(head):
        return head.startswith(text)
    if not text.startswith(head):
        return False
    rest = text[len(head):]
    name = re.match(r'[a-zA-Z0-9_-]*', rest).group(0)  # type: ignore[union-attr]
    tail = rest[len(name):]
    return '", "arguments": '.startswith(tail) if tail else True


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse(text: str) -> Parsed:
    """The whole output at once (what the non-streamed response reports): the same parser, fed once."""
    parser = CallParser()
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if e.kind == "content")
    return Parsed(content or None, parser.calls)
