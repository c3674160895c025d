"""The expressions a program appends to its state with `s += ...`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Sampling parameters a program's run / run_batch may default (SGLang's names, as /generate's
# sampling_params); a gen's own argument wins over the default.
SAMPLING_KEYS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
)


class _Joins:
    """`a + b` for expressions, with a string on either side (SGLang's concatenation)."""

    def __add__(self, other: Expr) -> Concat:
        return Concat(_parts(self) + _parts(other))  # type: ignore[arg-type]

    def __radd__(self, other: Expr) -> Concat:
        return Concat(_parts(other) + _parts(self))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Gen(_Joins):
    name: str | None
    sampling: tuple[tuple[str, Any], ...] = ()  # the sampling parameters this gen sets
    regex: str | None = None
    json_schema: str | None = None


@dataclass(frozen=True)
class Select(_Joins):
    name: str | None
    choices: tuple[str, ...]


@dataclass(frozen=True)
class RoleBegin(_Joins):
    role: str


@dataclass(frozen=True)
class RoleEnd(_Joins):
    role: str


@dataclass(frozen=True)
class Role(_Joins):
    role: str
    content: tuple[Expr, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Concat(_Joins):
    parts: tuple[Expr, ...]


Expr = str | Gen | Select | RoleBegin | RoleEnd | Role | Concat


def _parts(e: Expr) -> tuple[Expr, ...]:
    return e.parts if isinstance(e, Concat) else (e,)


def _schema_text(schema: Any) -> str | None:
    if schema is None or isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if hasattr(schema, "model_json_schema"):  # a pydantic model class
        return json.dumps(schema.model_json_schema())
    raise TypeError("json_schema must be a JSON string, a dict or a pydantic model class")


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    choices: Sequence[str] | None = None,
) -> Gen | Select:
    """Generate text into state[name]; with `choices`, the same as `select`. Sampling
    arguments left out come from run / run_batch, else the server's defaults (max_tokens
    128, temperature 1.0)."""
    if choices is not None:
        return select(name, choices)
    stops = (stop,) if isinstance(stop, str) else (tuple(stop) if stop else None)
    given = {
        "max_new_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "ignore_eos": ignore_eos,
        "stop": stops,
    }
    sampling = tuple((k, v) for k, v in given.items() if v is not None)
    return Gen(name, sampling, regex, _schema_text(json_schema))


def select(name: str | None = None, choices: Sequence[str] = ()) -> Select:
    """Pick the choice the model finds most likely (mean token log-probability)."""
    if not choices:
        raise ValueError("select needs at least one choice")
    return Select(name, tuple(choices))


def _role(role: str, content: Expr | Sequence[Expr] | None) -> Role:
    if content is None:
        parts: tuple[Expr, ...] = ()
    elif isinstance(content, (list, tuple)):
        parts = tuple(content)
    else:
        parts = (content,)  # type: ignore[assignment]
    return Role(role, parts)


def system(content: Expr | Sequence[Expr] | None = None) -> Role:
    return _role("system", content)


def user(content: Expr | Sequence[Expr] | None = None) -> Role:
    return _role("user", content)


def assistant(content: Expr | Sequence[Expr] | None = None) -> Role:
    return _role("assistant", content)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")
