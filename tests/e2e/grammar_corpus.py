"""Constraint corpus: JSON schemas and regexes of varied shape, each paired with a prompt.

Every string is length-bounded and every number range-bounded, so a greedy small model always
finishes inside the token budget; what is checked is that the output matches the constraint.
"""

from __future__ import annotations

from typing import Any


def s(max_length: int = 24, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, **kw}


def i(lo: int = 0, hi: int = 1000) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def obj(required: bool = True, **props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(props)
    return out


def arr(items: dict[str, Any], lo: int = 0, hi: int = 4) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


def enum(*values: Any) -> dict[str, Any]:
    return {"enum": list(values)}


SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", obj(name=s(), age=i(0, 120))),
    ("a book", obj(title=s(40), author=s(), year=i(1400, 2030))),
    ("a city", obj(name=s(), country=s(), population=i(0, 40_000_000))),
    ("a color", obj(name=s(12), hex=s(7, pattern="^#[0-9a-f]{6}$"))),
    ("a traffic light state", obj(state=enum("red", "amber", "green"))),
    ("a yes/no answer", obj(answer={"type": "boolean"})),
    ("a temperature reading", obj(celsius={"type": "number", "minimum": -90, "maximum": 60})),
    ("a shopping list", obj(items=arr(s(16), 1, 4))),
    ("three lucky numbers", obj(numbers=arr(i(1, 99), 3, 3))),
    ("a point", obj(x=i(-100, 100), y=i(-100, 100))),
    ("a rectangle", obj(top_left=obj(x=i(), y=i()), bottom_right=obj(x=i(), y=i()))),
    ("an address", obj(street=s(), city=s(), zip=s(5, pattern="^[0-9]{5}$"))),
    (
        "a user account",
        obj(username=s(16, pattern="^[a-z][a-z0-9_]{2,15}$"), active={"type": "boolean"}),
    ),  # noqa: E501
    (
        "a product",
        obj(
            sku=s(8, pattern="^[A-Z]{3}-[0-9]{4}$"),
            price={"type": "number", "minimum": 0, "maximum": 1000},
        ),
    ),  # noqa: E501
    ("an HTTP response", obj(status=enum(200, 201, 400, 404, 500), message=s())),
    ("a weekday", enum("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")),
    ("a single integer", i(0, 50)),
    ("a single word", s(12, pattern="^[a-z]{1,12}$")),
    ("a list of two colors", arr(enum("red", "green", "blue", "yellow"), 2, 2)),
    ("a movie with optional rating", obj(False, title=s(30), rating=i(1, 5))),
    (
        "a pet",
        {
            **obj(name=s(12), species=enum("cat", "dog", "bird")),
            "properties": {"name": s(12), "species": enum("cat", "dog", "bird"), "age": i(0, 30)},
            "required": ["name", "species"],
        },
    ),
    ("a team", obj(name=s(), members=arr(obj(name=s(16), role=enum("lead", "dev", "qa")), 1, 3))),
    ("a matrix", obj(rows=arr(arr(i(0, 9), 2, 2), 2, 2))),
    ("a recipe", obj(dish=s(), ingredients=arr(obj(item=s(16), grams=i(1, 1000)), 1, 3))),
    ("an event", obj(name=s(), date=s(10, pattern="^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))),
    ("a time of day", obj(hour=i(0, 23), minute=i(0, 59))),
    ("a score card", obj(home=i(0, 20), away=i(0, 20), final={"type": "boolean"})),
    ("a language", obj(name=s(), paradigm=enum("functional", "imperative", "logic"))),
    ("a flight", obj(code=s(6, pattern="^[A-Z]{2}[0-9]{1,4}$"), seats=i(1, 500))),
    ("a planet", obj(name=s(12), moons=i(0, 100), rings={"type": "boolean"})),
    ("a tag list", obj(tags=arr(s(10, pattern="^[a-z]{1,10}$"), 0, 3))),
    ("a key-value pair", obj(key=s(12), value={"anyOf": [i(), s(12)]})),
    ("a nullable nickname", obj(name=s(16), nickname={"anyOf": [s(12), {"type": "null"}]})),
    (
        "a measurement",
        obj(value={"type": "number", "minimum": 0, "maximum": 100}, unit=enum("cm", "m", "km")),
    ),
    ("a student", obj(name=s(), grades=arr(i(0, 100), 1, 4), passed={"type": "boolean"})),
    (
        "an order",
        obj(
            id=i(1, 99999),
            lines=arr(obj(sku=s(8), qty=i(1, 9)), 1, 2),
            status=enum("open", "shipped"),
        ),
    ),
    ("a tree node", obj(value=i(), children=arr(obj(value=i()), 0, 2))),
    (
        "a config",
        obj(debug={"type": "boolean"}, level=enum("info", "warn", "error"), retries=i(0, 5)),
    ),
    (
        "coordinates",
        obj(
            lat={"type": "number", "minimum": -90, "maximum": 90},
            lon={"type": "number", "minimum": -180, "maximum": 180},
        ),
    ),
    ("an email", obj(to=s(30, pattern="^[a-z]{1,10}@[a-z]{1,10}\\.com$"), subject=s(30))),
    ("a version", obj(major=i(0, 9), minor=i(0, 99), patch=i(0, 99))),
    (
        "a chess move",
        obj(piece=enum("K", "Q", "R", "B", "N", "P"), square=s(2, pattern="^[a-h][1-8]$")),
    ),
    ("a greeting", obj(language=enum("en", "fr", "de"), text=s(20))),
    (
        "a bank transfer",
        obj(
            amount={"type": "number", "minimum": 0.01, "maximum": 10000},
            currency=enum("EUR", "USD"),
            reference=s(16),
        ),
    ),
    ("an empty object", {"type": "object", "properties": {}, "additionalProperties": False}),
    ("a pair of booleans", arr({"type": "boolean"}, 2, 2)),
    ("a rating with comment", obj(stars=i(1, 5), comment=s(40))),
    (
        "a sensor log",
        obj(sensor=s(10), readings=arr({"type": "number", "minimum": 0, "maximum": 10}, 1, 3)),
    ),
    ("a nested profile", obj(user=obj(name=s(16), contact=obj(email=s(24), phone=s(12))))),
    ("a const kind", obj(kind={"const": "widget"}, size=enum("S", "M", "L"))),
    ("a ticket", obj(title=s(30), priority=i(1, 4), labels=arr(enum("bug", "ui", "api"), 0, 2))),
    ("a choice of shape", {"oneOf": [obj(circle=i(1, 9)), obj(square=i(1, 9))]}),
]

REGEXES: list[tuple[str, str]] = [
    ("a phone number", r"[0-9]{3}-[0-9]{3}-[0-9]{4}"),
    ("a date", r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
    ("a time", r"([01][0-9]|2[0-3]):[0-5][0-9]"),
    ("yes or no", r"(yes|no)"),
    (
        "an IPv4 address",
        r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    ),  # noqa: E501
    ("a lowercase word", r"[a-z]{1,12}"),
    ("a capitalized name", r"[A-Z][a-z]{1,10} [A-Z][a-z]{1,10}"),
    ("a hex color", r"#[0-9a-fA-F]{6}"),
    ("an email address", r"[a-z]{1,10}@[a-z]{1,10}\.(com|org|net)"),
    ("a price", r"\$[0-9]{1,4}\.[0-9]{2}"),
    ("a percentage", r"(100|[0-9]{1,2})%"),
    ("a US zip code", r"[0-9]{5}(-[0-9]{4})?"),
    ("a license plate", r"[A-Z]{2}-[0-9]{3}-[A-Z]{2}"),
    ("a version string", r"v[0-9]\.[0-9]{1,2}\.[0-9]{1,2}"),
    ("a short sentence", r"[A-Z][a-z ]{3,30}\."),
    ("a grade", r"[A-F][+-]?"),
    ("a number with sign", r"[+-]?[0-9]{1,5}"),
    ("a decimal number", r"[0-9]{1,3}\.[0-9]{1,3}"),
    ("a chess square", r"[a-h][1-8]"),
    ("a comma separated triple", r"[a-z]{1,8}, [a-z]{1,8}, [a-z]{1,8}"),
    ("a UUID prefix", r"[0-9a-f]{8}-[0-9a-f]{4}"),
    ("an ISBN", r"97[89]-[0-9]{10}"),
    ("a weekday abbreviation", r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun)"),
    ("a file name", r"[a-z_]{1,12}\.(txt|csv|json)"),
    ("a tweet-like tag", r"#[A-Za-z]{2,15}"),
    ("a fraction", r"[1-9][0-9]?/[1-9][0-9]?"),
    ("a roman numeral", r"(X{0,3})(IX|IV|V?I{0,3})"),
    ("a key=value pair", r"[a-z]{1,8}=[0-9]{1,4}"),
    ("a temperature", r"-?[0-9]{1,2}(\.[0-9])? ?(C|F)"),
    ("a URL", r"https://[a-z]{2,12}\.(com|org)/[a-z]{1,10}"),
    ("an answer in quotes", r"\"[A-Za-z ]{1,20}\""),
]
