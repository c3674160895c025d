"""Prompt-token logprobs (params.logprob_start_len >= 0): which chunks need all-position
logits, and recording them on their requests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strata.batch import tail_rows
from strata.engine.scheduler import ScheduledChunk


def wants_input_logprobs(c: ScheduledChunk) -> bool:
    start = c.req.params.logprob_start_len
    return start >= 0 and c.start < len(c.req.prompt_ids)


def collect_input_logprobs(chunks: Sequence[ScheduledChunk], logits: torch.Tensor) -> torch.Tensor:
    """Record prompt-token logprobs from all-position logits; return each chunk's last
    logit_rows rows (what sampling needs). Position p's logits give the logprob of token
    p + 1."""
    ends = torch.tensor([c.length for c in chunks]).cumsum(0)
    for c, end in zip(chunks, ends.tolist()):
        if not wants_input_logprobs(c):
            continue
        req = c.req
        first = max(req.params.logprob_start_len, 1)  # first position to score
        lo = max(first - 1, c.start)  # first chunk position whose logits we need
        hi = min(c.start + c.length, len(req.prompt_ids) - 1)  # exclusive
        if lo >= hi:
            continue
        rows = logits[end - c.length + (lo - c.start) : end - c.length + (hi - c.start)]
        targets = torch.tensor(req.prompt_ids[lo + 1 : hi + 1])
        lp = rows.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        for pos, value in zip(range(lo + 1, hi + 1), lp.tolist()):
            req.input_logprobs[pos] = value
    return logits[tail_rows([c.length for c in chunks], [c.logit_rows for c in chunks])]
