"""The command line: every flag explains itself; SGLang's launch_server flags map onto ours."""

from __future__ import annotations

import argparse

import pytest

from launch.args import model_config, sched_config
from launch.cli import build_parser
from launch.sglang import translate
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.request import ContextLengthError
from strata.engine.runner import ModelRunner


def subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_flag_of_every_command_has_help():
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, sub in subparsers(build_parser())
        for a in sub._actions
        if not a.help and not isinstance(a, argparse._HelpAction)
    ]
    assert not missing, missing


def test_sglang_flags_map_onto_serve():
    argv = [
        "--model-path",
        "m",
        "--context-length",
        "512",
        "--schedule-policy",
        "fcfs",
        "--random-seed",
        "3",
        "--tp-size",
        "1",
        "--trust-remote-code",
        "--mem-fraction-static",
        "0.8",
        "--chunked-prefill-size",
        "256",
        "--speculative-algorithm",
        "NGRAM",
        "--speculative-num-draft-tokens",
        "6",
    ]
    a = build_parser().parse_args(translate(argv))
    assert a.command == "serve" and a.context_length == 512 and a.random_seed == 3
    assert sched_config(a).schedule_policy == "fcfs" and a.max_batch_tokens == 256
    assert model_config(a).context_length == 512 and sched_config(a).draft_tokens == 6
    off = build_parser().parse_args(["serve", "--speculative-algorithm", "none"])
    assert sched_config(off).draft_tokens == 0
    # on by default where measured (CPU); on CUDA a verify step would run eagerly beside graphs
    cpu, gpu = (build_parser().parse_args(["serve", "--device", d]) for d in ("cpu", "cuda"))
    assert sched_config(cpu).draft_tokens == 4 and sched_config(gpu).draft_tokens == 0


def test_cuda_graph_and_sparsity_defaults_follow_the_device():
    """SGLang's CUDA-graph flags are honoured; sparse decode is on by default on CPU and off
    on CUDA (its page selection runs eagerly there), unless the flag says otherwise; `strata
    up` hands its workers the threshold it resolved."""
    from launch.args import sparse_argv

    parse = build_parser().parse_args
    cpu, gpu = model_config(parse(["serve"])), model_config(parse(["serve", "--device", "cuda"]))
    assert cpu.sparse_attention.threshold == 0.3 and not gpu.sparse_attention.enabled
    assert ModelConfig(device="cuda").sparse_attention.threshold == 0  # in process too
    chosen = parse(["serve", "--device", "cuda", "--attention-sparsity-threshold", "0.2"])
    assert model_config(chosen).sparse_attention.threshold == 0.2
    argv = sparse_argv(parse(["up", "--device", "cuda"]))
    assert argv[0] == "--attention-sparsity-threshold" and float(argv[1]) == 0
    assert cpu.cuda_graph_max_bs == 64
    assert model_config(parse(translate(["--disable-cuda-graph"]))).cuda_graph_max_bs == 0
    assert model_config(parse(["serve", "--cuda-graph-max-bs", "8"])).cuda_graph_max_bs == 8


def test_context_length_caps_the_model(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    model = ModelConfig(str(folder), dtype="float32", context_length=64)
    runner = ModelRunner.from_config(model, KVPoolConfig(4, 64))
    assert runner.max_context == 64 < runner.spec.max_position
    with pytest.raises(ContextLengthError):
        runner.check_length(60, 10)


def test_memory_budget_sizes_the_tiers_and_refuses_what_it_cannot_hold(tiny_checkpoint):
    from strata.config import HiCacheConfig
    from strata.engine.memory import GB, RESERVE_BYTES, resident_bytes

    folder, _ = tiny_checkpoint("llama")
    model = ModelConfig(str(folder), dtype="float32")
    for tiers in (None, HiCacheConfig(enabled=True, ratio=2.0)):
        budget = resident_bytes() + RESERVE_BYTES + 128 * 2**20  # 128 MiB beyond the rest
        runner = ModelRunner.from_config(
            model, KVPoolConfig(4, memory_budget_gb=budget / GB), tiers=tiers
        )
        plan = runner.memory
        assert plan is not None and plan.sized_by == "budget"
        assert plan.l1_pages == runner.pool.num_pages
        assert plan.page_bytes == runner.kv.bytes_per_page
        assert plan.l2_pages == (2 * plan.l1_pages if tiers else 0)
        room = plan.budget_bytes - plan.resident_bytes - RESERVE_BYTES
        held = (plan.l1_pages + plan.l2_pages) * plan.page_bytes
        assert room - (3 if tiers else 1) * plan.page_bytes < held <= room  # the most that fit
    with pytest.raises(ValueError, match=r"budget of 0\.01 GB cannot hold .* minimum KV pool"):
        ModelRunner.from_config(model, KVPoolConfig(4, memory_budget_gb=0.01))
    with pytest.raises(ValueError, match="mem-fraction-static"):  # a fraction of what is free
        ModelRunner.from_config(model, KVPoolConfig(4, mem_fraction=1e-9))
    explicit = ModelRunner.from_config(model, KVPoolConfig(4, 8, mem_fraction=1e-9))
    assert explicit.pool.num_pages == 8 and explicit.memory.sized_by == "num_pages"


def test_cache_service_address_keeps_its_old_flag_name():
    for flag in ("--cache-service", "--cache"):
        for command in ("prefill", "decode", "gateway"):
            a = build_parser().parse_args([command, flag, "10.0.0.1:7"])
            assert a.cache_service == "10.0.0.1:7"


def test_sglang_attention_backend_names_map_onto_ours():
    def backend(argv):
        return build_parser().parse_args(translate(argv)).attention_backend

    assert backend(["--attention-backend", "triton"]) == "triton"
    assert backend(["--attention-backend=torch_native"]) == "torch"
    assert backend(["--attention-backend", "flashinfer", "--port", "1"]) == "auto"
    a = build_parser().parse_args(translate(["--attention-backend", "fa3", "--port", "7"]))
    assert a.port == 7


def test_engine_environment_leaves_a_users_openmp_settings_alone(monkeypatch):
    from strata.config import engine_environment

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("STRATA_HUGE_PAGES", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert engine_environment() == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        "GOMP_SPINCOUNT": "20000",
    }
    for name, value in (("GOMP_SPINCOUNT", "1000"), ("OMP_WAIT_POLICY", "PASSIVE")):
        monkeypatch.setenv(name, value)
        assert "GOMP_SPINCOUNT" not in engine_environment()
        monkeypatch.delenv(name)
