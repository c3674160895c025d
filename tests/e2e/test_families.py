"""Every model family served: a tiny random checkpoint of each (transformers' own classes,
the embedded model's tokenizer, so the server has a real one) through `strata serve`, its
greedy tokens over HTTP equal to transformers' generate on the same weights. The servers
start side by side (one each, started at once)."""

from __future__ import annotations

import shutil
from contextlib import ExitStack

import httpx
import pytest
import torch

from launch.local import running_server, started_together
from strata.model.loader import TOKENIZER_FILES, resolve_checkpoint
from tests.conftest import tiny_hf_model

FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "gemma2": {"head_dim": 16, "pad_token_id": 0},
    # a window shorter than prompt + output on the window layers, a global one in 4
    "gemma3": {
        "head_dim": 16,
        "pad_token_id": 0,
        "num_hidden_layers": 4,
        "sliding_window": 6,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    },
}
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
    with ExitStack() as stack:
        starts = {
            arch: running_server("--model-path", str(f), "--num-pages", "64")
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
