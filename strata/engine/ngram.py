"""N-gram drafts (prompt lookup): the tokens that followed the latest earlier occurrence of
a sequence's last few tokens. Free to propose, and often right where an answer repeats its
prompt or itself (multi-turn chat, agents, structured output); the target model verifies
every draft token, so greedy output is unchanged."""

from __future__ import annotations

from collections.abc import Sequence

MIN_MATCH = 2  # a single matching token drafts too often wrongly (bench/ngram acceptance)
MAX_MATCH = 4
MAX_LENGTH = 16  # of a draft
# NOTE: the index holds ~3 entries a token (~0.4 KB; 0.9 us to add, measured): it covers a
# prompt's last PROMPT_WINDOW tokens and the whole output, and catches up at most
# SYNC_TOKENS a step, so a long prompt never stalls the step loop
PROMPT_WINDOW = 8192
SYNC_TOKENS = 1024


class NgramDrafter:
    """One sequence's n-gram index, fed its tokens as they come (prompt, then outputs)."""

    def __init__(self, min_match: int = MIN_MATCH, max_match: int = MAX_MATCH) -> None:
        assert 1 <= min_match <= max_match
        self.min_match, self.max_match = min_match, max_match
        self.length = MAX_LENGTH  # of the next draft: adapts to what the model accepts
        self.tokens: list[int] = []
        self.synced = -1  # tokens of prompt + output seen (-1: none yet)
        # n-gram -> the position after its latest occurrence whose next token is known
        self._next: dict[tuple[int, ...], int] = {}

    def sync(self, prompt: Sequence[int], output: Sequence[int]) -> bool:
        """Index what the sequence (prompt + output) gained since the last call; False while
        the index is behind (no draft yet)."""
        if self.synced < 0:
            self.synced = max(0, len(prompt) - PROMPT_WINDOW)
        total = len(prompt) + len(output)
        end = min(total, self.synced + SYNC_TOKENS)
        n = len(prompt)
        if self.synced < n:
            self.extend(prompt[self.synced : min(end, n)])
        if end > n:
            self.extend(output[max(self.synced, n) - n : end - n])
        self.synced = end
        return end == total

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the sequence."""
        seq, index = self.tokens, self._next
        lo, hi = self.min_match, self.max_match
        # NOTE: the n-grams ending at the last token are indexed only once the token after
        # it arrives, so a lookup of the sequence's own tail finds an earlier occurrence.
        for t in tokens:
            end = len(seq)  # n-grams ending at end - 1 now have a next token: t
            for n in range(lo, min(hi, end) + 1):
                index[tuple(seq[end - n : end])] = end
            seq.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens (and this sequence's draft length) that followed the longest
        match (max_match down to min_match tokens) of the sequence's tail; [] when there is
        none."""
        seq, k = self.tokens, min(k, self.length)
        for n in range(min(self.max_match, len(seq)), self.min_match - 1, -1):
            at = self._next.get(tuple(seq[len(seq) - n :]))
            if at is not None:
                return seq[at : at + k]
        return []

    def verified(self, drafted: int, accepted: int) -> None:
        """The model kept `accepted` of a draft's `drafted` tokens: the next draft may be one
        longer after a whole one, else one past what it kept (a sequence whose drafts keep
        failing drafts a single token, which costs a step little)."""
        self.length = min(self.length + 1, MAX_LENGTH) if accepted == drafted else accepted + 1
