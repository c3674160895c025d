"""Jump-forward decoding: when the grammar admits exactly one continuation, append its
tokens instead of sampling a step for each."""

from __future__ import annotations

from typing import Any


def jump_forward(matcher: Any, tokenizer: Any, token: int, room: int) -> list[int]:
    """The tokens to append in place of the just-accepted `token`: [token] itself, or the
    retokenized token + forced text (at most `room` tokens), already fed to the matcher.

    NOTE: the sampled token is retokenized together with the forced text, so the model sees
    the tokens it would have produced; its KV is not computed yet, so replacing it costs
    nothing. The last token is left to the model: the text after it may merge with it.
    """
    try:
        jump = matcher.find_jump_forward_string()
    except UnicodeDecodeError:  # the forced bytes end inside a character: no jump this time
        return [token]
    if not jump:
        return [token]
    text = tokenizer.decode([token]) + jump
    ids = list(tokenizer.encode(text, add_special_tokens=False))[:-1][:room]
    if len(ids) < 2 or not text.startswith(tokenizer.decode(ids)):
        return [token]
    matcher.rollback(1)
    accepted = 0
    for t in ids:
        if not matcher.accept_token(t):
            break
        accepted += 1
    if accepted < len(ids):  # the retokenized text strays from the grammar: keep token
        matcher.rollback(accepted)
        matcher.accept_token(token)
        return [token]
    return ids
