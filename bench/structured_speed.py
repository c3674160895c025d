"""Structured generation costs: decode tokens/s with a JSON-schema constraint vs without at
batch 16, and what jump-forward decoding saves on a schema with long fixed keys.

One process, the embedded model, alternating configurations, median of --repeats runs.
Usage: python bench/structured_speed.py [--batch 16] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from strata.config import KVPoolConfig, ModelConfig
from strata.engine.engine import Engine
from strata.engine.runner import ModelRunner
from strata.grammar.constraint import Constraint
from strata.sampling.params import SamplingParams
from strata.tokenizer import chat_prompt_ids

NEW_TOKENS = 64
# a free-text field that cannot close before ~64 tokens: every step is a constrained step
STORY = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 400, "maxLength": 2000}},
    "required": ["story"],
}
KEYS = [
    "the_full_legal_name_of_the_customer",
    "the_customer_account_identifier_number",
    "the_preferred_contact_email_address",
    "the_country_of_residence_for_tax_purposes",
    "whether_the_customer_accepted_the_terms",
]
FORM = {
    "type": "object",
    "properties": {
        k: ({"type": "boolean"} if k.startswith("whether") else {"type": "string", "maxLength": 24})
        for k in KEYS
    },
    "required": KEYS,
}


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int, int]:
    """Seconds, output tokens and engine steps for one batch run to completion."""
    outs: list[list[int]] = [[] for _ in prompts]
    for i, ids in enumerate(prompts):
        engine.submit(ids, params, lambda ev, i=i: outs[i].extend(ev.token_ids))
    steps = 0
    start = time.perf_counter()
    engine._drain()
    while engine.scheduler.has_work:
        steps += engine.step()
        engine._drain()
    elapsed = time.perf_counter() - start
    engine.flush_cache()
    return elapsed, sum(len(o) for o in outs), steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    runner = ModelRunner.from_config(ModelConfig(dtype=args.dtype), KVPoolConfig())
    tok = runner.tokenizer
    topics = ["a dragon", "the sea", "a robot", "a city", "winter", "a chef", "a clock", "trains"]
    prompts = [
        chat_prompt_ids(
            tok,
            [
                {
                    "role": "user",
                    "content": f"Write a long story about {topics[i % len(topics)]} as JSON.",
                }
            ],
        )
        for i in range(args.batch)
    ]
    story = Constraint.json_schema(STORY)
    plain_p = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    json_p = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, constraint=story)
    one = {
        "plain": SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True),
        "json": SamplingParams(max_new_tokens=1, temperature=0, constraint=story),
    }
    engines = {
        "plain": Engine(runner, jump_forward=False),
        "json": Engine(runner, jump_forward=False),
    }
    rates: dict[str, list[float]] = {"plain": [], "json": []}
    run(engines["json"], prompts[:2], json_p)  # warm up (and compile the grammar)
    for _ in range(args.repeats):
        for name, params in (("plain", plain_p), ("json", json_p)):
            prefill, _, _ = run(engines[name], prompts, one[name])
            total, tokens, _ = run(engines[name], prompts, params)
            rates[name].append((tokens - len(prompts)) / (total - prefill))
    plain, constrained = statistics.median(rates["plain"]), statistics.median(rates["json"])

    form = Constraint.json_schema(FORM)
    form_p = SamplingParams(max_new_tokens=256, temperature=0, constraint=form)
    jf: dict[str, dict[str, list[float]]] = {}
    for batch in (1, args.batch):
        for jump in (False, True):
            engine = Engine(runner, jump_forward=jump)
            res = [run(engine, prompts[:batch], form_p) for _ in range(args.repeats)]
            jf[f"bs{batch}-{'on' if jump else 'off'}"] = {
                "seconds": [r[0] for r in res],
                "tokens": [r[1] for r in res],
                "steps": [r[2] for r in res],
            }

    print(f"\nbatch {args.batch}, {NEW_TOKENS} new tokens, median of {args.repeats}:")
    print("| decode | tok/s | vs unconstrained |\n|---|---:|---:|")
    print(f"| unconstrained | {plain:.1f} | 1.00x |")
    print(
        f"| JSON schema | {constrained:.1f} | {constrained / plain:.2f}x "
        f"(overhead {100 * (1 - constrained / plain):.1f}%) |"
    )
    print("\njump-forward on a schema with five long fixed keys:")
    print("| batch | steps off | steps on | seconds off | seconds on | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (1, args.batch):
        off, on = jf[f"bs{batch}-off"], jf[f"bs{batch}-on"]
        t_off, t_on = statistics.median(off["seconds"]), statistics.median(on["seconds"])
        print(
            f"| {batch} | {statistics.median(off['steps']):.0f} | "
            f"{statistics.median(on['steps']):.0f} | {t_off:.2f} | {t_on:.2f} | "
            f"{t_off / t_on:.2f}x |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"plain_tok_s": rates["plain"], "json_tok_s": rates["json"], "jump_forward": jf},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
