"""Every message that crosses a process or rank boundary of the engine, one frozen dataclass
each, handled with `match`:

    front -> engine process   Add | Abort | Call | Stop
    engine process -> front   Ready | Failed | Events | Result
    a Call's query            Stats | FlushCache | AbortNow | OpenSession | CloseSession
                              | SessionContext   (answered by Result.value)
    rank 0 -> ranks 1..N-1    Forward | StopRanks             (broadcast with each step)
    rank 0 <-> a rank's link  LinkCall (a strata.kv.transfer ChannelOp) | LinkReply

They are pickled (multiprocessing pipes, torch.distributed's object broadcast, sockets), so
each holds plain values and the picklable types of strata.engine.request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from strata.engine.request import Checked, Limits, RequestOutput

if TYPE_CHECKING:  # fronts import the messages, never torch
    from strata.batch import SequenceChunk
    from strata.kv.transfer import ChannelOp

# ---- the front and the engine process ---------------------------------------------------


@dataclass(frozen=True)
class EngineStats:
    """What the engine holds and did (the answer to a stats query); a front reads it."""

    running: int
    waiting: int
    pages_total: int
    pages_free: int
    cache: Any  # TreeStats | None
    jump_forward_tokens: int  # tokens appended by jump-forward decoding (no step sampled)
    draft_tokens: int = 0  # n-gram speculation: draft tokens verified
    accepted_tokens: int = 0  # ... and kept (the model's argmax agreed)
    held: int = 0  # prefill role: finished prompts whose pages wait to be pulled
    tiers: dict[str, Any] | None = None  # pages, bytes and traffic per KV tier (with tiers)
    loop_thread: str = ""  # the thread that runs the step loop (stats runs on it)
    memory: dict[str, Any] | None = None  # the runner's MemoryPlan (engine.memory)
    sessions: dict[str, int] | None = None  # open sessions and the L1 pages they pin


@dataclass(frozen=True, slots=True)
class Add:
    """Queue a request the front has checked."""

    rid: str
    request: Checked


@dataclass(frozen=True, slots=True)
class Abort:
    rid: str


@dataclass(frozen=True, slots=True)
class Stats:
    """The engine's EngineStats."""


@dataclass(frozen=True, slots=True)
class FlushCache:
    """Drop every unlocked cached page; the count."""


@dataclass(frozen=True, slots=True)
class AbortNow:
    """Abort between steps; whether the request was there."""

    rid: str


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A session's id (strata.engine.sessions)."""

    ttl: float | None = None
    capacity: int | None = None


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Whether the session was open; its pin is released."""

    id: str


@dataclass(frozen=True, slots=True)
class SessionContext:
    """The tokens a request of the session continues (ValueError: no such session, rid or
    offset, or past its capacity with `new` more tokens)."""

    id: str
    rid: str | None = None
    offset: int | None = None
    new: int = 0


Query = Stats | FlushCache | AbortNow | OpenSession | CloseSession | SessionContext


@dataclass(frozen=True, slots=True)
class Call:
    """A query run on the engine's thread between steps, answered by Result(call_id)."""

    call_id: int
    query: Query


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Ready:
    limits: Limits


@dataclass(frozen=True, slots=True)
class Failed:
    """The engine could not start."""

    message: str


@dataclass(frozen=True, slots=True)
class Events:
    """One step's events, of every request that had one."""

    outputs: list[RequestOutput]


@dataclass(frozen=True, slots=True)
class Result:
    call_id: int
    ok: bool
    value: Any  # the answer, or the error's (type name, text)


ToEngine = Add | Abort | Call | Stop
ToFront = Ready | Failed | Events | Result

# ---- tensor-parallel ranks ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forward:
    """Run this step's forward (rank 0 runs the same one)."""

    chunks: list[SequenceChunk]
    all_logits: bool


@dataclass(frozen=True, slots=True)
class StopRanks:
    pass


@dataclass(frozen=True, slots=True)
class LinkCall:
    """A KV channel operation for one rank, answered by LinkReply(call_id)."""

    call_id: int
    op: ChannelOp


@dataclass(frozen=True, slots=True)
class LinkReply:
    call_id: int
    ok: bool
    value: Any
