"""Constraint: what a request's output must match (a value type; the compiler cache key)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

ConstraintKind = Literal["regex", "json_schema", "ebnf", "json_object"]
KINDS: tuple[str, ...] = ("regex", "json_schema", "ebnf", "json_object")


@dataclass(frozen=True)
class Constraint:
    kind: ConstraintKind
    source: str = ""  # the regex, the schema as JSON text, or the EBNF grammar

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: str | dict[str, Any]) -> Constraint:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", text)


def constraint_from_fields(
    regex: str | None, json_schema: str | dict[str, Any] | None, ebnf: str | None
) -> Constraint | None:
    """The constraint named by SGLang-style sampling fields (at most one may be set)."""
    given = [
        (k, v)
        for k, v in (("regex", regex), ("json_schema", json_schema), ("ebnf", ebnf))
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError("give at most one of regex, json_schema, ebnf")
    if not given:
        return None
    kind, value = given[0]
    if kind == "json_schema":
        return Constraint.json_schema(value)  # type: ignore[arg-type]
    return Constraint(kind, value)  # type: ignore[arg-type]


def constraint_from_response_format(fmt: dict[str, Any] | None) -> Constraint | None:
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict}."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = (fmt or {}).get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError("response_format.json_schema must be an object with a `schema`")
        return Constraint.json_schema(spec["schema"])
    raise ValueError(f"response_format.type must be text, json_object or json_schema, not {kind!r}")
