"""Long agent sessions under cache pressure, one run: A agents take T turns each (a tool
call and its JSON result of about --tool-tokens tokens, then the model's reply), their
prompts growing to ~T x (tool-tokens + 60) tokens. Other users share the server: one
one-off prompt of --noise-tokens a round, and every --burst-every rounds a burst of one-off
prompts as large as the whole L1 pool (a batch job, a crowd), which plain LRU answers by
evicting every agent.

strata serve runs with an L1 pool that holds the agents at their longest plus room for two
burst prompts, three ways: sessions (each agent pins its conversation; the pins may take
what the agents need), no sessions, and no sessions with an L2 host tier twice the size of L1.
Then llama-cpp-python's server (its prompt cache) on the embedded model's Q4_1 GGUF.
Reports TTFT p50/p99 per quarter of the turns, at the last turn and at the turns right
after a burst; for strata, where prompt tokens came from; with sessions, the pages the
sessions pinned, and what was left after half of them were closed and after the other half's
TTL ran out.

Usage: python bench/agent_sessions.py [--agents 4 --turns 40 --tool-tokens 150]
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

from launch.local import running_server
from launch.peers import has_llama_cpp, llama_cpp_server

WORDS = "search result lighthouse keeper ledger tide storm beacon harbor vessel cargo".split()
PAGE = 16


def tool_text(agent: int, turn: int, tokens: int) -> str:
    """A tool-call-shaped turn: the call the agent made and the tool's JSON answer."""
    items = [
        f'{{"id": {turn * 100 + i}, "text": "{WORDS[(agent + i) % len(WORDS)]} {i}"}}'
        for i in range(tokens // 20)
    ]
    args = f'{{"q": "agent {agent} step {turn}"}}'
    call = f'<tool_call>{{"name": "search", "arguments": {args}}}</tool_call>'
    return f"\n{call}\n<tool_response>[{', '.join(items)}]</tool_response>\nAssistant:"


def other_user(tag: str, words: int) -> str:
    """A one-off prompt of about `words` tokens that shares nothing past its first page."""
    return f"{tag}. Summarize: " + " ".join(
        WORDS[(len(tag) + j) % len(WORDS)] for j in range(words)
    )


def complete(url: str, prompt: str, extra: dict, max_tokens: int = 16) -> tuple[float, str, dict]:
    """TTFT (s), the text, and the usage of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    start, first, text, usage = time.perf_counter(), None, [], {}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, **extra}, timeout=900) as r:
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


def sessions_info(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json().get("sessions") or {}


def run(url: str, a: argparse.Namespace, sessions: bool, l1_pages: int) -> dict:
    # half the agents close their sessions at the end, the other half let their TTL run out
    ttls = [3600 if i < a.agents // 2 else a.session_ttl for i in range(a.agents)]
    sids = [
        httpx.post(f"{url}/open_session", json={"timeout": ttl}, timeout=30).json()
        if sessions
        else None
        for ttl in ttls
    ]
    prompts = [
        f"System: you are agent {i}; call tools, then answer.\nUser: task {i}."
        for i in range(a.agents)
    ]
    ttft: list[list[float]] = [[] for _ in range(a.turns)]
    tiers = {"l1": 0, "l2": 0, "l3": 0, "computed": 0}
    bursts, longest = 0, 0
    for turn in range(a.turns):
        for i in range(a.agents):
            prompts[i] += tool_text(i, turn, a.tool_tokens)
            extra = {"session_params": {"id": sids[i]}} if sids[i] else {}
            seconds, text, usage = complete(url, prompts[i], extra)
            prompts[i] += text
            ttft[turn].append(seconds)
            longest = max(longest, usage.get("prompt_tokens", 0))
            got = (usage.get("prompt_tokens_details") or {}).get("by_tier") or {}
            for k in tiers:
                tiers[k] += got.get(k, 0)
        complete(url, other_user(f"Round {turn}, another user", a.noise_tokens), {}, 1)
        if (turn + 1) % a.burst_every == 0 and turn + 1 < a.turns:
            bursts += 1
            for j in range(l1_pages * PAGE // a.burst_tokens + 1):
                complete(url, other_user(f"Burst {bursts} prompt {j}", a.burst_tokens), {}, 1)
    out = {"ttft": ttft, "tiers": tiers, "longest": longest}
    if sessions:
        out["pinned"] = sessions_info(url).get("pinned_pages", 0)
        for sid, ttl in zip(sids, ttls):
            if ttl == 3600:
                httpx.post(f"{url}/close_session", json={"session_id": sid}, timeout=30)
        out["after_close"] = sessions_info(url).get("pinned_pages", 0)
        start = time.monotonic()
        while sessions_info(url).get("open", 0) and time.monotonic() - start < a.session_ttl + 30:
            time.sleep(1)
        out["expired_after"] = time.monotonic() - start
        out["after_expiry"] = sessions_info(url).get("pinned_pages", 0)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


def cell(xs: list[float]) -> str:
    return f"{pct(xs, 0.5) * 1e3:6.0f} / {pct(xs, 0.99) * 1e3:6.0f}"


def report(name: str, r: dict, a: argparse.Namespace) -> None:
    turns = a.turns
    quarters = [range(q * turns // 4, (q + 1) * turns // 4) for q in range(4)]
    cells = [
        f"turns {q.start + 1}-{q.stop}: {cell([x for t in q for x in r['ttft'][t]])}"
        for q in quarters
    ]
    after = [x for t in range(a.burst_every, turns, a.burst_every) for x in r["ttft"][t]]
    print(f"{name}\n  TTFT p50 / p99 ms  " + "  ".join(cells))
    print(f"  turn {turns}: {cell(r['ttft'][-1])}   turns right after a burst: {cell(after)}")
    print(f"  longest prompt: {r['longest'] or 'not reported'} tokens")
    total = sum(r["tiers"].values())
    if total:
        share = ", ".join(f"{k} {v / total:.3f}" for k, v in r["tiers"].items())
        print(f"  prompt tokens by tier: {share} (of {total})")
    if "pinned" in r:
        print(
            f"  pages pinned by {a.agents} sessions at the end {r['pinned']}; after closing "
            f"{a.agents // 2}: {r['after_close']}; after the others' TTL ({a.session_ttl:.0f} s) "
            f"ran out: {r['after_expiry']} ({r['expired_after']:.1f} s after the close)"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--turns", type=int, default=40)
    # NOTE: 40 turns of ~190 tokens (173 + a 16-token reply) reach ~7.6k, within the embedded
    # model's 8192 positions
    ap.add_argument("--tool-tokens", type=int, default=150)
    ap.add_argument("--noise-tokens", type=int, default=400, help="one other user a round")
    ap.add_argument("--burst-every", type=int, default=10, help="rounds between bursts")
    ap.add_argument("--burst-tokens", type=int, default=1500, help="each burst prompt")
    ap.add_argument("--session-ttl", type=float, default=150.0, help="longer than a burst")
    ap.add_argument("--only", nargs="*", help="run only these configurations (by name)")
    ap.add_argument("--no-peer", action="store_true", help="strata only")
    a = ap.parse_args()
    longest = a.turns * (a.tool_tokens + 60) + 200
    need = a.agents * longest // PAGE  # the agents at their longest
    pages = need + 2 * (a.burst_tokens // PAGE + 2) + a.noise_tokens // PAGE
    flags = ["--dtype", "auto", "--num-pages", str(pages), "--context-length", str(2 * longest)]
    fraction = ["--session-pages-fraction", f"{min(0.95, need / pages + 0.01):.3f}"]
    configs = {
        "strata, sessions": (True, fraction),
        "strata, no sessions": (False, []),
        "strata, no sessions, L2 = 2 x L1": (
            False,
            ["--enable-hierarchical-cache", "--hicache-ratio", "2"],
        ),
    }
    for name, (sessions, more) in configs.items():
        if a.only and name not in a.only:
            continue
        with running_server(*flags, *more) as url:
            r = run(url, a, sessions, pages)
        report(name, r, a)
    if has_llama_cpp() and not a.no_peer:
        with llama_cpp_server(n_ctx=2 * longest) as url:
            r = run(url, a, False, pages)
        report("llama-cpp-python (prompt cache)", r, a)
    print(
        f"{a.agents} agents x {a.turns} turns, prompts to ~{longest} tokens (estimate), "
        f"L1 {pages} pages of {PAGE}, a burst every {a.burst_every} rounds of "
        f"{pages * PAGE // a.burst_tokens + 1} prompts x ~{a.burst_tokens} tokens"
    )


if __name__ == "__main__":
    main()
