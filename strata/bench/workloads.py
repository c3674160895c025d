"""Benchmark workloads: deterministic conversations and prompts (seeded)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORDS = (
    "cache page token prefix radix tree decode prefill batch schedule latency throughput "
    "memory kernel attention query key value layer model server request stream policy user "
    "agent tool answer question context window budget eviction sharing reuse conversation"
).split()
TOPICS = [
    "the ocean",
    "mountains",
    "a library",
    "trains",
    "gardening",
    "the moon",
    "bread",
    "chess",
    "rivers",
    "music",
    "bicycles",
    "volcanoes",
    "bees",
    "maps",
    "clocks",
    "tea",
]


def filler(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def system_prompt(approx_tokens: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return (
        "You are a helpful assistant for a company that serves language models. Follow the "
        "policy below when you answer. Policy: " + filler(max(approx_tokens - 30, 10), rng) + "."
    )


@dataclass
class Conversation:
    system: str
    user_turns: list[str]
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.messages = [{"role": "system", "content": self.system}]


def multiturn(
    conversations: int, turns: int, system_tokens: int, seed: int = 0
) -> list[Conversation]:
    rng = random.Random(seed + 1)
    system = system_prompt(system_tokens, seed)
    out = []
    for i in range(conversations):
        topic = TOPICS[i % len(TOPICS)]
        asks = [f"Tell me something about {topic}."] + [
            f"Interesting. Say more about {topic} and {rng.choice(WORDS)}."
            for _ in range(turns - 1)
        ]
        out.append(Conversation(system, asks))
    return out


def sessions(count: int, turns: int, context_tokens: int, seed: int = 0) -> list[Conversation]:
    """Agent-like sessions, each with its own long context (a private document in its system
    prompt): the working set grows with the number of sessions, not one shared prefix."""
    rng = random.Random(seed + 2)
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        doc = system_prompt(context_tokens, seed=seed * 1000 + i + 1)
        asks = [f"Summarize the policy for {topic} (session {i})."] + [
            f"Now apply it to {topic} and {rng.choice(WORDS)}." for _ in range(turns - 1)
        ]
        out.append(Conversation(doc, asks))
    return out


def shared_prefix(requests: int, prefix_tokens: int, seed: int = 0) -> list[list[dict[str, str]]]:
    system = system_prompt(prefix_tokens, seed)
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {i}: what about {TOPICS[i % len(TOPICS)]}?"},
        ]
        for i in range(requests)
    ]


def random_prompts(requests: int, max_words: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [
        [{"role": "user", "content": filler(rng.randint(8, max_words), rng)}]
        for _ in range(requests)
    ]
