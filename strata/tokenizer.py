"""Chat templates and incremental detokenization (text streamed in whole characters)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def chat_prompt_ids(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of messages under the model's chat template, ready for the assistant turn
    (tools: rendered by the template, as the model was trained to see them)."""
    if not getattr(tokenizer, "chat_template", None):
        if tools:
            raise ValueError("this model has no chat template to render tools with")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    else:
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(
                list(messages), tools=tools, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as exc:  # the template's own raise_exception: a bad request
            raise ValueError(f"the model's chat template refused the messages: {exc}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


_SENTINEL = "\x00strata-content\x00"
ROLES = ("system", "user", "assistant")


def chat_roles(tokenizer: Any) -> dict[str, list[str]]:
    """Each role's [begin, end] text under the chat template, for clients (the DSL) that
    build chat prompts as text. Derived by rendering sentinel messages: a role's block is
    what appending its message adds to a rendered system message (so templates that insert
    a default system prompt do not leak it into every role)."""
    if not getattr(tokenizer, "chat_template", None):
        return {r: [f"{r}: ", "\n"] for r in ROLES}

    def render(messages: list[dict[str, str]]) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False))

    roles = {}
    base = [{"role": "system", "content": "x"}]
    head = render(base)
    for role in ROLES:
        msg = {"role": role, "content": _SENTINEL}
        full = render([msg] if role == "system" else [*base, msg])
        block = full if role == "system" else full[len(head) :]
        if (role != "system" and not full.startswith(head)) or _SENTINEL not in block:
            return {r: [f"{r}: ", "\n"] for r in ROLES}
        begin, end = block.split(_SENTINEL, 1)
        roles[role] = [begin, end]
    return roles


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, decoding only a short window.

    NOTE: a token may end inside a multi-byte character; such a tail decodes to U+FFFD and
    is held back until the next token completes it, so no delta ever splits a character.
    The window starts a few tokens back because some tokenizers (SentencePiece) render a
    token differently at the start of a text.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # tokens already turned into emitted text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip
        )
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]
