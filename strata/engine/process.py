"""The engine in a process of its own, its step loop on that process's main thread.

A step loop on a side thread shares the GIL with the HTTP and gRPC fronts and, on CPU,
costs torch about 1.7x per step (measured: 25 ms per token on the main thread, 40-45 on a
thread). So `strata serve` runs two processes, as SGLang does:

    front (REST, gRPC, chat template, validation)  --pipe-->  engine (scheduler + runner)

`EngineClient` is the front's side: it validates each request once against the engine's
`Limits`, counts what it holds (the overload bound), streams each request's events and
forwards the few calls the fronts make (stats, flush, abort). `engine_main` is the engine's
side. One message per boundary crossing (strata.engine.messages), pickled over a
multiprocessing pipe each way:

    front -> engine   Add(rid, Checked) | Abort(rid) | Call(call_id, query) | Stop()
    engine -> front   Ready(Limits) | Failed(message)
                      | Events([RequestOutput, ...])   one per step, every request's
                      | Result(call_id, ok, value)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import struct
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Future
from contextlib import aclosing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from strata.config import (
    HiCacheConfig,
    KVPoolConfig,
    ModelConfig,
    SchedulerConfig,
    engine_environment,
)
from strata.engine.intake import check_capacity, events_until_done
from strata.engine.messages import (
    Abort,
    Add,
    Call,
    Events,
    Failed,
    Query,
    Ready,
    Result,
    Stop,
    ToEngine,
    ToFront,
)
from strata.engine.request import Checked, Limits, RequestOutput
from strata.grammar.compiler import LazyGrammarCompiler
from strata.sampling.params import SamplingParams

if TYPE_CHECKING:  # the engine's side only: a front never imports the model (nor torch)
    from strata.engine.engine import Engine

log = logging.getLogger(__name__)
ENGINE_LOG_FORMAT = "%(asctime)s %(levelname)s engine %(name)s: %(message)s"


def build_engine(
    model: ModelConfig,
    pool: KVPoolConfig,
    sched: SchedulerConfig,
    tiers: HiCacheConfig,
    cluster_worker: bool = False,
    front_limits: bool = True,
    jump_forward: bool = True,
) -> Engine:
    """front_limits: the engine bounds its own queue (False where a front does)."""
    from strata.engine.engine import Engine, EngineOptions
    from strata.engine.runner import ModelRunner

    runner = ModelRunner.from_config(model, pool, tiers=tiers)
    if runner.tokenizer is None:
        raise ValueError(f"no tokenizer in {runner.checkpoint}: the server needs one")
    options = EngineOptions.of(sched, tiers, cluster_worker, front_limits)
    return Engine(runner, options, jump_forward=jump_forward)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    pool: KVPoolConfig
    sched: SchedulerConfig
    tiers: HiCacheConfig
    random_seed: int | None = None
    log_level: str = "info"


# ---- the engine's side ---------------------------------------------------------------------


def engine_main(from_front: Connection, to_front: Connection, cfg: EngineConfig) -> None:
    """The engine process: load, say ready, then run the step loop on this main thread
    while a reader thread feeds it the front's messages. Ends when the front says stop or
    goes away (its end of the pipe closes)."""
    logging.basicConfig(level=cfg.log_level.upper(), format=ENGINE_LOG_FORMAT)
    try:
        if cfg.random_seed is not None:
            import torch

            torch.manual_seed(cfg.random_seed)
        engine = build_engine(cfg.model, cfg.pool, cfg.sched, cfg.tiers, front_limits=False)
    except Exception as exc:
        log.exception("the engine failed to start")
        to_front.send(Failed(f"{type(exc).__name__}: {exc}"))
        return
    send_lock = threading.Lock()

    def send(msg: ToFront) -> None:
        with send_lock:
            to_front.send(msg)

    outbox: list[RequestOutput] = []  # filled and flushed on the engine's main thread

    # NOTE: a step's events leave from this thread as the step ends, while the next step
    # builds its batch in Python and the step's other threads only spin; the front does
    # its part in that gap. A sender thread of its own wrote them during the next forward
    # instead, whose threads the front's wake-up then preempted: 0.10-0.20 ms a token
    # more at batch 1 (measured through `strata serve` with int4 weights: 4.0 vs 3.85).
    def flush() -> None:
        if outbox:
            batch = outbox[:]
            outbox.clear()
            try:
                send(Events(batch))
            except (BrokenPipeError, EOFError, OSError):  # the front went away
                engine.stop()

    engine.after_step = flush
    engine.expect_loop()  # calls that arrive before run() wait for it
    threading.Thread(
        target=_read,
        args=(from_front, engine, outbox, send),
        name="strata-engine-inbox",
        daemon=True,
    ).start()
    send(Ready(engine.limits))
    try:
        engine.run()  # its last after_step sends the last events (a broken runner's too)
    finally:
        engine.close()


def _read(
    conn: Connection, engine: Engine, outbox: list[RequestOutput], send: Callable[[ToFront], None]
) -> None:
    """The engine's inbox: turn the front's messages into engine calls until it stops."""
    try:
        while True:
            msg: ToEngine = conn.recv()
            match msg:
                case Add(rid, request):
                    try:
                        engine.queue(request, outbox.append, rid)
                    except Exception as exc:  # validated at the front: a race or a bug
                        failed = RequestOutput(rid, [], "", finish_reason="error", error=str(exc))
                        send(Events([failed]))
                case Abort(rid):
                    engine.abort(rid)
                case Call(call_id, query):
                    fut = engine.call(functools.partial(engine.answer, query))
                    fut.add_done_callback(functools.partial(_reply, send, call_id))
                case Stop():
                    break
    except (EOFError, OSError):
        pass
    engine.stop()


def _reply(send: Callable[[ToFront], None], call_id: int, fut: Future) -> None:
    exc = fut.exception()
    send(
        Result(
            call_id, exc is None, fut.result() if exc is None else (type(exc).__name__, str(exc))
        )
    )


def _take_frames(buffer: bytearray) -> list[Any]:
    """Unpickle and remove the whole messages at the front of buffer, as Connection.send
    frames them: a 4-byte big-endian length (-1, then 8 bytes of length, past 2 GiB)."""
    messages, pos = [], 0
    while len(buffer) - pos >= 4:
        (size,) = struct.unpack_from("!i", buffer, pos)
        head = 4
        if size == -1:
            if len(buffer) - pos < 12:
                break
            (size,) = struct.unpack_from("!Q", buffer, pos + 4)
            head = 12
        if len(buffer) - pos - head < size:
            break
        messages.append(pickle.loads(buffer[pos + head : pos + head + size]))
        pos += head + size
    del buffer[:pos]
    return messages


# ---- the front's side ----------------------------------------------------------------------


class EngineGone(RuntimeError):
    pass


class EngineClient:
    """The front's handle on an engine process (an EngineHandle, as the in-process Engine
    is: validate, stream, and ask its queries)."""

    def __init__(self, cfg: EngineConfig, start_timeout: float = 900.0) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
        os.environ.update(engine_environment())  # the child's malloc and OpenMP read them
        # NOTE: one pipe each way. On one duplex socket every message the front read woke
        # the engine's reader thread (blocked on the same socket) for nothing: a context
        # switch a token, taken from the step's threads.
        self._in, engine_out = ctx.Pipe(duplex=False)
        engine_in, self._out = ctx.Pipe(duplex=False)
        # The engine writes its events from its loop: a pipe of 1 MB (Linux; 64 KB by
        # default) holds ~4000 of them while the front is busy for a moment (a long
        # prompt's tokenization) before a full pipe would hold the loop up.
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self._in.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        self.process = ctx.Process(
            target=engine_main, args=(engine_in, engine_out, cfg), name="strata-engine", daemon=True
        )
        self.process.start()
        engine_in.close()
        engine_out.close()
        # what load_tokenizer imports for the embedded model (1 s on a 2-core EPYC), here
        # while the engine process loads the model on the other core
        import transformers.tokenization_utils_tokenizers  # noqa: F401

        from strata.model.loader import load_tokenizer

        self.limits = self._wait_ready(start_timeout)

        self.tokenizer = load_tokenizer(self.limits.checkpoint)
        sched = cfg.sched
        self.capacity = sched.max_running_requests + sched.max_queued_requests
        self._grammar = LazyGrammarCompiler(
            self.tokenizer, self.limits.vocab_size, self.limits.eos_token_ids
        )
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone: str | None = None
        self._send_lock = threading.Lock()
        self._inbound = bytearray()  # the engine's bytes past the last whole message

    def _wait_ready(self, timeout: float) -> Limits:
        deadline = time.monotonic() + timeout
        while not self._in.poll(0.5):
            if not self.process.is_alive():
                raise EngineGone(
                    f"the engine process exited ({self.process.exitcode}) while starting"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                raise EngineGone(f"the engine process did not start in {timeout:g} s")
        match self._in.recv():
            case Ready(limits):
                return limits
            case Failed(message):
                self.process.join(10)
                raise EngineGone(f"the engine failed to start: {message}")
            case other:
                raise EngineGone(f"the engine sent {other!r} before it was ready")

    # ---- requests ------------------------------------------------------------------------

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Checked:
        """The request checked against the engine's Limits, here in the front (the engine
        process queues it unchecked); EngineGone or Overloaded when it cannot be taken now."""
        self._admit()
        return self.limits.check(prompt_ids, params, lambda c: self._grammar.get().compile(c))

    def _admit(self) -> None:
        if self._gone is not None:
            raise EngineGone(self._gone)
        check_capacity(len(self._streams), self.capacity)

    async def stream(
        self, request: Checked, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Send a checked request to the engine and yield its events until one finishes it.
        Closing the generator early aborts the request, which frees its pages."""
        self._attach()
        self._admit()
        rid = rid or f"req-{os.getpid()}-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        events: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[rid] = events

        def abandon() -> None:
            self._streams.pop(rid, None)
            if self._gone is None:
                self._send(Abort(rid))

        try:
            self._send(Add(rid, request))
            async with aclosing(events_until_done(events, abandon)) as stream:
                async for event in stream:
                    yield event
        finally:
            self._streams.pop(rid, None)

    async def ask(self, query: Query) -> Any:
        """Run a query on the engine between its steps; its answer."""
        self._attach()
        if self._gone is not None:
            raise EngineGone(self._gone)
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._send(Call(call_id, query))
        try:
            return await fut
        finally:
            self._calls.pop(call_id, None)

    # ---- the pipe ------------------------------------------------------------------------

    def _send(self, msg: ToEngine) -> None:
        with self._send_lock:
            self._out.send(msg)

    def _attach(self) -> None:
        """Read the engine's messages on the running event loop (no thread of our own)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._in.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        """One read of what the pipe holds, then each whole message in it: no poll and no
        second read per message as Connection.recv takes (a quarter of the front's CPU a
        token: 0.12-0.13 against 0.16-0.20 ms, measured with a core to itself)."""
        try:
            data = os.read(self._in.fileno(), 1 << 20)
        except OSError:
            data = b""
        if not data:
            self._on_gone()
            return
        self._inbound += data
        for msg in _take_frames(self._inbound):
            self._dispatch(msg)

    def _dispatch(self, msg: ToFront) -> None:
        match msg:
            case Events(outputs):
                for ev in outputs:
                    queue = self._streams.get(ev.rid)
                    if queue is not None:
                        queue.put_nowait(ev)
            case Result(call_id, ok, value):
                fut = self._calls.get(call_id)
                if fut is not None and not fut.done():
                    if ok:
                        fut.set_result(value)
                    else:  # a ValueError is the asker's (a bad session, say): a 400
                        kind, text = value
                        bad = ValueError(text) if kind == "ValueError" else None
                        fut.set_exception(bad or RuntimeError(f"{kind}: {text}"))

    def _on_gone(self) -> None:
        """The engine process died: end every stream with an error event, fail every call."""
        assert self._loop is not None
        self._loop.remove_reader(self._in.fileno())
        self.process.join(1)
        self._gone = f"the engine process exited (code {self.process.exitcode})"
        log.error("%s; %d requests fail", self._gone, len(self._streams))
        for rid, stream in self._streams.items():
            stream.put_nowait(RequestOutput(rid, [], "", finish_reason="error", error=self._gone))
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineGone(self._gone))

    @property
    def alive(self) -> bool:
        return self._gone is None and self.process.is_alive()

    def shutdown(self, timeout: float = 15.0) -> None:
        """Ask the engine to stop (its running requests end with an abort event), wait."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._in.fileno())
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self._send(Stop())
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._in.close()
        self._out.close()
