"""load_tokenizer reads a Llama checkpoint's generic tokenizer.json without transformers'
auto classes (3.4 s of every process's start): the tokenizer it gives must be the one
AutoTokenizer gives, and every other checkpoint still goes through AutoTokenizer."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
from transformers import AutoTokenizer

from strata.model import registry
from strata.model.loader import (
    GENERIC_TOKENIZER_MODELS,
    TOKENIZER_FILES,
    load_tokenizer,
    resolve_checkpoint,
)

TEXTS = [
    "The lighthouse keeper counted the waves",
    "  leading spaces, trailing\ttabs\t and\nnew lines\n",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "naïve café, 東京, emoji 🌊 and digits 1234567",
    "",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]


def same_tokenizer(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        ids = theirs.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
            ids, skip_special_tokens=True
        )
    for tokenize in (False, True):
        assert ours.apply_chat_template(
            CHAT, tokenize=tokenize, add_generation_prompt=True
        ) == theirs.apply_chat_template(CHAT, tokenize=tokenize, add_generation_prompt=True)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.all_special_ids == theirs.all_special_ids
    assert len(ours) == len(theirs)


def test_the_embedded_models_tokenizer_is_the_one_autotokenizer_loads():
    folder = resolve_checkpoint(None)
    same_tokenizer(load_tokenizer(folder), AutoTokenizer.from_pretrained(folder))


def test_a_tokenizer_saved_into_a_llama_checkpoint_loads_as_autotokenizer_loads_it(
    tmp_path, tiny_checkpoint
):
    folder, _ = tiny_checkpoint("llama", vocab_size=49152)
    load_tokenizer(resolve_checkpoint(None)).save_pretrained(folder)  # as the tests' servers do
    same_tokenizer(load_tokenizer(folder), AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("family", sorted(registry.FAMILIES))
def test_every_familys_checkpoint_loads_the_tokenizer_autotokenizer_does(tmp_path, family):
    """The embedded model's tokenizer files under each family's config.json: transformers
    gives some families a class of their own (Qwen2's, Gemma's), and so must load_tokenizer;
    the others the generic one, which load_tokenizer then loads without AutoTokenizer."""
    source = resolve_checkpoint(None)
    for name in (*TOKENIZER_FILES, "config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, tmp_path / name)
    fam = importlib.import_module(family).FAMILY
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type=fam.model_type, architectures=[fam.architectures[0]])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    generic = type(theirs).__name__ == "TokenizersBackend"
    assert generic == (fam.model_type in GENERIC_TOKENIZER_MODELS)
    same_tokenizer(ours, theirs)
