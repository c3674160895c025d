"""Tool calls in each family's own format (--tool-call-parser): the tools and the history's
calls rendered by the model's chat template (a Qwen 2.5-style one, over the embedded
model's tokenizer), and each format's calls read from a reply, streamed or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.chat_stream import ChatStream
from gateway.protocol import ChatCompletionRequest
from gateway.tool_formats import FORMATS, tool_format
from strata.engine.request import RequestOutput
from strata.model.loader import load_tokenizer, resolve_checkpoint
from strata.tokenizer import chat_prompt_ids

TEMPLATE = (Path(__file__).parents[1] / "data" / "qwen_tools.jinja").read_text()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
NAMES = {"get_weather", "get_time"}
ARGS = {"city": "Paris"}


def call(name: str = "get_weather", key: str = "arguments") -> str:
    return json.dumps({"name": name, key: ARGS})


@pytest.mark.parametrize(
    "fmt,reply,content",
    [
        ("json", call(), ""),
        ("hermes", f"<tool_call>\n{call()}\n</tool_call>", ""),
        ("qwen25", f"Let me look.\n<tool_call>\n{call()}\n</tool_call>", "Let me look."),
        ("hermes", f"<tool_call>\n{call()}\n</tool_call>\n<tool_call>{call()}</tool_call>", ""),
        ("hermes", f"<tool_call>\n{call()}", ""),  # the model stopped before the close tag
        ("llama3", "<|python_tag|>" + call(key="parameters"), ""),
        ("llama3", call(key="parameters") + "; " + call(key="parameters"), ""),
        ("mistral", f"[TOOL_CALLS] [{call()}, {call()}]", ""),
        ("mistral", f"[{call()}]", ""),  # [TOOL_CALLS] is a special token: decoded away
    ],
)
def test_each_format_reads_its_calls(fmt, reply, content):
    got = FORMATS[fmt].calls(reply, NAMES, many=True)
    assert got is not None
    assert got[0] == content and got[1][0] == {"name": "get_weather", "arguments": ARGS}
    assert len(got[1]) == reply.count('"name"')


@pytest.mark.parametrize(
    "fmt,reply",
    [
        ("json", "The weather is fine."),
        ("json", call("rm_rf")),  # not one of the tools
        ("json", f"[{call()}]"),  # a list without parallel_tool_calls
        ("hermes", "<tool_call>\nnot json\n</tool_call>"),
        ("hermes", "Sunny, 21 C."),
        ("llama3", '{"city": "Paris"}'),  # JSON, but not a call
        ("mistral", "[TOOL_CALLS] [1, 2]"),
    ],
)
def test_anything_else_is_content(fmt, reply):
    assert FORMATS[fmt].calls(reply, NAMES, many=False) is None


def test_a_stream_holds_only_what_may_still_be_calls():
    hermes, json_fmt = FORMATS["hermes"], FORMATS["json"]
    assert hermes.may_call("") and hermes.may_call("  <tool") and hermes.may_call("<tool_call>{")
    assert not hermes.may_call("Sunny") and not hermes.may_call("<b>")
    assert json_fmt.may_call(' {"na') and not json_fmt.may_call("Hello")
    assert FORMATS["llama3"].may_call("<|python") and FORMATS["llama3"].may_call('{"name"')
    with pytest.raises(ValueError, match="--tool-call-parser must be one of"):
        tool_format("pythonic")


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(resolve_checkpoint(None))
    tok.chat_template = TEMPLATE
    return tok


def test_the_template_renders_the_tools_and_the_history_calls(tokenizer):
    body = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps(ARGS)},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
    )
    fmt = FORMATS["hermes"]
    text = tokenizer.decode(chat_prompt_ids(tokenizer, body.chat(fmt), body.template_tools(fmt)))
    assert '"name": "get_weather"' in text and "<tools>" in text  # the tools, as JSON
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in text
    assert "You can call these tools" not in text  # not strata's own note
    plain = tokenizer.decode(chat_prompt_ids(tokenizer, body.chat(), None))
    assert "You can call these tools" in plain and "<tools>" not in plain


def test_a_streamed_reply_with_calls_ends_as_tool_calls():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "?"}], tools=[WEATHER])
    stream = ChatStream(body, {"id": "x"}, FORMATS["hermes"])
    reply = f"<tool_call>\n{call()}\n</tool_call>"
    chunks = []
    for k in range(0, len(reply), 5):
        last = k + 5 >= len(reply)
        ev = RequestOutput("r", [], reply[k : k + 5], "stop" if last else None)
        chunks += stream.render(0, ev)
    deltas = [c["choices"][0] for c in chunks]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    (calls,) = [d["delta"]["tool_calls"] for d in deltas if "tool_calls" in d["delta"]]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": json.dumps(ARGS)}
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert not any(d["delta"].get("content") for d in deltas)  # nothing leaked as text


def test_a_template_that_refuses_the_messages_is_a_bad_request(tokenizer):
    strict = tokenizer.__class__.from_pretrained(resolve_checkpoint(None))
    strict.chat_template = "{% if tools %}{{ raise_exception('no tools here') }}{% endif %}x"
    tools = [WEATHER]
    with pytest.raises(ValueError, match="chat template refused the messages: no tools here"):
        chat_prompt_ids(strict, [{"role": "user", "content": "hi"}], tools)
    assert chat_prompt_ids(strict, [{"role": "user", "content": "hi"}]) == strict.encode(
        "x", add_special_tokens=False
    )
