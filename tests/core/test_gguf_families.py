"""GGUF files of every family transformers reads them for (Qwen2, Qwen3, Phi-3, Gemma 2,
Gemma 3, Qwen3-MoE): a tiny random checkpoint written as llama.cpp's converter writes it (the
gguf package's tensor names, Gemma's norms stored as 1 + w, a byte-level BPE tokenizer in the
metadata), loaded by strata: its logits equal transformers' on the same file and on the
checkpoint it came from. Configuration a GGUF file does not carry (Gemma's soft caps and
query scale, Qwen3's head size, Qwen3-MoE's expert size; its top-k weights are always
renormalised, as llama.cpp does) stays at what transformers reads, as with a real file."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from strata.config import KVPoolConfig, ModelConfig
from strata.engine.runner import ModelRunner
from strata.model.loader import ModelLoadError, resolve_checkpoint
from tests.conftest import tiny_hf_model

TOL = 1e-4
VOCAB = 320
# what each family's GGUF file cannot say, left at its transformers defaults
FAMILIES = {
    "qwen2": ("QWEN2", {}),
    "qwen3": ("QWEN3", {"head_dim": 128}),
    "phi3": ("PHI3", {"pad_token_id": 0}),
    "gemma2": ("GEMMA2", {"head_dim": 16, "pad_token_id": 0, "tie_word_embeddings": True}),
    "gemma3": ("GEMMA3", {"head_dim": 16, "pad_token_id": 0, "tie_word_embeddings": True}),
    "qwen3_moe": (
        "QWEN3MOE",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True},
    ),
}


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A GPT-2 style vocabulary of VOCAB tokens: the 256 byte symbols, then merges of pairs."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for _, c in sorted(zip(bs, cs))]
    letters = "etaoinshrdlu"
    merges = [f"{a} {b}" for a in letters for b in letters][: VOCAB - 256]
    return symbols + [m.replace(" ", "") for m in merges], merges


def write_gguf(model: torch.nn.Module, arch: str, path: Path) -> None:
    """The checkpoint as llama.cpp's convert_hf_to_gguf.py writes it, in float32."""
    cfg = model.config
    kind = getattr(gguf.MODEL_ARCH, arch)
    name = gguf.MODEL_ARCH_NAMES[kind]
    w = gguf.GGUFWriter(str(path), name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters or {}
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if getattr(cfg, "num_experts", None):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    tokens, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(kind, cfg.num_hidden_layers)
    state = model.state_dict()
    for key, t in state.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = t.float().numpy()
        if arch.startswith("GEMMA") and key.endswith("norm.weight"):
            data = data + 1  # stored as the factor itself, (1 + w)
        if ".experts." in key:  # llama.cpp stacks the experts: one tensor per projection
            continue
        found = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert found is not None, key
        w.add_tensor(found, np.ascontiguousarray(data))
    if getattr(cfg, "num_experts", None):
        half = cfg.moe_intermediate_size
        for i in range(cfg.num_hidden_layers):
            experts = f"model.layers.{i}.mlp.experts."
            gate_up = state[experts + "gate_up_proj"].float().numpy()  # [E, 2I, H]
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :half]))
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, half:]))
            down = state[experts + "down_proj"].float().numpy()  # [E, H, I]
            w.add_tensor(f"blk.{i}.ffn_down_exps.weight", down)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    from strata.batch import SequenceChunk

    pages = runner.pool.alloc(runner.pages_for(len(ids)))
    return runner.forward([SequenceChunk(ids, 0, pages)], all_logits=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_gguf_file_of_each_family_loads_with_transformers_logits(family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    arch, overrides = FAMILIES[family]
    hf = tiny_hf_model(family, vocab_size=VOCAB, **overrides)
    path = tmp_path / f"tiny-{family}.gguf"
    write_gguf(hf, arch, path)
    folder = resolve_checkpoint(str(path))
    runner = ModelRunner.from_config(
        ModelConfig(str(folder), dtype="float32"), KVPoolConfig(page_size=4, num_pages=64)
    )
    ids = [(i * 37 + 11) % VOCAB for i in range(40)]
    ours = logits(runner, ids)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        want = theirs(torch.tensor([ids])).logits[0]
        original = hf(torch.tensor([ids])).logits[0]
    assert (ours - want).abs().max().item() <= TOL
    assert (ours - original).abs().max().item() <= TOL  # the file says all there is to say


def test_a_gguf_file_of_an_unknown_architecture_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="rwkv6"):
        resolve_checkpoint(str(path))
