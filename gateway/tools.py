"""A forced tool call streamed as OpenAI `tool_calls` deltas while it is generated."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

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
            out.append({"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": name, "arguments": ""}})  # fmt: skip
        body = self.text.rstrip()
        if final and body.endswith("}"):
            end = len(body[:-1].rstrip())  # all but the call's closing brace
        else:
            end = len(self.text.rstrip(" \t\r\n}"))
        if end > self.sent:
            out.append({"index": 0, "function": {"arguments": self.text[self.sent : end]}})
            self.sent = end
        return out
