"""Peer servers for side-by-side benchmarks (installed by `make peers`, never by make test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


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

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = str(os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
           "--n_threads", threads, "--n_threads_batch", threads, "--cache", "true",
           # its default lets each new request cut off the one in flight
           "--interrupt_requests", "false"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"llama-cpp-python's server did not start:\n{tail}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
