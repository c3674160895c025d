"""`--tp-size 2` on a tiny model (4 heads, 2 KV heads: one per rank; the embedded model's
tokenizer), two gloo ranks on loopback per worker: `strata serve` and a split `strata up`
give one rank's greedy output, and a rank that dies ends the streams it cut with an error
event. The embedded model (9 heads, 3 KV heads) splits over 3 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from launch.local import (
    _wait_healthy,
    free_port,
    running_cluster,
    running_server,
    started_together,
)
from strata.config import KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.generate import generate_greedy_batch
from strata.engine.runner import ModelRunner
from strata.model.loader import load_tokenizer, resolve_checkpoint
from tests.conftest import tiny_hf_model
from tests.e2e.test_cluster import transfers

PROMPTS = [[(7 * i + 3 * j) % 300 + 5 for j in range(20 + 13 * i)] for i in range(3)]
TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """The flags of a tiny float32 model with a tokenizer (servers need one)."""
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_hf_model("llama").save_pretrained(folder)
    load_tokenizer(resolve_checkpoint(None)).save_pretrained(folder)
    return [
        "--model-path",
        str(folder),
        "--dtype",
        "float32",
        "--page-size",
        "4",
        "--num-pages",
        "256",
    ]


def generate(url: str, ids: list[int]) -> list[int]:
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": TOKENS, "temperature": 0, "ignore_eos": True},
    }
    resp = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def test_two_ranks_serve_the_greedy_output_of_one(tiny):
    model = ModelConfig(tiny[1], dtype="float32", sparse=SparseConfig(threshold=0))
    runner = ModelRunner.from_config(model, KVPoolConfig(4, 64))
    want = generate_greedy_batch(runner, PROMPTS, TOKENS)
    split = ("--prefill", "1", "--decode", "1", "--local-prefill-tokens", "8")
    with ExitStack() as stack:
        url, (cluster, _) = started_together(
            stack,
            [
                running_server("--grpc-port", "-1", *tiny, "--tp-size", "2"),
                running_cluster(*split, *tiny, "--tp-size", "2"),
            ],
        )
        assert [generate(url, p) for p in PROMPTS] == want
        # split: the prompts are prefilled on the prefill worker, each rank's KV heads sent
        # to the decode worker's rank of the same number
        assert [generate(cluster, p) for p in PROMPTS] == want
        assert transfers(cluster) == len(PROMPTS)


def ranks_of(pid: int) -> list[int]:
    """The tensor-parallel rank processes the process pid started."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"strata.engine.tp_follower" in cmdline:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.faults
def test_a_rank_that_dies_ends_the_streams_with_an_error():
    """The embedded model over three ranks; one of them is killed mid-stream."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "serve",
        "--port",
        str(port),
        "--grpc-port",
        "-1",
        "--dtype",
        "float32",
        "--tp-size",
        "3",
    ]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log, 180)
            engine_pid = httpx.get(f"{url}/get_server_info", timeout=10).json()["engine_pid"]
            ranks = ranks_of(engine_pid)
            assert len(ranks) == 2
            body = {
                "text": "Tell me a long story.",
                "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True},
            }
            events = []
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                    if len(events) == 3:
                        os.kill(ranks[1], signal.SIGKILL)
            assert len(events) < 2000
            last = json.loads(events[-2] if events[-1] == "[DONE]" else events[-1])
            assert last["meta_info"]["finish_reason"]["type"] == "error"
            assert proc.wait(60) != 0  # the engine ended: a supervisor restarts the server
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
