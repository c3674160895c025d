"""Every model family served: a tiny random checkpoint of each (transformers' own classes,
the embedded model's tokenizer, so the server has a real one) through `strata serve`, its
greedy tokens over HTTP equal to transformers' generate on the same weights. The servers
start side by side (one each, started at once)."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import torch

from launch.local import running_server, started_together
from strata.model.loader import TOKENIZER_FILES, resolve_checkpoint
from tests.conftest import tiny_hf_model
from tests.core import test_family_paths as family_paths

FAMILIES = {  # the tiny checkpoints of the core family tests, with Gemma 3's window shorter
    # than prompt + output on its window layers (a global one in 4)
    **family_paths.FAMILIES,
    "gemma3": {**family_paths.FAMILIES["gemma3"], "num_hidden_layers": 4, "sliding_window": 6},
}
# Qwen3's server reads tool calls in its own format, through a Qwen 2.5-style chat template
TOOLS_TEMPLATE = Path(__file__).parents[1] / "data" / "qwen_tools.jinja"
FLAGS = {"qwen3": ("--tool-call-parser", "hermes")}
PROMPT = "The lighthouse keeper counted the waves"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """family -> (its folder, its server's URL, transformers' greedy tokens, the prompt)."""
    from transformers import AutoTokenizer

    tokenizer_folder = resolve_checkpoint(None)  # the embedded model's: its tokenizer files
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    ids = tok(PROMPT)["input_ids"]
    folders, wants = {}, {}
    for arch, overrides in FAMILIES.items():
        folder = tmp_path_factory.mktemp(arch)
        hf = tiny_hf_model(arch, vocab_size=len(tok), **overrides)
        hf.save_pretrained(folder)
        for name in TOKENIZER_FILES + ("special_tokens_map.json",):
            if (tokenizer_folder / name).is_file():
                shutil.copy(tokenizer_folder / name, folder / name)
        hf.generation_config.eos_token_id = None  # random weights: run to the length
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        folders[arch], wants[arch] = folder, out[0, len(ids) :].tolist()
    shutil.copy(TOOLS_TEMPLATE, folders["qwen3"] / "chat_template.jinja")
    with ExitStack() as stack:
        starts = {
            arch: running_server("--model-path", str(f), "--num-pages", "64", *FLAGS.get(arch, ()))
            for arch, f in folders.items()
        }
        urls = dict(zip(starts, started_together(stack, list(starts.values()))))
        yield {arch: (folders[arch], urls[arch], wants[arch], ids) for arch in FAMILIES}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_greedy_tokens_through_the_server_equal_transformers(arch, served):
    folder, url, want, ids = served[arch]
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(
        f"{url}/generate", json={"input_ids": ids, "sampling_params": params}, timeout=60
    ).json()
    info = httpx.get(f"{url}/get_model_info", timeout=10).json()
    assert reply["output_ids"] == want
    assert info["model_path"] == str(folder)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_calls_in_the_familys_own_format(served):
    """--tool-call-parser hermes: the tools go through the model's template, and a reply in
    Qwen's <tool_call> format (forced here with a regex: the random model would not write
    one) comes back as OpenAI tool calls, whole and streamed."""
    from transformers import AutoTokenizer

    folder, url, _, _ = served["qwen3"]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    body = {
        "messages": messages,
        "tools": [WEATHER],
        "regex": re.escape(CALL),
        "max_tokens": 64,
        "temperature": 0,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", reply
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    tok = AutoTokenizer.from_pretrained(folder)  # the prompt: the template's, with the tools
    prompt = tok.apply_chat_template(
        messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False
    )
    assert reply["usage"]["prompt_tokens"] == len(tok.encode(prompt, add_special_tokens=False))
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    events = [json.loads(line[5:]) for line in lines if line != "data: [DONE]"]
    deltas = [e["choices"][0] for e in events if e.get("choices")]
    calls = [d["delta"]["tool_calls"] for d in deltas if "tool_calls" in d["delta"]]
    assert calls and calls[0][0]["function"]["name"] == "get_weather"
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert "<tool_call>" not in "".join(d["delta"].get("content") or "" for d in deltas)
