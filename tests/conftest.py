from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the user's cache; one cache per test session keeps conversions shared.
os.environ.setdefault(
    "STRATA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".venv" / "strata-cache")
)
# Triton kernels run on CPU tensors in its interpreter (read when a kernel is defined).
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_hf_model(arch: str, **overrides):
    """A tiny randomly initialised transformers model of the given family."""
    import transformers

    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**common)).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):  # a MoE router: clear choices, not near-ties
                p.mul_(50)
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path: Path):
    """Factory: save a tiny model as a HF folder; returns (folder, hf_model)."""

    def make(arch: str = "llama", **overrides) -> tuple[Path, object]:
        model = tiny_hf_model(arch, **overrides)
        folder = tmp_path / f"{arch}-ckpt"
        model.save_pretrained(folder)
        return folder, model

    return make


@pytest.fixture
def runner_factory(tiny_checkpoint):
    """Factory: a ModelRunner on a tiny random Llama (float32, pages of 4 tokens) with a
    pool of num_pages pages."""
    from strata.config import KVPoolConfig, ModelConfig
    from strata.engine.runner import ModelRunner

    folder, _ = tiny_checkpoint("llama")

    def make(num_pages: int) -> ModelRunner:
        return ModelRunner.from_config(
            ModelConfig(str(folder), dtype="float32"),
            KVPoolConfig(page_size=4, num_pages=num_pages),
        )

    return make


@pytest.fixture(params=["none", "avx2", "avx512", "amx"])
def cpu_isa_level(request, monkeypatch):
    """Each CPU ISA level of the kernels (config.CPU_ISAS) this machine runs, forced with
    STRATA_CPU_ISA; a level above the CPU's is skipped with that reason (it would raise
    SIGILL). AVX2 is never skipped on an x86-64 CPU with it, the baseline CI runs on."""
    from strata.config import CPU_ISAS, detected_cpu_isa
    from strata.kernels.cpu import build as cpu_build

    level, best = request.param, detected_cpu_isa()
    if CPU_ISAS.index(level) > CPU_ISAS.index(best):
        pytest.skip(f"this CPU runs the kernels at most at the {best} level, not {level}")
    monkeypatch.setenv("STRATA_CPU_ISA", level)
    cpu_build.reset()
    yield level
    monkeypatch.delenv("STRATA_CPU_ISA")
    cpu_build.reset()


class RedisServer:
    """A real redis-server (the distribution's package, which `make test` installs) on a
    loopback port, with no persistence and a volatile-lru budget (launch.local.start_redis);
    stop() and start() it again on the same port to test what a Redis outage does."""

    def __init__(self, maxmemory: str = "256mb") -> None:
        import shutil

        from launch.local import free_port

        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (`make test` installs Debian's package)")
        self.port, self.maxmemory = free_port(), maxmemory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> None:
        from launch.local import start_redis

        self.proc = start_redis(self.port, self.maxmemory)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied for this test (started again if a test stopped it)."""
    if redis_server.proc is None:
        redis_server.start()
    with redis_server.client() as c:
        c.flushdb()
    return redis_server.url
