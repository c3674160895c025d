"""`--tp-size 3` on the embedded model (9 heads, 3 KV heads: one per rank), three gloo ranks
on loopback: `strata serve` and `strata up` give one rank's greedy output, and a rank that
dies ends the streams it cut with an error event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from launch.local import _wait_healthy, free_port, running_cluster, running_server
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.generate import generate_greedy_batch
from strata.engine.runner import ModelRunner
from strata.tokenizer import chat_prompt_ids

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
TOKENS = 12


def generate(url: str, ids: list[int]) -> list[int]:
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": TOKENS, "temperature": 0, "ignore_eos": True},
    }
    resp = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def test_three_ranks_serve_the_greedy_output_of_one():
    runner = ModelRunner.from_config(ModelConfig(dtype="float32"), KVPoolConfig(16, 64))
    prompts = [chat_prompt_ids(runner.tokenizer, [{"role": "user", "content": p}])
               for p in PROMPTS]  # fmt: skip
    want = generate_greedy_batch(runner, prompts, TOKENS)
    with running_server("--grpc-port", "-1", "--dtype", "float32", "--tp-size", "3") as url:
        assert [generate(url, p) for p in prompts] == want
    with running_cluster("--prefill", "0", "--decode", "1", "--dtype", "float32",
                         "--tp-size", "3") as (url, _):  # fmt: skip
        assert [generate(url, p) for p in prompts] == want


def ranks_of(pid: int) -> list[int]:
    """The tensor-parallel rank processes the process pid started."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"strata.engine.tp_rank" in cmdline:
            out.append(int(stat.parent.name))
    return out


def test_a_rank_that_dies_ends_the_streams_with_an_error():
    port = free_port()
    cmd = [sys.executable, "-m", "launch.cli", "serve", "--port", str(port), "--grpc-port",
           "-1", "--dtype", "float32", "--tp-size", "3"]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log, 180)
            engine_pid = httpx.get(f"{url}/get_server_info", timeout=10).json()["engine_pid"]
            ranks = ranks_of(engine_pid)
            assert len(ranks) == 2
            body = {"text": "Tell me a long story.", "stream": True,
                    "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}  # fmt: skip
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
