"""Long agent sessions under cache pressure, one run: A agents take T turns each (a tool
result of about --tool-tokens tokens, then the model's reply), their prompts growing to
A x T x tool-tokens; between rounds, one-off requests of --noise-tokens each (other users)
push on the cache. strata serve with an L1 pool that holds the agents with little room to
spare, with sessions (each agent pins its conversation) and without, then llama-cpp-python's
server (its prompt cache) on the embedded model's Q4_1 GGUF. Reports TTFT p50/p99 per
quarter of the turns and, for strata, where prompt tokens came from.

Usage: python bench/agent_sessions.py [--agents 4 --turns 20 --tool-tokens 180]
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

from launch.local import running_server
from launch.peers import has_llama_cpp, llama_cpp_server

WORDS = "search result lighthouse keeper ledger tide storm beacon harbor vessel cargo".split()


def tool_text(agent: int, turn: int, tokens: int) -> str:
    """A tool-call-shaped turn: the call the agent made and the tool's JSON answer."""
    items = [
        f'{{"id": {turn * 100 + i}, "text": "{WORDS[(agent + i) % len(WORDS)]} {i}"}}'
        for i in range(tokens // 20)
    ]
    args = f'{{"q": "agent {agent} step {turn}"}}'
    call = f'<tool_call>{{"name": "search", "arguments": {args}}}</tool_call>'
    return f"\n{call}\n<tool_response>[{', '.join(items)}]</tool_response>\nAssistant:"


def complete(url: str, prompt: str, extra: dict) -> tuple[float, str, dict]:
    """TTFT (s), the text, and the usage of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    start, first, text, usage = time.perf_counter(), None, [], {}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, **extra}, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            if ev.get("choices") and ev["choices"][0].get("text"):
                first = first or time.perf_counter() - start
                text.append(ev["choices"][0]["text"])
            usage = ev.get("usage") or usage
    return first or time.perf_counter() - start, "".join(text), usage


def run(url: str, a: argparse.Namespace, sessions: bool) -> dict:
    sids = [
        httpx.post(f"{url}/open_session", json={"timeout": 3600}, timeout=30).json()
        if sessions
        else None
        for _ in range(a.agents)
    ]
    prompts = [
        f"System: you are agent {i}; call tools, then answer.\nUser: task {i}."
        for i in range(a.agents)
    ]
    ttft: list[list[float]] = [[] for _ in range(a.turns)]
    tiers = {"l1": 0, "l2": 0, "l3": 0, "computed": 0}
    for turn in range(a.turns):
        for i in range(a.agents):
            prompts[i] += tool_text(i, turn, a.tool_tokens)
            extra = {"session_params": {"id": sids[i]}} if sids[i] else {}
            seconds, text, usage = complete(url, prompts[i], extra)
            prompts[i] += text
            ttft[turn].append(seconds)
            got = (usage.get("prompt_tokens_details") or {}).get("by_tier") or {}
            for k in tiers:
                tiers[k] += got.get(k, 0)
        noise = " ".join(WORDS[(turn * 7 + j) % len(WORDS)] for j in range(a.noise_tokens))
        complete(url, f"Round {turn}, another user. Summarize: {noise}", {})
    for sid in sids:
        if sid:
            httpx.post(f"{url}/close_session", json={"session_id": sid}, timeout=30)
    return {"ttft": ttft, "tiers": tiers}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


def report(name: str, r: dict, turns: int) -> None:
    quarters = [range(q * turns // 4, (q + 1) * turns // 4) for q in range(4)]
    cells = []
    for q in quarters:
        xs = [x for t in q for x in r["ttft"][t]]
        cells.append(
            f"turns {q.start + 1}-{q.stop}: {pct(xs, 0.5) * 1e3:6.0f} / {pct(xs, 0.99) * 1e3:6.0f}"
        )
    last = r["ttft"][-1]
    print(f"{name}\n  TTFT p50 / p99 ms  " + "  ".join(cells))
    print(f"  last turn: p50 {pct(last, 0.5) * 1e3:.0f} ms, p99 {pct(last, 0.99) * 1e3:.0f} ms")
    if r["tiers"]["computed"] or r["tiers"]["l1"]:
        total = sum(r["tiers"].values())
        share = ", ".join(f"{k} {v / total:.2f}" for k, v in r["tiers"].items())
        print(f"  prompt tokens by tier: {share}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--tool-tokens", type=int, default=180)
    ap.add_argument("--noise-tokens", type=int, default=2400)
    ap.add_argument("--no-peer", action="store_true", help="strata only")
    a = ap.parse_args()
    longest = a.turns * (a.tool_tokens + 60) + 200
    # L1 holds the agents' conversations with a little room, less than a round's noise, so
    # the noise pushes on them; sessions may pin nearly all of it
    need = a.agents * longest // 16
    pages = int(need * 1.15) + a.noise_tokens // 16
    flags = ["--num-pages", str(pages), "--context-length", str(2 * longest)]
    flags += ["--session-pages-fraction", f"{min(0.95, need / pages + 0.02):.2f}"]
    results = {}
    for name, sessions in (("strata, sessions", True), ("strata, no sessions", False)):
        with running_server("--dtype", "auto", *flags) as url:
            results[name] = run(url, a, sessions)
        report(name, results[name], a.turns)
    if has_llama_cpp() and not a.no_peer:
        with llama_cpp_server(n_ctx=2 * longest) as url:
            results["llama-cpp-python (prompt cache)"] = run(url, a, False)
        report(
            "llama-cpp-python (prompt cache)", results["llama-cpp-python (prompt cache)"], a.turns
        )
    print(f"{a.agents} agents x {a.turns} turns, prompts to ~{longest} tokens, L1 {pages} pages")


if __name__ == "__main__":
    main()
