"""The expressions a program appends to its state with `s += ...`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Gen:
    name: str | None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    regex: str | None = None
    json_schema: str | None = None


@dataclass(frozen=True)
class Select:
    name: str | None
    choices: tuple[str, ...]


@dataclass(frozen=True)
class RoleBegin:
    role: str


@dataclass(frozen=True)
class RoleEnd:
    role: str


@dataclass(frozen=True)
class Role:
    role: str
    content: tuple[Expr, ...] = field(default_factory=tuple)


Expr = str | Gen | Select | RoleBegin | RoleEnd | Role


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
    max_tokens: int = 128,
    stop: str | Sequence[str] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    regex: str | None = None,
    json_schema: Any = None,
    choices: Sequence[str] | None = None,
) -> Gen | Select:
    """Generate text into state[name]; with `choices`, the same as `select`."""
    if choices is not None:
        return select(name, choices)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Gen(name, max_tokens, stops, temperature, top_p, regex, _schema_text(json_schema))


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
