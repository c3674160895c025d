"""`strata bench WORKLOAD`: run a workload against an OpenAI-compatible URL (or transformers)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from strata.bench import workloads
from strata.bench.client import ChatClient, run_conversations, run_requests
from strata.bench.report import summarize, table


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "workload",
        choices=["multiturn", "sessions", "shared-prefix", "random"],
        help="sessions: every conversation has its own --system-tokens context and "
        "all are open at once (--concurrency turns in flight)",
    )
    p.add_argument("--url", default="http://127.0.0.1:30000", help="the server under test")
    p.add_argument(
        "--backend",
        choices=["server", "transformers"],
        default="server",
        help="transformers: run the multiturn conversations through batched generate",
    )
    p.add_argument("--name", default=None, help="label of this system in the report")
    p.add_argument("--model", default="default", help="the model name sent in requests")
    p.add_argument("--model-path", default=None, help="tokenizer (and transformers baseline)")
    p.add_argument("--hf-dtype", default="bfloat16", help="dtype of the transformers baseline")
    p.add_argument(
        "--conversations", type=int, default=16, help="multiturn / sessions: conversations"
    )
    p.add_argument("--turns", type=int, default=4, help="turns per conversation")
    p.add_argument(
        "--system-tokens",
        type=int,
        default=400,
        help="tokens of the shared system prompt (sessions: of each own context)",
    )
    p.add_argument(
        "--requests", type=int, default=64, help="shared-prefix / random: requests in all"
    )
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts")
    p.add_argument("--out", default=None, help="write the result as JSON here")


def run_bench(a: argparse.Namespace) -> dict[str, Any]:
    from strata.model.loader import load_tokenizer, resolve_checkpoint

    tokenizer = load_tokenizer(resolve_checkpoint(a.model_path))
    if a.backend == "transformers":
        if a.workload != "multiturn":
            raise ValueError("the transformers baseline runs the multiturn workload only")
        from strata.bench.hf_baseline import run_hf_conversations

        convs = workloads.multiturn(a.conversations, a.turns, a.system_tokens, a.seed)
        return run_hf_conversations(a.model_path, convs, a.max_tokens, a.hf_dtype)

    async def go() -> tuple[list, float]:
        client = ChatClient(a.url, a.model, a.max_tokens)
        start = time.perf_counter()
        try:
            if a.workload == "multiturn":
                convs = workloads.multiturn(a.conversations, a.turns, a.system_tokens, a.seed)
                records = await run_conversations(client, convs, a.concurrency)
            elif a.workload == "sessions":
                convs = workloads.sessions(a.conversations, a.turns, a.system_tokens, a.seed)
                records = await run_conversations(client, convs, a.concurrency, per_turn=True)
            elif a.workload == "shared-prefix":
                reqs = workloads.shared_prefix(a.requests, a.system_tokens, a.seed)
                records = await run_requests(client, reqs, a.concurrency)
            else:
                reqs = workloads.random_prompts(a.requests, a.system_tokens, a.seed)
                records = await run_requests(client, reqs, a.concurrency)
        finally:
            await client.close()
        return records, time.perf_counter() - start

    records, wall = asyncio.run(go())
    return summarize(a.name or a.url, records, wall, tokenizer)


def cmd_bench(a: argparse.Namespace) -> int:
    result = run_bench(a)
    print(table([result]))
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if not result.get("errors") else 1
