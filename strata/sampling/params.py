"""SamplingParams: what a request asks of the sampler and of the stop conditions."""

from __future__ import annotations

from dataclasses import dataclass

from strata.grammar.constraint import Constraint

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # <= 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # Hugging Face style, over prompt and output tokens
    frequency_penalty: float = 0.0  # OpenAI style, over output tokens
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logprob_start_len: int = -1  # >= 0: also return logprobs of prompt tokens from here on
    constraint: Constraint | None = None  # regex / JSON schema / EBNF the output must match
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's
    # retention: the request's cached prefix outlasts lower priorities in L1 and L2 eviction
    # for priority_ttl seconds after the request ends (0: plain LRU)
    priority: int = 0
    priority_ttl: float = 600.0

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (
                0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (len(self.stop) <= 16, "at most 16 stop strings"),
            (self.logprob_start_len >= -1, "logprob_start_len must be >= -1"),
            (
                all(-100 <= b <= 100 for _, b in self.logit_bias),
                "logit_bias values must be in [-100, 100]",
            ),
            (len(self.logit_bias) <= 300, "at most 300 logit_bias entries"),
            (0 <= self.priority <= 100, "priority must be in [0, 100]"),
            (0 < self.priority_ttl <= 86400, "priority_ttl must be in (0, 86400] seconds"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.frequency_penalty != 0
            or self.presence_penalty != 0
        )

    @property
    def filtered(self) -> bool:
        return self.top_k > 1 or self.top_p < 1 or self.min_p > 0
