"""ModelRunner: the model, its KV pages, and one forward call over a batch of chunks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from strata.attention.backend import make_backend
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.cuda_graph import DecodeGraphs
from strata.engine.request import check_length
from strata.engine.tp_rank import RankLinks, start_followers
from strata.kv.pool import KVCache, PagePool
from strata.model.batch import ForwardBatch, SequenceChunk
from strata.model.llama import LlamaForCausalLM
from strata.model.loader import (
    fuse_weights,
    load_tokenizer,
    read_config,
    read_tensors,
    resolve_checkpoint,
)
from strata.model.spec import ModelSpec
from strata.model.tp import TPGroup, check_tp, join, rank_device, shard_weights, step_message

log = logging.getLogger(__name__)


class RunnerBroken(RuntimeError):
    """The runner cannot run another forward (a tensor-parallel rank died): the engine
    fails its requests and stops, and whoever supervises it starts a new one."""


def model_identity(model: LlamaForCausalLM, name: str) -> str:
    """Names the weights (not the path): the same checkpoint anywhere has the same identity,
    another one (or another quantization) a different one."""
    h = hashlib.sha256(repr(model.spec).encode() + model.quantization.encode())
    h.update(model.embed_tokens[:8].float().cpu().numpy().tobytes())
    tp = f"-tp{model.tp.size}" if model.tp else ""  # each rank's pages hold its KV heads
    return f"{name}-{h.hexdigest()[:16]}{tp}"


def device_memory(device: str) -> int:
    """Bytes of memory on the device (all of host RAM for the CPU)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pages_in_memory_fraction(
    spec: ModelSpec, weights: dict[str, torch.Tensor], pool: KVPoolConfig, device: str
) -> int:
    """KV pages that fit in pool.mem_fraction of the device's memory beside the weights."""
    assert pool.mem_fraction is not None
    weight_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    dtype = next(iter(weights.values())).dtype
    page_bytes = (spec.num_layers * 2 * (pool.page_size + 1) * spec.num_kv_heads
                  * spec.head_dim * torch.empty(0, dtype=dtype).element_size())  # fmt: skip
    budget = int(pool.mem_fraction * device_memory(device)) - weight_bytes
    if budget < page_bytes:
        raise ValueError(f"--mem-fraction-static {pool.mem_fraction} leaves no room for KV "
                         f"pages beside {weight_bytes / 1e9:.2f} GB of weights")  # fmt: skip
    return budget // page_bytes


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: Any,
        num_pages: int,
        page_size: int,
        checkpoint: Path | None = None,
    ) -> None:
        spec = model.spec
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.checkpoint = checkpoint
        self.identity = model_identity(model, checkpoint.name if checkpoint else "model")
        self.page_size = page_size
        self.device = model.embed_tokens.device
        self.tp: TPGroup | None = model.tp
        self.followers: list[Any] = []  # with tp: the processes of ranks 1.. (rank 0 only)
        self.links: RankLinks | None = None  # and the control links to them
        self.threads: int | None = None  # torch's threads before this runner took its share
        self.kv = KVCache(
            spec.num_layers, num_pages, page_size, model.local.num_kv_heads, spec.head_dim,
            model.embed_tokens.dtype, self.device,
        )  # fmt: skip
        self.pool = PagePool(num_pages)
        self.context_length: int | None = None  # --context-length, below the model's own
        # per chunk of the last forward: (pages skipped, pages considered) by sparse decode
        self.last_sparsity: list[tuple[int, int]] | None = None
        # per chunk of the last forward: the page indices sparse decode kept (uint8 rows)
        self.last_selected: list[torch.Tensor | None] | None = None
        self.graphs: DecodeGraphs | None = None  # decode steps as CUDA graphs (cuda_graph)

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, pool_cfg: KVPoolConfig, rank: int = 0,
        address: str | None = None, num_pages: int | None = None,
    ) -> ModelRunner:  # fmt: skip
        """Load the model. With model_cfg.tp_size > 1, rank 0 (the default) starts the other
        ranks and joins them (strata.model.tp); those call this with their rank, the
        group's address and rank 0's pool size."""
        start = time.perf_counter()
        folder = resolve_checkpoint(model_cfg.model_path)
        spec = ModelSpec.from_hf(read_config(folder))
        size = model_cfg.tp_size
        check_tp(spec, size)
        device = rank_device(model_cfg.device, rank)
        weights = fuse_weights(spec, read_tensors(folder), model_cfg.torch_dtype, device)
        if num_pages is None:
            num_pages = cls._num_pages(spec, pool_cfg, model_cfg, weights)
        followers: list[Any] = []
        links = None
        if size > 1 and rank == 0:
            address, followers, links = start_followers(model_cfg, pool_cfg, num_pages)
        tp = None
        if size > 1:
            assert address is not None
            if not device.startswith("cuda"):  # CPU ranks share the cores (until close)
                threads = torch.get_num_threads()
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
            try:
                join(rank, size, address, device)
            except Exception:
                for p in followers:
                    p.kill()
                raise
            tp = TPGroup(rank, size, spec.vocab_size)
            weights = shard_weights(spec, weights, rank, size)
        backend = make_backend(
            model_cfg.attention_backend, device, spec.head_dim**-0.5, pool_cfg.page_size,
            model_cfg.sparse_attention,
        )  # fmt: skip
        model = LlamaForCausalLM(spec, weights, backend, model_cfg.quantization, tp)
        tokenizer = load_tokenizer(folder) if rank == 0 else None
        log.info("loaded %s in %.1fs", folder, time.perf_counter() - start)
        runner = cls(model, tokenizer, num_pages, pool_cfg.page_size, folder)
        runner.followers, runner.links = followers, links
        if size > 1 and not device.startswith("cuda"):
            runner.threads = threads
        runner.context_length = model_cfg.context_length
        if (device.startswith("cuda") and size == 1 and model_cfg.cuda_graph_max_bs > 0
                and backend.reads_in_place(torch.device(device))):  # fmt: skip
            runner.graphs = DecodeGraphs(
                model, runner.kv, runner.pool, pool_cfg.page_size,
                runner.pages_for(runner.max_context), model_cfg.cuda_graph_max_bs,
            )  # fmt: skip
        return runner

    @staticmethod
    def _num_pages(
        spec: ModelSpec, pool_cfg: KVPoolConfig, model_cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
    ) -> int:  # fmt: skip
        """The pool's pages (every rank of a group has as many, each for its KV heads)."""
        if pool_cfg.mem_fraction is None:
            return pool_cfg.num_pages
        num_pages = pages_in_memory_fraction(spec, weights, pool_cfg, model_cfg.device)
        log.info("--mem-fraction-static %g: %d KV pages", pool_cfg.mem_fraction, num_pages)
        return num_pages

    def close(self, failed: bool = False) -> None:
        """With tensor parallelism: stop the other ranks (failed: kill them) and leave the
        group. The runner cannot run a forward afterwards."""
        if self.tp is None or self.tp.rank != 0:
            return
        import torch.distributed as dist

        if not failed:
            with contextlib.suppress(RuntimeError):
                self.tp.send(("stop",))
        for p in self.followers:
            if failed:
                p.kill()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        dist.destroy_process_group()
        if self.links is not None:
            self.links.close()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.tp = None

    @property
    def tp_size(self) -> int:
        return self.model.tp.size if self.model.tp else 1

    @property
    def max_context(self) -> int:
        if self.context_length:
            return min(self.spec.max_position, self.context_length)
        return self.spec.max_position

    @property
    def step_rows(self) -> int:
        """Rows a decode step computes at a small cost a row (its linear layers' kernel)."""
        return self.model.lm_head.STEP_ROWS

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def check_length(self, prompt_len: int, max_new_tokens: int = 0) -> None:
        check_length(prompt_len, self.max_context, max_new_tokens)

    def forward(self, chunks: Sequence[SequenceChunk], all_logits: bool = False) -> torch.Tensor:
        if self.tp is None or self.tp.rank != 0:
            return self._forward(chunks, all_logits)
        try:
            self.tp.send(step_message(chunks, all_logits))
            return self._forward(chunks, all_logits)
        except RuntimeError as exc:  # gloo / NCCL: a rank died, or a collective timed out
            self.close(failed=True)
            raise RunnerBroken(f"tensor-parallel forward failed (a rank died?): {exc}") from exc

    def _forward(self, chunks: Sequence[SequenceChunk], all_logits: bool) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(chunks):
            self.last_sparsity = self.last_selected = None
            return self.graphs.run(chunks)
        batch = ForwardBatch.build(chunks, self.page_size, self.device, all_logits)
        logits, meta = self.model.forward(batch, self.kv)
        self.last_sparsity = self.model.backend.sparsity(meta)
        self.last_selected = self.model.backend.selected(meta)
        return logits
