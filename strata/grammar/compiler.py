"""Grammar compilation and matching on xgrammar: a bounded, cached, time-limited compiler.

Compiled grammars are cached by Constraint (an LRU of `cache_size`); compilation runs on a
worker thread so a pathological grammar fails the request after `timeout` seconds instead of
stalling the caller. Each constrained request gets its own GrammarMatcher; the engine fills
the token bitmasks of a whole batch in one call and applies them to the logits in one call.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from strata.grammar.constraint import Constraint

if TYPE_CHECKING:  # a front compiles grammars, and imports neither until the first comes
    import torch
    import xgrammar as xgr

MAX_SOURCE_CHARS = 64 * 1024
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """A constraint that cannot be used: invalid, too large, or too slow to compile."""


def _clean(message: str) -> str:
    return _CPP_PREFIX.sub("", message.strip()).strip()


class GrammarCompiler:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int] = (),
        timeout: float = 10.0,
        cache_size: int = 256,
        max_threads: int = 2,
    ) -> None:
        # NOTE: imported here, when the first constraint comes (LazyGrammarCompiler): 1 s of
        # every process's start on a 2-core EPYC otherwise
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        self.vocab_size = vocab_size
        self.timeout = timeout
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-grammar")
        self._cache: OrderedDict[Constraint, xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._batch = xgr.BatchGrammarMatcher(max_threads=max_threads)

    def compile(self, c: Constraint) -> xgr.CompiledGrammar:
        with self._lock:
            hit = self._cache.get(c)
            if hit is not None:
                self._cache.move_to_end(c)
                return hit
        if len(c.source) > MAX_SOURCE_CHARS:
            raise GrammarError(
                f"{c.kind} is too large: {len(c.source)} characters (limit {MAX_SOURCE_CHARS})"
            )
        future = self._pool.submit(self._compile, c)
        try:
            compiled = future.result(timeout=self.timeout)
        except FutureTimeout:
            future.cancel()
            raise GrammarError(f"{c.kind} took longer than {self.timeout:g}s to compile") from None
        with self._lock:
            self._cache[c] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, c: Constraint) -> xgr.CompiledGrammar:
        try:
            if c.kind == "regex":
                return self._xgr.compile_regex(c.source)
            if c.kind == "json_schema":
                return self._xgr.compile_json_schema(c.source, any_whitespace=False)
            if c.kind == "json_object":
                return self._xgr.compile_builtin_json_grammar()
            return self._xgr.compile_grammar(c.source)
        except Exception as exc:  # xgrammar raises RuntimeError / InvalidJSONError
            name = {"json_schema": "JSON schema", "ebnf": "EBNF grammar"}.get(c.kind, c.kind)
            raise GrammarError(f"invalid {name}: {_clean(str(exc))}") from None

    def matcher(self, c: Constraint) -> xgr.GrammarMatcher:
        return self.xgr.GrammarMatcher(self.compile(c))

    def mask_logits(
        self, logits: torch.Tensor, matchers: Sequence[xgr.GrammarMatcher | None]
    ) -> None:
        """Set every token a row's grammar forbids to -inf, in place (rows without a matcher
        are left alone). One bitmask fill and one masking call for the whole batch."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask = self.xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
        live = [m for m in matchers if m is not None]
        self._batch.batch_fill_next_token_bitmask(live, bitmask, indices=rows)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


class LazyGrammarCompiler:
    """A GrammarCompiler built on first use (thread-safe): most servers never see a
    constraint, and building the vocabulary table takes time and memory."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int] = (),
        timeout: float = 10.0,
    ) -> None:
        self._args = (tokenizer, vocab_size, list(stop_token_ids), timeout)
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def get(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                tokenizer, vocab_size, stop_ids, timeout = self._args
                if tokenizer is None:
                    raise ValueError("constrained decoding needs the model's tokenizer")
                self._compiler = GrammarCompiler(tokenizer, vocab_size, stop_ids, timeout)
            return self._compiler
