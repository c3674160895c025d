"""Streamed chat completions: each choice's chunks, with tool calls as OpenAI deltas."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from gateway.protocol import ChatCompletionRequest
from gateway.tool_formats import FORMATS, ToolFormat
from strata.engine.request import RequestOutput

# the head of a forced call, as its grammar lays it out: {"name": "<tool>", "arguments":
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class CallStream:
    """One forced call, `{"name": ..., "arguments": ...}` (its JSON-schema grammar fixes the
    shape and the key order). Its id and name go out once the name is complete; then the
    arguments' text as it comes, holding back trailing `}` and spaces, which may be the
    call's own closing brace until more text follows."""

    def __init__(self) -> None:
        self.text = ""
        self.sent: int | None = None  # where the arguments' text not yet sent starts

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        """Deltas for the new text (final: the call is complete)."""
        self.text += text
        out: list[dict[str, Any]] = []
        if self.sent is None:
            head = _HEAD.match(self.text)
            if head is None or head.end() == len(self.text):  # spaces may still come
                return out
            self.sent = head.end()
            name = json.loads(head.group(1))
            out.append(
                {
                    "index": 0,
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            )
        body = self.text.rstrip()
        if final and body.endswith("}"):
            end = len(body[:-1].rstrip())  # all but the call's closing brace
        else:
            end = len(self.text.rstrip(" \t\r\n}"))
        if end > self.sent:
            out.append({"index": 0, "function": {"arguments": self.text[self.sent : end]}})
            self.sent = end
        return out


class ChatStream:
    """The chunks of one streamed chat completion, choice by choice (`render`, called with
    each event of choice i). Without tools: the text as it comes. With tools: a reply that
    may be calls (it begins as the tool format's calls do: fmt.may_call) is held until it
    is known, and sent as tool_calls deltas (and any content before them) if it is; one
    that begins otherwise streams as content (calls after content are not looked for in a
    stream). A forced single call (its grammar guarantees it) streams its name and then
    its arguments as they are generated."""

    def __init__(
        self, body: ChatCompletionRequest, head: dict[str, Any], fmt: ToolFormat = FORMATS["json"]
    ) -> None:
        self.body, self.head, self.fmt = body, head, fmt
        self.started: set[int] = set()
        self.held: dict[int, str] = {}
        self.settled: set[int] = set()
        self.forced = bool(body.forced_tools()) and not body.parallel_tool_calls
        self.calls: dict[int, CallStream] = {}

    def chunk(self, i: int, delta: dict[str, Any], finish: str | None = None) -> Any:
        return {**self.head, "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}

    def render(self, i: int, ev: RequestOutput) -> list[Any]:
        out: list[Any] = []
        if i not in self.started:
            self.started.add(i)
            out.append(self.chunk(i, {"role": "assistant", "content": ""}))
        text, finish = ev.text, ev.finish_reason
        if self.forced:
            return out + self._forced_call(i, text, finish)
        if self.body.tools_on and i not in self.settled:
            self.held[i] = self.held.get(i, "") + text
            if self.fmt.may_call(self.held[i]) and finish is None:
                return out  # may still be calls
            text = self.held.pop(i)
            self.settled.add(i)
            found = self.body.tool_calls(text, self.fmt) if finish == "stop" else None
            if found is not None:
                content, calls = found
                deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                if content:
                    out.append(self.chunk(i, {"content": content}))
                return [
                    *out,
                    self.chunk(i, {"tool_calls": deltas}),
                    self.chunk(i, {}, "tool_calls"),
                ]
        if text or finish:
            out.append(self.chunk(i, {"content": text} if text else {}, finish))
        return out

    def _forced_call(self, i: int, text: str, finish: str | None) -> list[Any]:
        call = self.calls.setdefault(i, CallStream())
        out = [self.chunk(i, {"tool_calls": [d]}) for d in call.feed(text, finish == "stop")]
        if finish and call.sent is None:  # cut before the call's name was complete
            out.append(self.chunk(i, {"content": call.text}, finish))
        elif finish:
            out.append(self.chunk(i, {}, "tool_calls" if finish == "stop" else finish))
        return out
