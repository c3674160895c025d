"""Every model family served: a tiny random checkpoint of each (transformers' own classes,
the embedded model's tokenizer, so the server has a real one) through `strata serve`, its
greedy tokens over HTTP equal to transformers' generate on the same weights."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch

from launch.local import running_server
from strata.model.loader import TOKENIZER_FILES, resolve_checkpoint
from tests.conftest import tiny_hf_model

FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "gemma2": {"head_dim": 16, "pad_token_id": 0},
}
PROMPT = "The lighthouse keeper counted the waves"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer_folder():
    """The embedded model's converted folder: its tokenizer files."""
    return resolve_checkpoint(None)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_greedy_tokens_through_the_server_equal_transformers(arch, tokenizer_folder, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    hf = tiny_hf_model(arch, vocab_size=len(tok), **FAMILIES[arch])
    hf.save_pretrained(tmp_path)
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        if (tokenizer_folder / name).is_file():
            shutil.copy(tokenizer_folder / name, tmp_path / name)
    ids = tok(PROMPT)["input_ids"]
    hf.generation_config.eos_token_id = None  # random weights: run to the length, as below
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    want = out[0, len(ids) :].tolist()
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    with running_server("--model-path", str(tmp_path), "--max-running-requests", "4") as url:
        reply = httpx.post(
            f"{url}/generate", json={"input_ids": ids, "sampling_params": params}, timeout=60
        ).json()
        info = httpx.get(f"{url}/get_model_info", timeout=10).json()
    assert reply["output_ids"] == want
    assert info["model_path"] == str(tmp_path)
