"""The transformers baseline: the same conversations through batched `generate`, turn by turn."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from strata.bench.workloads import Conversation


def run_hf_conversations(
    model_path: str | None, convs: Sequence[Conversation], max_tokens: int, dtype: str
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from strata.model.loader import load_tokenizer, resolve_checkpoint
    from strata.tokenizer import chat_prompt_ids

    folder = resolve_checkpoint(model_path)
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    turns = max(len(c.user_turns) for c in convs)
    out_tokens = prompt_tokens = 0
    start = time.perf_counter()
    for t in range(turns):
        active = [c for c in convs if t < len(c.user_turns)]
        for c in active:
            c.messages.append({"role": "user", "content": c.user_turns[t]})
        prompts = [chat_prompt_ids(tok, c.messages) for c in active]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        for c, p, row in zip(active, prompts, out[:, width:].tolist()):
            n = row.index(eos) + 1 if eos in row else len(row)
            out_tokens += n
            prompt_tokens += len(p)
            reply = tok.decode(row[:n], skip_special_tokens=True)
            c.messages.append({"role": "assistant", "content": reply})
    wall = time.perf_counter() - start
    requests = sum(len(c.user_turns) for c in convs)
    return {
        "system": f"transformers generate ({dtype})",
        "requests": requests,
        "errors": 0,
        "wall_s": wall,
        "output_tokens_per_s": out_tokens / wall,
        "requests_per_s": requests / wall,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
    }
