"""Extract structured data: once with a regex, once with a JSON schema (pydantic).

python examples/json_extraction.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json
import re

from pydantic import BaseModel, Field

import strata.lang as sl

TEXT = (
    "Ada Lovelace was born on 10 December 1815 in London. She wrote the first published "
    "algorithm for Charles Babbage's Analytical Engine and died at the age of 36."
)
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"


class Person(BaseModel):
    name: str = Field(max_length=40)
    birth_year: int = Field(ge=1000, le=2100)
    city: str = Field(max_length=30)
    age_at_death: int = Field(ge=0, le=130)


@sl.function
def extract_date(s, text: str):
    s += sl.user(f"{text}\nWhen was she born? Give the date as YYYY-MM-DD.")
    s += sl.assistant(sl.gen("date", max_tokens=16, regex=DATE, temperature=0))


@sl.function
def extract_person(s, text: str):
    s += sl.system("You extract facts from text as JSON.")
    s += sl.user(f"{text}\nReturn the person as JSON.")
    s += sl.assistant(sl.gen("person", max_tokens=96, json_schema=Person, temperature=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    args = ap.parse_args()
    sl.set_default_backend(sl.RuntimeEndpoint(args.url))
    date = extract_date.run(text=TEXT)["date"]
    assert re.fullmatch(DATE, date), date
    person = Person.model_validate(json.loads(extract_person.run(text=TEXT)["person"]))
    print(f"date: {date}\nperson: {person.model_dump_json()}")


if __name__ == "__main__":
    main()
