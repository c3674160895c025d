"""Benchmark client: drives any OpenAI-compatible server with streaming chat requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from strata.bench.workloads import Conversation


@dataclass
class RequestRecord:
    messages: list[dict[str, str]]
    reply: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


class ChatClient:
    def __init__(self, url: str, model: str, max_tokens: int, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.model, self.max_tokens = model, max_tokens
        self.http = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=256))

    async def close(self) -> None:
        await self.http.aclose()

    async def chat(self, messages: list[dict[str, str]]) -> RequestRecord:
        rec = RequestRecord([dict(m) for m in messages])
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = last = time.perf_counter()
        parts: list[str] = []
        try:
            async with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                    return rec
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("usage"):
                        self._usage(rec, chunk["usage"])
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            now = time.perf_counter()
                            if not parts:
                                rec.ttft = now - start
                            else:
                                rec.itl.append(now - last)
                            last = now
                            parts.append(text)
        except httpx.HTTPError as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        rec.reply, rec.latency = "".join(parts), time.perf_counter() - start
        return rec

    @staticmethod
    def _usage(rec: RequestRecord, usage: dict[str, Any]) -> None:
        rec.prompt_tokens = usage.get("prompt_tokens", 0)
        rec.completion_tokens = usage.get("completion_tokens", 0)
        details = usage.get("prompt_tokens_details") or {}
        rec.cached_tokens = details.get("cached_tokens") or 0


async def run_conversations(
    client: ChatClient, convs: Sequence[Conversation], concurrency: int, per_turn: bool = False
) -> list[RequestRecord]:
    """Each conversation runs its turns in order; up to `concurrency` conversations at once,
    or with per_turn, every conversation is open and up to `concurrency` turns run at once
    (many users, each thinking between turns)."""
    records: list[RequestRecord] = []
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=sum(len(c.user_turns) for c in convs), desc="requests", unit="req")

    async def turn(conv: Conversation, ask: str) -> None:
        conv.messages.append({"role": "user", "content": ask})
        rec = await client.chat(conv.messages)
        records.append(rec)
        bar.update()
        conv.messages.append({"role": "assistant", "content": rec.reply})

    async def one(conv: Conversation) -> None:
        if per_turn:
            for ask in conv.user_turns:
                async with gate:
                    await turn(conv, ask)
            return
        async with gate:
            for ask in conv.user_turns:
                await turn(conv, ask)

    await asyncio.gather(*(one(c) for c in convs))
    bar.close()
    return records


async def run_requests(
    client: ChatClient, requests: Sequence[list[dict[str, str]]], concurrency: int
) -> list[RequestRecord]:
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc="requests", unit="req")

    async def one(messages: list[dict[str, str]]) -> RequestRecord:
        async with gate:
            rec = await client.chat(messages)
            bar.update()
            return rec

    records = await asyncio.gather(*(one(m) for m in requests))
    bar.close()
    return list(records)
