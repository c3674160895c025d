"""The engine's output stage: the tokens of a scheduled chunk, the step's sampling, each
sampled token through the request's grammar (with jump-forward), stop checks and detokenized
text into one event per step, and a request's end (its pages released or held)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence

import torch

from strata.engine.intake import RequestTable
from strata.engine.request import Request, RequestOutput
from strata.engine.runner import ModelRunner
from strata.engine.scheduler import ScheduledChunk, Scheduler
from strata.grammar.compiler import GrammarCompiler, LazyGrammarCompiler
from strata.grammar.jump import jump_forward
from strata.sampling.sampler import SampleInput, argmax_rows, sample

log = logging.getLogger(__name__)


class Outputs:
    """on_hold: called with a request that ends holding its pages (prefill role)."""

    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        table: RequestTable,
        grammar: LazyGrammarCompiler,
        eos_ids: frozenset[int],
        jump_forward: bool,
        on_hold: Callable[[Request], None],
        on_done: Callable[[Request], None] = lambda req: None,
    ) -> None:
        self.runner, self.scheduler, self.table = runner, scheduler, table
        self.tokenizer = runner.tokenizer
        self._grammar, self.eos_ids, self.jump_forward = grammar, eos_ids, jump_forward
        self.on_hold, self.on_done = on_hold, on_done
        self.jump_forward_tokens = 0  # appended by jump-forward decoding (no step sampled)
        self.draft_tokens = 0  # n-gram speculation: tokens proposed and verified
        self.accepted_tokens = 0  # ... and the model's own (kept)

    @property
    def grammar(self) -> GrammarCompiler:
        """The xgrammar compiler for constrained requests (built on first use)."""
        return self._grammar.get()

    def sample(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> None:
        """Sample the token of each chunk that ends with one (logits: each chunk's
        logit_rows rows), through its grammar's mask, and hand each to on_token; verify
        the drafts."""
        if any(c.draft for c in chunks):
            chunks, logits = self._verify_drafts(chunks, logits)
        rows = [i for i, c in enumerate(chunks) if c.sample]
        if not rows:
            return
        reqs = [chunks[i].req for i in rows]
        picked = logits[rows] if len(rows) < logits.shape[0] else logits  # no copy
        if any(r.matcher is not None for r in reqs):
            self.grammar.mask_logits(picked, [r.matcher for r in reqs])
        out = sample(
            picked, [SampleInput(r.params, r.prompt_ids, r.output_ids, r.generator) for r in reqs]
        )
        for j, req in enumerate(reqs):
            top = None
            if out.top_ids is not None and out.top_logprobs is not None:
                n = req.params.top_logprobs
                top = dict(zip(out.top_ids[j][:n], out.top_logprobs[j][:n]))
            lp = out.logprobs[j] if out.logprobs is not None else None
            self.on_token(req, out.tokens[j], lp, top)

    def _verify_drafts(
        self, chunks: list[ScheduledChunk], logits: torch.Tensor
    ) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """Keep each draft's longest prefix that matches the model's argmax at every
        position, then the model's token after it; returns the other chunks and their rows."""
        ends = list(itertools.accumulate(c.logit_rows for c in chunks))
        # the only pick of a drafting request; every row's (no copy of the drafted rows)
        best = argmax_rows(logits).tolist()
        for c, end in zip(chunks, ends):
            if not c.draft:
                continue
            picks = best[end - c.logit_rows : end]
            n = 0
            while n < len(c.draft) and c.draft[n] == picks[n]:
                n += 1
            self.draft_tokens += len(c.draft)
            self.accepted_tokens += n
            assert c.req.drafter is not None  # it proposed the draft
            c.req.drafter.verified(len(c.draft), n)
            self._emit(c.req, picks[: n + 1], computed=n)
        rest = [end - 1 for c, end in zip(chunks, ends) if not c.draft]
        return [c for c in chunks if not c.draft], logits[rest]

    def _advance_grammar(self, req: Request, token: int) -> list[int] | None:
        """Feed the sampled token to the request's grammar; with jump-forward, replace it by
        the tokens of the only continuation the grammar allows. None: grammar broken."""
        m = req.matcher
        if not m.accept_token(token):
            return None
        if not self.jump_forward or m.is_terminated() or req.params.logprobs:
            return [token]
        room = min(
            req.params.max_new_tokens - len(req.output_ids),
            self.runner.max_context - req.num_fill,
        )
        ids = jump_forward(m, self.tokenizer, token, room)
        self.jump_forward_tokens += len(ids) - 1
        return ids

    def on_token(
        self, req: Request, token: int, logprob: float | None, top: dict[int, float] | None
    ) -> None:
        tokens = [token]
        if req.matcher is not None:
            advanced = self._advance_grammar(req, token)
            if advanced is None:
                self.finish(req, "error", error="internal error: the grammar rejected a token")
                return
            tokens = advanced
        self._emit(req, tokens, logprob, top)

    def _emit(
        self,
        req: Request,
        tokens: Sequence[int],
        logprob: float | None = None,
        top: dict[int, float] | None = None,
        computed: int = 0,
    ) -> None:
        """Append tokens to req's output up to a stop, and send them as one event (the
        last one if it stopped). computed: how many leading tokens already have their KV
        in the pages (verified drafts)."""
        first = req.first_token_at is None
        if first:
            req.first_token_at = time.monotonic()
        p = req.params
        reason = None
        text = ""
        before = len(req.output_ids)
        for t in tokens:
            req.output_ids.append(t)
            if t in p.stop_token_ids or (t in self.eos_ids and not p.ignore_eos):
                reason = "stop"
                break
            if req.detok is not None and req.stop is not None:
                text += req.stop.feed(req.detok.push(t))
                if req.stop.stopped:
                    reason = "stop"
                    break
            if len(req.output_ids) >= p.max_new_tokens or req.num_fill >= self.runner.max_context:
                reason = "length"
                break
        if computed:
            self.scheduler.accept_draft(req, min(computed, len(req.output_ids) - before))
        if reason is not None and reason != "stop" and req.stop is not None:
            text += req.stop.flush()
        event = RequestOutput(
            req.rid,
            req.output_ids[before:],
            text,
            logprobs=[logprob] if logprob is not None else None,
            top_logprobs=[top] if top is not None else None,
        )
        if first and req.transfer is not None:
            event.transfer_bytes, event.transfer_seconds = req.transfer
        if first and p.logprob_start_len >= 0:
            event.input_logprobs = [
                req.input_logprobs.get(i) for i in range(p.logprob_start_len, len(req.prompt_ids))
            ]
        if reason is not None:
            self.finish(req, reason, event)
        else:
            req.sink(event)

    def finish(
        self,
        req: Request,
        reason: str,
        event: RequestOutput | None = None,
        error: str | None = None,
    ) -> None:
        """End a request: its pages released (or held), its last event sent."""
        if req.finished:
            return
        req.finish_reason = reason  # the scheduler marks it FINISHED
        hold = req.hold and reason in ("stop", "length")
        if req.awaiting_kv and req.cancel is not None:  # released when the transfer ends
            req.cancel.set()
        self.scheduler.finish(req, release=not (req.awaiting_kv or hold))
        if hold and req.pages:
            self.on_hold(req)
        self.on_done(req)
        self.table.done(req)
        event = event or RequestOutput(req.rid, [], "")
        event.finish_reason, event.error, event.usage = reason, error, req.usage()
        try:
            req.sink(event)
        except Exception:  # a broken sink must not break the loop
            log.exception("request sink failed")
