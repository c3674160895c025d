"""Request: one generation's tokens, pages and progress, and what it tells its caller."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strata.engine.ngram import NgramDrafter
from strata.grammar.constraint import Constraint
from strata.sampling.params import SamplingParams
from strata.sampling.stop import StopMatcher
from strata.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:  # fronts (gateway, cache service) import this module, never torch
    import torch

    from strata.kv.mover import LoadPlan


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # pages sparse decode skipped / pages it considered, over the steps, layers and KV heads
    # of the request's decode with at least --sparse-min-context tokens (0.0 when none)
    attention_sparsity_ratio: float = 0.0
    queue_seconds: float = 0.0  # from arrival to its first admission (pages given)
    # of cached_tokens: loaded from the host tier (L2) and from the L3 store; the rest were in
    # L1, and prompt_tokens - cached_tokens were computed
    l2_tokens: int = 0
    l3_tokens: int = 0

    def by_tier(self) -> dict[str, int]:
        """Where each prompt token came from: L1, L2, L3, or computed."""
        l1 = self.cached_tokens - self.l2_tokens - self.l3_tokens
        computed = self.prompt_tokens - self.cached_tokens
        return {"l1": l1, "l2": self.l2_tokens, "l3": self.l3_tokens, "computed": computed}


@dataclass
class RequestOutput:
    """One streamed event: new tokens and text since the last event, and the end if any."""

    rid: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
    usage: Usage | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    # with params.logprob_start_len >= 0, on the first event: the logprob of each prompt
    # token from that position on (None for position 0, which nothing predicts)
    input_logprobs: list[float | None] | None = None
    # split mode, on the first event of a request whose prompt KV came from a prefill worker
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0


@dataclass(frozen=True)
class RemoteFill:
    """What a prefill worker hands back (split mode): its first sampled token; the prompt's
    KV has landed in the pages the decode worker reserved."""

    token: int
    cached_tokens: int  # prompt tokens the prefill worker found in its cache
    logprob: float | None = None
    l2_tokens: int = 0  # of cached_tokens: loaded from its L2, and from L3
    l3_tokens: int = 0
    top_logprobs: dict[int, float] | None = None
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0


# (reserved pages, cancelled) -> RemoteFill; runs off the engine thread and may block
KVSource = Callable[[list[int], threading.Event], RemoteFill]


class Status(enum.Enum):
    """Where a request is; the scheduler moves it (and only the scheduler)."""

    WAITING = "waiting"  # queued, or preempted: holds no pages
    RUNNING = "running"  # admitted: holds pages (a remote one waits for its KV in them)
    FINISHED = "finished"  # ended (finish_reason says how); its pages are released or held


@dataclass(eq=False)  # a request is itself: `in` and remove() compare identities
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[RequestOutput], object]
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # page table: cached pages, then own pages
    num_shared_pages: int = 0  # leading pages owned by the radix cache (locked by cache_node)
    # pages[num_shared_pages:behind_window] went back to the pool: every layer's window has
    # passed them (their ids stay in the table, never read again)
    behind_window: int = 0
    cache_node: int | None = None
    num_cached: int = 0  # prompt tokens served from the cache at (last) admission
    cached_by_tier: tuple[int, int] = (0, 0)  # of num_cached: loaded from L2, from L3
    num_computed: int = 0  # tokens of fill_ids whose KV is in pages (the scheduler's)
    segment_ends: tuple[int, ...] = ()  # where its radix segments of pages end (sparse decode)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # set with Status.FINISHED
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    stop: StopMatcher | None = None
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # first admission
    deadline: float = float("inf")  # monotonic time it is aborted at (--request-timeout)
    first_token_at: float | None = None
    matcher: Any = None  # xgrammar GrammarMatcher of a constrained request
    input_logprobs: dict[int, float] = field(default_factory=dict)  # prompt position -> logprob
    kv_source: KVSource | None = None  # split mode: the prompt's KV comes from a prefill worker
    hold: bool = False  # prefill role: keep the pages after the first token, until released
    # scheduler bookkeeping
    admitted: bool = False  # admitted once (its prompt lookup is counted then)
    match_len: int = 0  # cached prefix length when the waiting queue was last ordered
    loads_planned: bool = False  # lower tiers asked for its prefix since it last waited
    loads: list[LoadPlan] = field(default_factory=list)  # loads it may still wait for
    load_deadline: float = 0.0  # when it stops waiting for L3 loads
    loaded_spans: list[tuple[str, int, int]] = field(default_factory=list)  # (tier, start, end)
    # split mode, decode role
    cancel: threading.Event | None = None  # set to stop its kv_source
    transfer: tuple[int, float] | None = None  # (bytes, seconds) of its KV transfer
    # sparse decode: pages x KV heads x layers skipped and considered, over its steps
    sparse_skipped: int = 0
    sparse_considered: int = 0
    # fetch on select (engine/offload.py): per page, the last step sparse decode kept it
    # (None until it decodes sparsely), and how many of its pages are L2 pages of its own
    selected_at: list[int] | None = None
    num_demoted: int = 0
    drafter: NgramDrafter | None = None  # n-gram speculation: its tokens' index
    session: SessionRef | None = None  # strata.engine.sessions: pinned when it ends

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            import torch

            self.generator = torch.Generator().manual_seed(self.params.seed)
        self.stop = StopMatcher(self.params.stop)

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV the request needs: the prompt and all but the newest output."""
        return self.prompt_ids + self.output_ids

    @property
    def num_fill(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return self.num_fill - self.num_computed

    @property
    def decoding(self) -> bool:
        """The prompt's KV is computed; what remains are generated (or forced) tokens."""
        return self.num_computed >= len(self.prompt_ids) and self.remaining >= 1

    @property
    def awaiting_kv(self) -> bool:
        """Admitted with pages reserved while its kv_source runs (cleared when it ends)."""
        return self.kv_source is not None and bool(self.pages)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def resume(self, output_ids: Sequence[int]) -> None:
        """Go on after output_ids, which another engine generated and streamed (request
        migration). The request then stands as if preempted after them (its first fill
        computes their KV too), its detokenizer, stop strings, grammar and seeded generator
        advanced past them (one draw per token), so it emits what the other engine would
        have emitted next. ValueError when the grammar refuses one of them."""
        for t in output_ids:
            if self.matcher is not None and not self.matcher.accept_token(t):
                raise ValueError(f"resumed token {t} is not allowed by the request's grammar")
            if self.detok is not None and self.stop is not None:
                self.stop.feed(self.detok.push(t))
            if self.generator is not None and not self.params.greedy:
                from strata.sampling.sampler import skip_draw

                skip_draw(self.generator)
        self.output_ids = list(output_ids)

    def usage(self) -> Usage:
        ratio = self.sparse_skipped / self.sparse_considered if self.sparse_considered else 0.0
        queued = (self.admitted_at or time.monotonic()) - self.arrival
        # the cached prefix may reach into the output (preempted or resumed): count the prompt's
        cached = min(self.num_cached, len(self.prompt_ids))
        l3 = min(self.cached_by_tier[1], cached)
        l2 = min(self.cached_by_tier[0], cached - l3)
        return Usage(len(self.prompt_ids), len(self.output_ids), cached, ratio, queued, l2, l3)


class ContextLengthError(ValueError):
    pass


def check_length(prompt_len: int, max_context: int, max_new_tokens: int = 0) -> None:
    """Raise ContextLengthError when the prompt cannot fit in the model's context."""
    if prompt_len == 0:
        raise ContextLengthError("the prompt is empty")
    if prompt_len + max(max_new_tokens, 1) > max_context:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens plus {max(max_new_tokens, 1)} new tokens "
            f"exceeds the context length of {max_context}"
        )


@dataclass(frozen=True)
class SessionRef:
    """The session a request belongs to; replace: forget the session's other sequences."""

    id: str
    replace: bool = False


@dataclass(frozen=True)
class Checked:
    """A request that passed its front's checks (Limits.check; check_request and
    check_length at the split gateway). Engines and backends take this type and do not check
    it again; only their admission bound (Overloaded) is a question of the moment."""

    prompt_ids: list[int]
    params: SamplingParams
    # request migration: tokens another engine already generated and streamed; this one
    # goes on after them (Request.resume)
    resume_ids: tuple[int, ...] = ()
    session: SessionRef | None = None  # a session's request: pinned when it ends

    def resumed(self, num_prompt: int) -> Checked:
        """This request checked as one prompt, split: its first num_prompt tokens are the
        prompt, the rest were generated elsewhere (so every id was checked, and the length)."""
        if not 0 < num_prompt <= len(self.prompt_ids):
            raise ValueError("the prompt must be a non-empty prefix of the checked ids")
        resume = tuple(self.prompt_ids[num_prompt:])
        if len(resume) >= self.params.max_new_tokens:
            raise ValueError(
                f"{len(resume)} resumed tokens leave none of max_new_tokens "
                f"({self.params.max_new_tokens}) to generate"
            )
        return Checked(self.prompt_ids[:num_prompt], self.params, resume, self.session)


@dataclass(frozen=True)
class Limits:
    """An engine's fixed figures that a front checks each request against, once."""

    max_context: int
    vocab_size: int
    page_size: int
    num_pages: int
    eos_token_ids: tuple[int, ...] = ()
    checkpoint: Any = None  # the model's folder (its tokenizer)

    def check(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        compile_grammar: Callable[[Constraint], object],
    ) -> Checked:
        """The request, checked; ValueError for one that can never run."""
        check_length(len(prompt_ids), self.max_context)
        check_request(prompt_ids, params, self.vocab_size, compile_grammar)
        if -(-(len(prompt_ids) + 1) // self.page_size) > self.num_pages:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens needs more KV pages than the pool holds "
                f"({self.num_pages} pages of {self.page_size})"
            )
        return Checked(list(prompt_ids), params)


class Overloaded(Exception):
    """The server holds as many requests as it may queue: try again later (HTTP 429,
    gRPC RESOURCE_EXHAUSTED)."""

    retry_after = 1  # seconds


def check_request(
    prompt_ids: Sequence[int],
    params: SamplingParams,
    vocab_size: int,
    compile_grammar: Callable[[Constraint], object],
) -> None:
    """The checks any front can make without the engine's memory: token ids, logprob range,
    and that the constraint compiles (GrammarError names the problem)."""
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t, _ in params.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    if params.logprob_start_len >= len(prompt_ids):
        raise ValueError(
            f"logprob_start_len ({params.logprob_start_len}) must be less than the "
            f"prompt length ({len(prompt_ids)})"
        )
    if params.constraint is not None:
        compile_grammar(params.constraint)
