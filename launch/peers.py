"""Peer servers for side-by-side benchmarks (installed by `make peers`, never by make test)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from launch.local import free_port, running_process


def has_llama_cpp() -> bool:
    try:
        import llama_cpp.server.app  # noqa: F401 (needs the [server] extra)
    except ImportError:
        return False
    return True


@contextmanager
def llama_cpp_server(n_ctx: int = 8192, timeout: float = 120.0) -> Iterator[str]:
    """llama-cpp-python's OpenAI server on the embedded model's own Q4_1 GGUF, every core,
    its prompt cache on; yields its URL. It runs one request at a time (the others queue)."""
    from strata.model.loader import embedded_gguf

    port = free_port()
    threads = str(os.cpu_count() or 1)
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(embedded_gguf()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        threads,
        "--n_threads_batch",
        threads,
        "--cache",
        "true",
        # NOTE: its server keeps every prompt position's logits by default (n_ctx x vocab
        # float32, 3.4 GB at 17k positions) and copies them into each prompt-cache entry,
        # which the cache's byte budget does not count: 40-turn sessions grew it past 21 GB
        "--logits_all",
        "false",
        # its default lets each new request cut off the one in flight
        "--interrupt_requests",
        "false",
    ]
    with running_process(cmd, f"http://127.0.0.1:{port}", "/v1/models", {}, timeout) as url:
        yield url
