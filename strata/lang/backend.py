"""RuntimeEndpoint: runs a program's `gen` and `select` against a strata (or SGLang) server."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from typing import Any

import httpx

from strata.lang.ir import Gen


class BackendError(RuntimeError):
    """The server refused or failed a request (its message is kept)."""


class RuntimeEndpoint:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._roles: dict[str, list[str]] | None = None
        self._lock = threading.Lock()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self._http.post(path, json=body)
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except Exception:
                message = resp.text
            raise BackendError(f"{path}: HTTP {resp.status_code}: {message}")
        return dict(resp.json())

    def role_markers(self, role: str) -> tuple[str, str]:
        """The chat template's text before and after a message of this role."""
        with self._lock:
            if self._roles is None:
                info = self._http.get("/get_model_info").json()
                self._roles = info.get("chat_roles") or {}
        begin, end = (self._roles or {}).get(role, [f"{role}: ", "\n"])
        return begin, end

    def generate(
        self,
        text: str,
        g: Gen,
        defaults: dict[str, Any] | None = None,
        on_text: Callable[[str], object] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """defaults: the program run's sampling defaults; the gen's own arguments win. With
        on_text, the text is streamed and handed over piece by piece as it arrives."""
        params: dict[str, Any] = {"max_new_tokens": 128, "temperature": 1.0}
        params.update(defaults or {})
        params.update(g.sampling)
        if g.regex is not None:
            params["regex"] = g.regex
        if g.json_schema is not None:
            params["json_schema"] = g.json_schema
        body = {"text": text, "sampling_params": params}
        if on_text is None:
            out = self._post("/generate", body)
            return str(out["text"]), dict(out["meta_info"])
        got, meta = "", {}
        with self._http.stream("POST", "/generate", json={**body, "stream": True}) as resp:
            if resp.status_code != 200:
                resp.read()
                raise BackendError(f"/generate: HTTP {resp.status_code}: {resp.text}")
            for line in resp.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                full = str(event["text"])  # SGLang's events carry the text so far
                if len(full) > len(got):
                    on_text(full[len(got) :])
                got, meta = full, dict(event["meta_info"])
        return got, meta

    def warm(self, text: str) -> None:
        """Have the server compute (and cache) text's KV: a one-token generation."""
        self._post("/generate", {"text": text, "sampling_params": {"max_new_tokens": 1}})

    def tokenize(self, text: str) -> list[int]:
        return list(self._post("/tokenize", {"text": text})["tokens"])

    def select(self, text: str, choices: tuple[str, ...]) -> tuple[int, list[float]]:
        """Score each choice by the mean log-probability of its tokens after text (input
        logprobs computed by the server; the shared prefix comes from its radix cache)."""
        prefix = self.tokenize(text)
        scores = []
        for choice in choices:
            full = self.tokenize(text + choice)
            start = 0
            while start < min(len(prefix), len(full)) and prefix[start] == full[start]:
                start += 1
            if start >= len(full):  # empty choice: nothing to score
                scores.append(0.0)
                continue
            out = self._post(
                "/generate",
                {
                    "input_ids": full,
                    "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                    "return_logprob": True,
                    "logprob_start_len": start,
                },
            )
            lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"] if lp is not None]
            scores.append(sum(lps) / len(lps) if lps else -math.inf)
        best = max(range(len(choices)), key=lambda i: scores[i])
        return best, scores

    def close(self) -> None:
        self._http.close()


_default: RuntimeEndpoint | None = None


def set_default_backend(backend: RuntimeEndpoint) -> None:
    global _default
    _default = backend


def default_backend() -> RuntimeEndpoint:
    if _default is None:
        raise RuntimeError("no backend: call set_default_backend(RuntimeEndpoint(url)) first")
    return _default
