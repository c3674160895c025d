"""Start real `strata serve` processes on loopback for tests."""

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*extra: str, timeout: float = 180.0) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "strata.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--log-level", "warning", *extra]  # fmt: skip
    # NOTE: the log goes to a file, never an unread pipe: a full pipe would block the server.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    out = log.read().decode(errors="replace")
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("server did not become healthy")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
