"""Model output -> OpenAI's tool-call shapes: `message.tool_calls` for a whole response, and the
`delta.tool_calls` pieces of a stream (the call's index, id, type and name first, then its arguments in
chunks), with `finish_reason: "tool_calls"` when a call was made. The syntax is model.tool_calls'."""

from __future__ import annotations

import secrets

from pydantic import JsonValue

from model import tool_calls

from ..protocol import ChatCompletionMessage, FunctionCall, ToolCall


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """OpenAI reports a response that ended after its calls as "tool_calls" (a cut-off one stays "length")."""
    return "tool_calls" if made_calls and reason == "stop" else reason


def message(text: str, reason: str | None, tools: bool) -> tuple[ChatCompletionMessage, str | None]:
    """The assistant message and finish_reason of a whole response; `tools`: the request could call."""
    if not tools:
        return ChatCompletionMessage(content=text), reason
    parsed = tool_calls.parse(text)
    calls = [ToolCall(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.calls]
    return ChatCompletionMessage(content=parsed.content, tool_calls=calls or None), finish_reason(reason, bool(calls))


class StreamedCalls:
    """Text deltas of one streamed response -> OpenAI `delta` dicts (content and tool_calls pieces)."""

    def __init__(self) -> None:
        self.parser = tool_calls.CallParser()
        self._ids: list[str] = []

    def feed(self, text: str) -> list[dict[str, JsonValue]]:
        return [self._delta(e) for e in self.parser.feed(text)]

    def finish(self) -> list[dict[str, JsonValue]]:
        return [self._delta(e) for e in self.parser.finish()]

    @property
    def made_calls(self) -> bool:
        return bool(self.parser.calls)

    def _delta(self, event: tool_calls.Event) -> dict[str, JsonValue]:
        if event.kind == "content":
            return {"content": event.text}
        if event.kind == "call":
            self._ids.append(call_id())
            return {"tool_calls": [{"index": event.index, "id": self._ids[event.index], "type": "function",
                                    "function": {"name": event.text, "arguments": ""}}]}
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
