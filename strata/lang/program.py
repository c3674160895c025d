"""Program state and `@function`: programs run eagerly, one state per run."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from strata.lang.backend import RuntimeEndpoint, default_backend
from strata.lang.ir import SAMPLING_KEYS, Concat, Expr, Gen, Role, RoleBegin, RoleEnd, Select


class ProgramState:
    """The text a program has built, its named variables, and its chat messages."""

    def __init__(self, backend: RuntimeEndpoint, defaults: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.defaults = dict(defaults or {})  # sampling defaults of the run
        self._text = ""
        self.variables: dict[str, Any] = {}
        self.meta: dict[str, dict[str, Any]] = {}  # per gen variable: the server's meta_info
        self._messages: list[dict[str, str]] = []
        self._open: tuple[str, int] | None = None  # role being written, where its text starts
        # run(stream=True): the text as it is produced; None ends it (see text_iter)
        self._pieces: queue.SimpleQueue[str | None] | None = None
        self._error: BaseException | None = None

    # ---- what programs use ---------------------------------------------------------------

    def __iadd__(self, expr: Expr) -> ProgramState:
        self._run(expr)
        return self

    def __getitem__(self, name: str) -> Any:
        return self.variables[name]

    def get_var(self, name: str) -> Any:
        return self.variables[name]

    def get_meta_info(self, name: str) -> Any:
        """The server's meta_info of the gen call `name`; or, for a meta_info key (such as
        "attention_sparsity_ratio"), its value in the latest gen call that reported it."""
        if name in self.meta:
            return self.meta[name]
        for meta in reversed(list(self.meta.values())):
            if name in meta:
                return meta[name]
        raise KeyError(f"no gen call or meta_info field named {name!r}")

    def get_metric(self, key: str) -> float:
        """A per-request figure (such as "attention_sparsity_ratio") over every gen call of
        this state so far, weighted by each call's completion tokens."""
        got = [(m[key], m.get("completion_tokens", 1)) for m in self.meta.values() if key in m]
        if not got:
            raise KeyError(f"no gen call reported {key!r}")
        weight = sum(w for _, w in got)
        return sum(v * w for v, w in got) / weight if weight else float(got[-1][0])

    def text(self) -> str:
        return self._text

    def text_iter(self) -> Iterator[str]:
        """With run(stream=True): the program's text piece by piece as it is produced (gen
        text as the server streams it); ends when the program does, raising its error."""
        if self._pieces is None:
            yield self._text
            return
        while (piece := self._pieces.get()) is not None:
            yield piece
        if self._error is not None:
            raise self._error

    def _append(self, piece: str) -> None:
        self._text += piece
        if self._pieces is not None:
            self._pieces.put(piece)

    def messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self._messages]

    def fork(self, n: int = 1) -> ForkedStates:
        """n independent copies of this state (the shared prefix is cached by the server)."""
        return ForkedStates(self._copy() for _ in range(n))

    # ---- execution -----------------------------------------------------------------------

    def _copy(self) -> ProgramState:
        clone = copy.copy(self)
        clone.variables, clone.meta = dict(self.variables), dict(self.meta)
        clone._messages = [dict(m) for m in self._messages]
        return clone

    def _run(self, expr: Expr) -> None:
        if isinstance(expr, str):
            self._append(expr)
        elif isinstance(expr, Gen):
            on_text = self._pieces.put if self._pieces is not None else None
            out, meta = self.backend.generate(self._text, expr, self.defaults, on_text)
            self._text += out  # (streamed piece by piece already, when streaming)
            if expr.name:
                self.variables[expr.name], self.meta[expr.name] = out, meta
        elif isinstance(expr, Select):
            best, scores = self.backend.select(self._text, expr.choices)
            self._append(expr.choices[best])
            if expr.name:
                self.variables[expr.name] = expr.choices[best]
                self.meta[expr.name] = {"scores": scores}
        elif isinstance(expr, RoleBegin):
            if self._open is not None:
                raise ValueError(f"{expr.role}_begin inside an open {self._open[0]} message")
            self._append(self.backend.role_markers(expr.role)[0])
            self._open = (expr.role, len(self._text))
        elif isinstance(expr, RoleEnd):
            if self._open is None or self._open[0] != expr.role:
                raise ValueError(f"{expr.role}_end without a matching {expr.role}_begin")
            role, start = self._open
            self._messages.append({"role": role, "content": self._text[start:]})
            self._append(self.backend.role_markers(role)[1])
            self._open = None
        elif isinstance(expr, Concat):
            for part in expr.parts:
                self._run(part)
        elif isinstance(expr, Role):
            self._run(RoleBegin(expr.role))
            for part in expr.content:
                self._run(part)
            self._run(RoleEnd(expr.role))
        else:
            raise TypeError(f"cannot add {type(expr).__name__} to a program state")


class ForkedStates(list[ProgramState]):
    def join(self) -> None:
        """Programs run eagerly, so forks are complete when their `+=` returns."""


class Program:
    """A function of (state, *args) made runnable against a backend."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def _split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the program's own arguments, sampling defaults). A program parameter named like
        a sampling default is ambiguous, so it is an error, not a silent override."""
        defaults = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
        clash = set(defaults) & set(inspect.signature(self.fn).parameters)
        if clash:
            raise TypeError(
                f"{self.fn.__name__}: argument(s) {sorted(clash)} are both the "
                "program's and a sampling default of run / run_batch"
            )
        return kwargs, defaults

    def run(self, *args: Any, backend: RuntimeEndpoint | None = None, **kwargs: Any):
        """Run the program; keyword arguments named in SAMPLING_KEYS (temperature,
        max_new_tokens, ...) are sampling defaults for its gen calls."""
        stream = bool(kwargs.pop("stream", False))
        kwargs, defaults = self._split(dict(kwargs))
        state = ProgramState(backend or default_backend(), defaults)
        if not stream:
            self.fn(state, *args, **kwargs)
            return state
        pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        state._pieces = pieces

        def body() -> None:
            try:
                self.fn(state, *args, **kwargs)
            except BaseException as exc:  # handed to the reader of text_iter
                state._error = exc
            finally:
                pieces.put(None)

        threading.Thread(target=body, name=f"strata-lang-{self.fn.__name__}", daemon=True).start()
        return state

    def run_batch(
        self,
        batch_kwargs: Sequence[dict[str, Any]],
        backend: RuntimeEndpoint | None = None,
        num_threads: int = 16,
        progress_bar: bool = False,
        **defaults: Any,
    ) -> list[ProgramState]:
        """Run one program per kwargs dict concurrently; results in input order. Keyword
        arguments are sampling defaults for every run."""
        backend = backend or default_backend()
        _, defaults = self._split(dict(defaults))
        with ThreadPoolExecutor(max(1, min(num_threads, len(batch_kwargs)))) as pool:
            futures = [
                pool.submit(self.run, backend=backend, **kw, **defaults) for kw in batch_kwargs
            ]
            done = tqdm(futures, disable=not progress_bar, desc=self.fn.__name__)
            return [f.result() for f in done]

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)


class Session:
    """Programs run one after another on one backend, whose radix cache keeps what they
    share: run a program's fixed prefix once (`s.run(system_prompt)`) and later programs
    that start with it skip computing it."""

    def __init__(self, backend: RuntimeEndpoint) -> None:
        self.backend = backend
        self.states: list[ProgramState] = []

    def run(self, program: Program, *args: Any, **kwargs: Any) -> ProgramState:
        """Run program; text it built that no gen sent (a fixed prefix) is prefilled."""
        state = program.run(*args, backend=self.backend, **kwargs)
        if state.text() and not state.meta:  # the server has not seen it: warm it now
            self.backend.warm(state.text())
        self.states.append(state)
        return state


@contextlib.contextmanager
def session(backend: RuntimeEndpoint | None = None) -> Iterator[Session]:
    """`with sl.session() as s: s.run(prefix_program)` (SGLang's form)."""
    yield Session(backend or default_backend())


def function(fn: Callable[..., Any]) -> Program:
    """Decorator: `@function def prog(s, ...)`; then `prog.run(...)` / `prog.run_batch(...)`."""
    return Program(fn)
