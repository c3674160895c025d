"""ModelRunner: the model, its KV pages, and one forward call over a batch of chunks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from strata.attention.base import AttentionBackend
from strata.attention.registry import make_backend
from strata.batch import ForwardBatch, SequenceChunk
from strata.config import HiCacheConfig, KVPoolConfig, ModelConfig
from strata.engine.cuda_graph import DecodeGraphs
from strata.engine.memory import (
    MIN_POOL_TOKENS,
    MemoryPlan,
    device_budget,
    plan_pages,
    resident_bytes,
)
from strata.engine.messages import Forward, StopRanks
from strata.engine.request import check_length
from strata.engine.tp_rank import RankLinks, start_followers
from strata.kernels.cpu import ops as cpu_ops
from strata.kv.pool import KVCache, PagePool
from strata.model.decoder import DecoderLM
from strata.model.gguf_codes import read_codes
from strata.model.loader import (
    gguf_file,
    load_tokenizer,
    read_config,
    read_tensors,
    resolve_checkpoint,
)
from strata.model.registry import family_of
from strata.model.spec import ModelSpec
from strata.model.tp import TPGroup, check_tp, join, rank_device, shard_weights

log = logging.getLogger(__name__)


class RunnerBroken(RuntimeError):
    """The runner cannot run another forward (a tensor-parallel rank died): the engine
    fails its requests and stops, and whoever supervises it starts a new one."""


def model_identity(model: DecoderLM, name: str) -> str:
    """Names the weights (not the path): the same checkpoint anywhere has the same identity,
    another one (or another quantization) a different one."""
    h = hashlib.sha256(repr(model.spec).encode() + model.quantization.encode())
    h.update(model.embed_tokens[:8].float().cpu().numpy().tobytes())
    tp = f"-tp{model.tp.size}" if model.tp else ""  # each rank's pages hold its KV heads
    return f"{name}-{h.hexdigest()[:16]}{tp}"


def page_bytes(spec: ModelSpec, kv_heads: int, page_size: int, dtype: torch.dtype) -> int:
    """One KV page of every layer: K and V of page_size tokens plus the summary row."""
    elem = torch.empty(0, dtype=dtype).element_size()
    return spec.num_layers * 2 * (page_size + 1) * kv_heads * spec.head_dim * elem


def resolve_quantization(model_cfg: ModelConfig, spec: ModelSpec, weights: dict[str, Any]) -> str:
    """model_cfg.quantization, "auto" resolved (ModelConfig says how). A GGUF file's Q4_1 and
    Q8_0 tensors then replace their dequantized weights in `weights`, as codes
    (gguf_codes.read_codes): served as stored, on one CPU rank."""
    chosen = model_cfg.quantization
    gguf = gguf_file(model_cfg.model_path)
    one_cpu_rank = model_cfg.device == "cpu" and model_cfg.tp_size == 1
    if chosen == "none" or gguf is None or not one_cpu_rank:
        return "int4" if chosen == "int4" else "none"
    if chosen == "auto" and not cpu_ops.int4_available(model_cfg.torch_dtype):
        return "none"
    codes = read_codes(gguf, spec)
    weights.update(codes)
    return "int4" if chosen == "int4" or codes else "none"


@dataclass(frozen=True)
class StepOutput:
    """What a forward produced: logits, and per chunk, where sparse decode ran (else None),
    (pages skipped, pages considered) and the page indices it kept (uint8 rows)."""

    logits: torch.Tensor
    sparsity: list[tuple[int, int]] | None = None
    selected: list[torch.Tensor | None] | None = None


def _backend(
    model_cfg: ModelConfig, pool_cfg: KVPoolConfig, spec: ModelSpec, device: str
) -> AttentionBackend:
    """The attention backend the config names, for this model's scale, caps and windows."""
    return make_backend(
        model_cfg.attention_backend,
        device,
        spec.softmax_scale,
        pool_cfg.page_size,
        model_cfg.sparse_attention,
        spec.attn_softcap,
        spec.windows,
    )


class ModelRunner:
    def __init__(
        self,
        model: DecoderLM,
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
            spec.num_layers,
            num_pages,
            page_size,
            model.local.num_kv_heads,
            spec.head_dim,
            model.embed_tokens.dtype,
            self.device,
        )
        self.pool = PagePool(num_pages)
        self.context_length: int | None = None  # --context-length, below the model's own
        self.graphs: DecodeGraphs | None = None  # decode steps as CUDA graphs (cuda_graph)
        self.memory: MemoryPlan | None = None  # how the KV tiers were sized (from_config)

    @classmethod
    def from_config(
        cls,
        model_cfg: ModelConfig,
        pool_cfg: KVPoolConfig,
        rank: int = 0,
        address: str | None = None,
        num_pages: int | None = None,
        tiers: HiCacheConfig | None = None,
    ) -> ModelRunner:
        """Load the model, its KV pool sized by pool_cfg (engine.memory: from the memory
        budget, the L2 tier of `tiers` included, unless it names num_pages). With
        model_cfg.tp_size > 1, rank 0 (the default) starts the other ranks and joins them
        (strata.model.tp); those call this with their rank, the group's address and rank 0's
        pool size."""
        start = time.perf_counter()
        budget = None  # measured before loading: the memory available at start
        if num_pages is None and pool_cfg.num_pages is None:
            budget = (
                device_budget(model_cfg.device, pool_cfg.mem_fraction, pool_cfg.memory_budget_gb)
                // model_cfg.tp_size
            )
        folder = resolve_checkpoint(model_cfg.model_path)
        hf_config = read_config(folder)
        family = family_of(hf_config)
        spec = family.spec(hf_config)
        size = model_cfg.tp_size
        check_tp(spec, size)
        device = rank_device(model_cfg.device, rank)
        weights: dict[str, Any] = family.fuse(
            spec, read_tensors(folder), model_cfg.torch_dtype, device
        )
        quantization = resolve_quantization(model_cfg, spec, weights)
        memory = None
        if num_pages is None:
            memory = cls._plan_memory(spec, pool_cfg, model_cfg, weights, budget, tiers)
            num_pages = memory.l1_pages
        tp, links, threads = None, None, None
        followers: list[Any] = []
        if size > 1:
            followers, links, threads = cls._join(model_cfg, pool_cfg, rank, address, num_pages)
            tp = TPGroup(rank, size, spec.vocab_size)
            weights = shard_weights(spec, weights, rank, size)
        backend = _backend(model_cfg, pool_cfg, spec, device)
        model_class = family.model_class()
        model = model_class(spec, weights, backend, quantization, tp, family.fused_cpu_decode)
        tokenizer = load_tokenizer(folder) if rank == 0 else None
        log.info("loaded %s in %.1fs", folder, time.perf_counter() - start)
        runner = cls(model, tokenizer, num_pages, pool_cfg.page_size, folder)
        runner.memory = memory
        runner.followers, runner.links = followers, links
        if threads is not None:
            runner.threads = threads
        runner.context_length = model_cfg.context_length
        runner._capture_graphs(model_cfg.cuda_graph_max_bs)
        return runner

    def _capture_graphs(self, max_bs: int) -> None:
        """CUDA, one rank, a backend that reads the pages in place, no experts (their
        grouping is decided on the host each step): decode steps of up to max_bs sequences
        replay graphs (0: never)."""
        on_cuda = self.device.type == "cuda"
        if (
            on_cuda
            and self.tp is None
            and not self.model.spec.num_experts
            and max_bs > 0
            and self.model.backend.reads_in_place(self.device)
        ):
            self.graphs = DecodeGraphs(
                self.model,
                self.kv,
                self.pool,
                self.page_size,
                self.pages_for(self.max_context),
                max_bs,
            )

    @staticmethod
    def _join(
        model_cfg: ModelConfig,
        pool_cfg: KVPoolConfig,
        rank: int,
        address: str | None,
        num_pages: int,
    ) -> tuple[list[Any], Any, int | None]:
        """Join the tensor-parallel group (rank 0 starts the other ranks first). Returns rank
        0's follower processes and links, and the threads to restore at close (CPU ranks
        share the cores)."""
        size, device = model_cfg.tp_size, rank_device(model_cfg.device, rank)
        followers: list[Any] = []
        links = None
        if rank == 0:
            address, followers, links = start_followers(model_cfg, pool_cfg, num_pages)
        assert address is not None
        threads = None
        if not device.startswith("cuda"):
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        try:
            join(rank, size, address, device)
        except Exception:
            for p in followers:
                p.kill()
            raise
        return followers, links, threads

    @staticmethod
    def _plan_memory(
        spec: ModelSpec,
        pool_cfg: KVPoolConfig,
        model_cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        budget: int | None,
        tiers: HiCacheConfig | None,
    ) -> MemoryPlan:
        """The pool's pages (every rank of a group has as many, each for its KV heads): from
        the budget (with weights and the L2 tier on CPU), else pool_cfg.num_pages.

        NOTE: the budget is weighed against what the process holds once the weights are in
        memory as they will be served; int4 packing happens later, so the loaded weights'
        bytes stand in for them (an overestimate)."""
        dtype = weights["embed_tokens"].dtype
        kv_heads = spec.num_kv_heads // model_cfg.tp_size
        pb = page_bytes(spec, kv_heads, pool_cfg.page_size, dtype)
        weight_bytes = sum(
            t.numel() * t.element_size()
            for w in weights.values()
            for t in (w if isinstance(w, tuple) else (w,))
        )  # codes: tuples
        on_cpu = not model_cfg.device.startswith("cuda")
        l2 = None
        if tiers is not None and tiers.enabled:
            l2 = lambda n: tiers.host_pages(n, pb)  # noqa: E731
        if budget is None:
            assert pool_cfg.num_pages is not None
            n = pool_cfg.num_pages
            return MemoryPlan(
                0, resident_bytes(), weight_bytes, pb, n, l2(n) if l2 else 0, "num_pages"
            )
        resident = resident_bytes() if on_cpu else weight_bytes // model_cfg.tp_size
        min_tokens = min(MIN_POOL_TOKENS, spec.max_position)
        plan = plan_pages(
            budget,
            resident,
            pb,
            -(-min_tokens // pool_cfg.page_size) + 1,
            l2 if on_cpu else None,
            weight_bytes,
        )
        log.info(
            "memory budget %.2f GB: %d KV pages (L1), %d L2 pages of %.2f MB",
            budget / 1e9,
            plan.l1_pages,
            plan.l2_pages,
            pb / 1e6,
        )
        return plan

    def close(self, failed: bool = False) -> None:
        """With tensor parallelism: stop the other ranks (failed: kill them) and leave the
        group. The runner cannot run a forward afterwards."""
        if self.tp is None or self.tp.rank != 0:
            return
        import torch.distributed as dist

        if not failed:
            with contextlib.suppress(RuntimeError):
                self.tp.send(StopRanks())
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
        """The logits of a forward over chunks (run's, for callers that need no more)."""
        return self.run(chunks, all_logits).logits

    def run(self, chunks: Sequence[SequenceChunk], all_logits: bool = False) -> StepOutput:
        """One forward over chunks: the logits of each chunk's logit rows (all_logits: of
        every token) and what sparse decode did."""
        if self.tp is None or self.tp.rank != 0:
            return self._run(chunks, all_logits)
        try:
            self.tp.send(Forward(list(chunks), all_logits))
            return self._run(chunks, all_logits)
        except RuntimeError as exc:  # gloo / NCCL: a rank died, or a collective timed out
            self.close(failed=True)
            raise RunnerBroken(f"tensor-parallel forward failed (a rank died?): {exc}") from exc

    def _run(self, chunks: Sequence[SequenceChunk], all_logits: bool) -> StepOutput:
        if self.graphs is not None and self.graphs.fits(chunks):
            return StepOutput(self.graphs.run(chunks))
        batch = ForwardBatch.build(chunks, self.page_size, self.device, all_logits)
        logits, meta = self.model.forward(batch, self.kv)
        backend = self.model.backend
        return StepOutput(logits, backend.sparsity(meta), backend.selected(meta))
