"""Decode steps as CUDA graphs: the model's forward captured once per batch-size bucket over
static input buffers, then replayed with each step's inputs copied in (as SGLang's and
vLLM's CUDA-graph runners do). A decode step of a small model is hundreds of kernel
launches, each costing the host more than the GPU; a replay launches them all at once.

A step runs in the smallest bucket that holds its batch; the rows past its sequences are
padding that reads and writes one scratch page of the pool, taken at start. The graphs hold
every shape: the page table is as wide as the longest context, and the Triton decode
kernel's split of each sequence's keys follows that width, not the step's lengths.

Only dense decode-only steps replay: a step with a prefill chunk, a batch past the largest
bucket, or sparse decode (its page selection runs on the host) takes the eager forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from strata.batch import SequenceChunk
from strata.kv.pool import KVCache, PagePool

log = logging.getLogger("strata")

# batch sizes with a graph of their own (up to --cuda-graph-max-bs, which is one too)
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class DecodeGraphs:
    """The buffers and graphs of one runner's decode steps. With capture=False (on CPU, for
    tests) a step runs the same forward over the same buffers, eagerly."""

    def __init__(
        self,
        model: Any,
        kv: KVCache,
        pool: PagePool,
        page_size: int,
        max_pages: int,
        max_bs: int,
        capture: bool = True,
    ) -> None:
        self.model, self.kv, self.page_size, self.capture = model, kv, page_size, capture
        self.buckets = [b for b in BUCKETS if b < max_bs] + [max_bs]
        self.scratch = pool.alloc(1)[0]  # padding rows write their key and value here
        # a padding row's inputs: a token at position 0 written to the scratch page and
        # attending to it alone
        self.padding = (0, 0, self.scratch, 0, 1)
        n, dev = self.buckets[-1], kv.data.device
        # rows: token ids, positions, write page, write offset, tokens in the KV after the step
        self.inputs = torch.zeros(5, n, dtype=torch.int64, device=dev)
        self.table = torch.full((n, max_pages), self.scratch, dtype=torch.int64, device=dev)
        self.rows = torch.arange(n, device=dev)
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def _forward(self, b: int) -> torch.Tensor:
        i, rows = self.inputs, self.rows[:b]
        meta = self.model.backend.graph_meta((i[2, :b], i[3, :b]), rows, self.table[:b], i[4, :b])
        return self.model.compute(i[0, :b], i[1, :b], rows, self.kv, meta)

    def _capture_all(self) -> None:
        from tqdm import tqdm

        mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for b in tqdm(
            sorted(self.buckets, reverse=True), desc="capturing decode graphs", unit="graph"
        ):
            self.inputs[:, :b] = torch.tensor(self.padding)[:, None]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels outside the capture
                self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                out = self._forward(b)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()

    def fits(self, chunks: Sequence[SequenceChunk]) -> bool:
        """Whether this step replays: decode-only, within the largest bucket, dense."""
        if len(chunks) > self.buckets[-1] or any(len(c.token_ids) != 1 for c in chunks):
            return False
        longest = max(c.prefix_len for c in chunks) + 1
        if longest > self.table.shape[1] * self.page_size:
            return False
        return self.model.backend.graph_replays(longest)

    def run(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] of a step that fits."""
        b = len(chunks)
        bucket = next(x for x in self.buckets if x >= b)
        ps = self.page_size
        width = max(-(-(c.prefix_len + 1) // ps) for c in chunks)
        cols: list[list[int]] = [[], [], [], [], []]
        table = []
        for c in chunks:
            n = c.prefix_len
            pages = list(c.pages[: -(-(n + 1) // ps)])
            for col, v in zip(cols, (c.token_ids[0], n, pages[n // ps], n % ps, n + 1)):
                col.append(v)
            table.append(pages + [self.scratch] * (width - len(pages)))
        for col, v in zip(cols, self.padding):
            col.extend([v] * (bucket - b))
        self.inputs[:, :bucket].copy_(torch.tensor(cols, dtype=torch.int64))
        self.table[:b, :width].copy_(torch.tensor(table, dtype=torch.int64))
        if not self.capture:
            return self._forward(bucket)[:b]
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:b].clone()  # the next replay writes over out
