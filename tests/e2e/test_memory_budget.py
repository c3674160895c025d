"""`make run`'s cluster (`strata up` with its defaults: the embedded model, one prefill and
one decode worker, the KV tiers) under an 8 GiB memory cgroup, as on a small machine, with
the kernels forced to the AVX2 level: it comes up, serves, and everything it started holds
less than the budget it reports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from launch.local import free_port
from strata.config import detected_cpu_isa
from strata.engine.memory import CPU_MEM_FRACTION, FRONT_BYTES

LIMIT = 8 * 2**30
ROOT = Path(__file__).resolve().parents[2]


def make_cgroup(limit: int) -> Path:
    """A fresh memory cgroup with this limit (v2, else v1's memory controller); skips the
    test where this machine does not let us make one."""
    name = f"strata-test-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file() and "memory" in v2.read_text().split():
        group, limit_file = Path("/sys/fs/cgroup") / name, "memory.max"
    else:
        group, limit_file = Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here ({exc}): the limit cannot be set")
    return group


def rss(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0  # gone since cgroup.procs was read


@pytest.mark.slow
def test_make_run_cluster_stays_within_its_budget_under_a_memory_limit():
    group = make_cgroup(LIMIT)
    port = free_port()
    cmd = (
        f"echo $$ > {group / 'cgroup.procs'} && exec {sys.executable} -m launch.cli up "
        f"--host 127.0.0.1 --port {port} --grpc-port {free_port()}"
    )
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        # at the AVX2 level whatever this CPU has: the baseline every x86-64 user may have
        env = {**os.environ, "STRATA_CPU_ISA": "avx2" if detected_cpu_isa() != "none" else "none"}
        proc = subprocess.Popen(
            ["sh", "-c", cmd], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, log.seek(0) or log.read().decode(errors="replace")
                try:
                    if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                assert time.monotonic() < deadline, "strata up did not become healthy"
                time.sleep(0.5)
            reply = httpx.post(
                f"{url}/generate",
                timeout=120,
                json={
                    "text": "The capital of France is",
                    "sampling_params": {"max_new_tokens": 8, "temperature": 0},
                },
            )
            assert reply.status_code == 200 and reply.json()["output_ids"]
            health = httpx.get(f"{url}/health", timeout=10).json()
            plans = [w["memory"] for w in health["workers"]]
            assert len(plans) == 2 and all(p["sized_by"] == "budget" for p in plans)
            share = plans[0]["budget_bytes"]
            # one budget for the host (a fraction of what the cgroup left), shared evenly
            assert all(p["budget_bytes"] == share for p in plans)
            total = 2 * share + FRONT_BYTES
            assert total <= CPU_MEM_FRACTION * LIMIT * 1.001
            for p in plans:  # each worker's tiers were sized within its share
                held = (p["l1_pages"] + p["l2_pages"]) * p["page_bytes"]
                assert p["resident_bytes"] + held <= p["budget_bytes"]
                assert p["l1_pages"] > 0 and p["l2_pages"] > 0  # strata up keeps L2 on
            pids = (group / "cgroup.procs").read_text().split()
            assert len(pids) >= 5  # strata up, cache service, two workers, gateway
            used = sum(rss(pid) for pid in pids)
            assert used <= total, f"the cluster holds {used / 1e9:.2f} GB of {total / 1e9:.2f}"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            for _ in range(50):  # the children leave the group as they exit
                if not (group / "cgroup.procs").read_text().split():
                    break
                time.sleep(0.2)
            group.rmdir()
