"""Structured generation against a real `strata serve`: the corpus through the OpenAI API,
/generate and the strata.lang DSL; bad constraints; the examples end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

import strata.lang as sl
from launch.local import running_server
from tests.e2e.grammar_corpus import REGEXES, SCHEMAS
from tests.e2e.test_server import health, wait_idle

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def url():
    with running_server() as u:
        yield u


def no_pages_leaked(url: str) -> None:
    h = wait_idle(url)
    assert h["pages_free"] + h["radix_cache_stats"]["cached_pages"] == h["pages_total"], h
    assert h["radix_cache_stats"]["locked_pages"] == 0, h


def check_json(schema: dict, text: str, finish: str) -> None:
    assert finish == "stop", f"{finish}: {text!r}"
    jsonschema.validate(json.loads(text), schema)


def check_regex(pattern: str, text: str, finish: str) -> None:
    assert finish == "stop", f"{finish}: {text!r}"
    assert re.fullmatch(pattern, text), f"{text!r} does not match {pattern!r}"


def test_corpus_through_openai_and_generate(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=300)

    def schema_case(case):
        what, schema = case
        out = client.chat.completions.create(
            model="strata",
            temperature=0,
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": f"Give me {what} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
        check_json(schema, out.choices[0].message.content, out.choices[0].finish_reason)

    def regex_case(case):
        what, pattern = case
        body = {
            "text": f"Write {what}: ",
            "sampling_params": {"regex": pattern, "max_new_tokens": MAX_TOKENS, "temperature": 0},
        }
        out = httpx.post(f"{url}/generate", json=body, timeout=300).json()
        check_regex(pattern, out["text"], out["meta_info"]["finish_reason"]["type"])

    with ThreadPoolExecutor(16) as pool:
        jobs = [pool.submit(schema_case, c) for c in SCHEMAS]
        jobs += [pool.submit(regex_case, c) for c in REGEXES]
        for job in jobs:
            job.result()
    no_pages_leaked(url)


def test_corpus_through_the_dsl(url):
    backend = sl.RuntimeEndpoint(url)

    @sl.function
    def constrained(s, what, schema=None, regex=None):
        s += sl.user(f"Give me {what}.")
        s += sl.assistant(
            sl.gen("out", max_tokens=MAX_TOKENS, temperature=0.7, regex=regex, json_schema=schema)
        )

    cases = [{"what": w, "schema": sc} for w, sc in SCHEMAS]
    cases += [{"what": w, "regex": rx} for w, rx in REGEXES]
    states = constrained.run_batch(cases, backend=backend, num_threads=16)
    for case, state in zip(cases, states, strict=True):
        finish = state.meta["out"]["finish_reason"]["type"]
        if "schema" in case:
            check_json(case["schema"], state["out"], finish)
        else:
            check_regex(case["regex"], state["out"], finish)
    no_pages_leaked(url)


BAD = [
    ({"regex": "[a-z"}, "invalid regex"),
    ({"regex": "(a|b"}, "invalid regex"),
    ({"json_schema": "{not json"}, "invalid JSON schema"),
    ({"json_schema": json.dumps({"type": "frobnicate"})}, "invalid JSON schema"),
    ({"ebnf": 'root ::= "a" | '}, "invalid EBNF grammar"),
    ({"ebnf": "root ::= undefined_rule"}, "invalid EBNF grammar"),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one of"),
    ({"regex": "a" * 70_000}, "too large"),
]


@pytest.mark.parametrize("params,needle", BAD)
def test_bad_constraints_are_rejected_and_harm_nothing(url, params, needle):
    body = {"text": "hello", "sampling_params": {**params, "max_new_tokens": 8}}
    resp = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert resp.status_code == 400
    assert needle in resp.json()["error"]["message"]
    # the server still serves constrained requests afterwards, and nothing leaked
    body = {"text": "Answer: ", "sampling_params": {"regex": "(yes|no)", "temperature": 0}}
    ok = httpx.post(f"{url}/generate", timeout=60, json=body)
    assert ok.json()["text"] in ("yes", "no")
    no_pages_leaked(url)


def test_forced_text_ending_inside_a_character_is_generated(url):
    """Found by schemathesis: a regex forcing a 4-byte character made jump-forward decode
    half of it (xgrammar raised UnicodeDecodeError and the request ended with a 500)."""
    body = {
        "text": "hi",
        "sampling_params": {"regex": "\u00d9\U00026ba9;", "temperature": 0, "max_new_tokens": 12},
    }
    resp = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"] == "\u00d9\U00026ba9;"
    no_pages_leaked(url)


def test_bad_response_format_and_stream_rejected_before_200(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60)
    msgs = [{"role": "user", "content": "hi"}]
    for fmt in (
        {"type": "json_schema"},
        {"type": "xml"},
        {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="strata", messages=msgs, response_format=fmt, stream=True
            )
    no_pages_leaked(url)


def test_constrained_request_hitting_the_budget_reports_length(url):
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    body = {
        "text": "Tell a long story as JSON: ",
        "sampling_params": {
            "json_schema": json.dumps(schema),
            "max_new_tokens": 6,
            "temperature": 0,
        },
    }
    out = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["completion_tokens"] == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(out["text"])


def test_json_object_and_streaming_constrained_chat(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120)
    stream = client.chat.completions.create(
        model="strata",
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        response_format={"type": "json_object"},
    )
    chunks = [c for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # the built-in JSON grammar does not bound lengths: it may run out of tokens
        assert finish == "length" and text.startswith("{")


def test_select_scores_choices_by_logprob(url):
    backend = sl.RuntimeEndpoint(url)

    @sl.function
    def capital(s):
        s += sl.user("What is the capital of France?")
        s += sl.assistant(
            [
                "The capital of France is ",
                sl.select("city", choices=["Paris", "a village on the moon", "Berlin"]),
            ]
        )

    state = capital.run(backend=backend)
    scores = state.meta["city"]["scores"]
    assert state["city"] == "Paris" and scores[0] == max(scores)
    assert all(-100 < x < 0 for x in scores)
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[-1]["content"] == "The capital of France is Paris"


def test_fork_gives_independent_branches(url):
    backend = sl.RuntimeEndpoint(url)

    @sl.function
    def branches(s):
        s += sl.user("Name a fruit.")
        s += sl.assistant_begin()
        forks = s.fork(2)
        for f, start in zip(forks, ["Apple", "Banana"]):
            f += start + " is"
            f += sl.gen("rest", max_tokens=6, temperature=0)
        forks.join()
        s += forks[0]["rest"]
        s += sl.assistant_end()
        return forks

    state = branches.run(backend=backend)
    assert state.messages()[-1]["role"] == "assistant"
    assert "Apple" not in state.text() and "Banana" not in state.text()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_run_end_to_end(url, example):
    fewer = ["--programs", "16"] if example.stem == "batch_programs" else []  # of 64: 17 s
    run = subprocess.run(
        [sys.executable, str(example), "--url", url, *fewer],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip()
    no_pages_leaked(url)


def test_health_reports_jump_forward(url):
    assert health(url)["jump_forward_tokens"] > 0


def test_dsl_concatenation_and_run_sampling_defaults(url):
    backend = sl.RuntimeEndpoint(url)

    @sl.function
    def fruits(s):
        s += "Name two fruits.\nFruit 1:" + sl.gen("one", stop="\n") + "\nFruit 2:"
        s += sl.gen("two", stop="\n") + "\n"

    greedy = fruits.run(backend=backend, temperature=0, max_new_tokens=8)
    again = fruits.run(backend=backend, temperature=0, max_new_tokens=8)
    assert greedy["one"] == again["one"] and greedy["two"] == again["two"]  # temperature 0
    assert greedy.text().startswith("Name two fruits.\nFruit 1:" + greedy["one"] + "\nFruit 2:")
    assert greedy.get_meta_info("one")["completion_tokens"] <= 8

    @sl.function
    def own(s):
        s += "Count:" + sl.gen("n", max_tokens=5, ignore_eos=True)

    state = own.run(backend=backend, max_new_tokens=2, temperature=0)
    assert state.get_meta_info("n")["completion_tokens"] == 5  # the gen's own argument wins
    states = own.run_batch([{}, {}], backend=backend, temperature=0)
    assert states[0]["n"] == states[1]["n"]

    @sl.function
    def clash(s, temperature):
        s += sl.gen("x", temperature=temperature)

    with pytest.raises(TypeError, match="temperature"):
        clash.run(backend=backend, temperature=0)


def test_dsl_streams_text_and_sessions_warm_the_cache(url):
    backend = sl.RuntimeEndpoint(url)

    @sl.function
    def story(s, topic):
        s += sl.system("You are a storyteller. " * 12)
        s += sl.user(f"Tell a short story about {topic}.")
        s += sl.assistant(sl.gen("story", max_tokens=24, ignore_eos=True))

    whole = story.run(topic="a lighthouse", backend=backend, temperature=0)
    streamed = story.run(topic="a lighthouse", backend=backend, temperature=0, stream=True)
    pieces = list(streamed.text_iter())
    assert "".join(pieces) == streamed.text() == whole.text()
    assert sum(1 for p in pieces if p) > 4  # the gen arrived in pieces

    @sl.function
    def prefix(s):
        s += sl.system("You answer in haiku. " * 20)

    @sl.function
    def haiku(s, topic):
        s += sl.system("You answer in haiku. " * 20)
        s += sl.user(topic)
        s += sl.assistant(sl.gen("poem", max_tokens=8))

    httpx.post(f"{url}/flush_cache", timeout=30)
    with sl.session(backend) as sess:
        sess.run(prefix)  # no gen: the session prefills the prefix itself
        state = sess.run(haiku, topic="rain", temperature=0)
    assert state.get_meta_info("poem")["cached_tokens"] >= 64  # the prefix was warm
