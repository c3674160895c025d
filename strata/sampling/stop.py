"""Stop strings over streamed text, never split across the chunks handed to a client."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text deltas; get back the text that is safe to emit.

    NOTE: a tail of the text that could be the start of a stop string is held back until
    the next delta decides it, so a client never sees part of a stop string.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + delta
        hits = [(text.find(s), s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            self.pending = ""
            return text[: min(pos for pos, _ in hits)]
        hold = self._held_tail(text)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back text, at the end of a generation that did not hit a stop string."""
        text, self.pending = self.pending, ""
        return "" if self.stopped else text

    def _held_tail(self, text: str) -> int:
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
