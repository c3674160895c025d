"""Prefill and decode workers as real processes on a tiny model, driven over real gRPC with
the generated stubs: a prompt prefilled remotely (its KV sent over gloo) generates exactly
what a local prefill does; failures are clear errors that leave the pools at baseline; a
SIGTERM lets the streams in flight finish."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import grpc
import pytest

from launch.local import free_port, grpc_service, started_together
from services.convert import params_to_proto
from strata.model.loader import load_tokenizer, resolve_checkpoint
from strata.proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from strata.sampling.params import SamplingParams
from tests.conftest import tiny_hf_model

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[(7 * i + 3 * j) % 300 + 5 for j in range(9 + 11 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A prefill and a decode worker, and beside them (all started at once) the workers
    the tests below pair with them or stop: a prefill worker of another page size, a prefill
    and a decode worker of two TP ranks each, a decode worker to SIGTERM, one to SIGKILL."""
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_hf_model("llama").save_pretrained(folder)
    load_tokenizer(resolve_checkpoint(None)).save_pretrained(folder)  # servers need one
    model = ["--model-path", str(folder), "--dtype", "float32", "--log-level", "info"]
    pool = [*model, "--page-size", "4", "--num-pages", "128"]
    with ExitStack() as stack:
        cache, _ = stack.enter_context(grpc_service("cache"))
        workers = {
            "prefill": ("prefill", *pool),
            "decode": ("decode", *pool),
            "mismatched": ("prefill", *model, "--page-size", "8"),
            "tp_prefill": ("prefill", *pool, "--tp-size", "2"),
            "tp_decode": ("decode", *pool, "--tp-size", "2"),
            "draining": ("decode", *model, "--page-size", "4", "--worker-id", "draining"),
            "doomed": ("decode", *model, "--page-size", "4"),
        }
        starts = [
            grpc_service(role, "--cache-service", cache, *flags)
            for role, *flags in workers.values()
        ]
        started = dict(zip(workers, started_together(stack, starts)))
        yield {
            "cache": cache,
            "model": folder,
            **{name: target for name, (target, _) in started.items()},
            "procs": {name: proc for name, (_, proc) in started.items()},
        }


def generate(target: str, prompt: list[int], prefill: str = "", params=GREEDY, rid: str = ""):
    with grpc.insecure_channel(target) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)
        request = worker_pb2.WorkerGenerateRequest(
            request_id=rid or f"r{time.monotonic_ns()}",
            prompt_ids=prompt,
            sampling_params=params_to_proto(params),
            prefill_worker=prefill,
        )
        return list(stub.Generate(request, timeout=60))


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def load(target: str, role: str = "Decode") -> worker_pb2.LoadResponse:
    with grpc.insecure_channel(target) as channel:
        stub = getattr(worker_pb2_grpc, f"{role}Stub")(channel)
        return stub.Load(worker_pb2.LoadRequest(), timeout=10)


def flush(target: str, role: str = "Decode") -> None:
    with grpc.insecure_channel(target) as channel:
        getattr(worker_pb2_grpc, f"{role}Stub")(channel).FlushCache(worker_pb2.FlushRequest())


def assert_baseline(cluster) -> None:
    for target, role in ((cluster["decode"], "Decode"), (cluster["prefill"], "Prefill")):
        deadline = time.monotonic() + 20
        while (w := load(target, role)).running or w.held_requests:
            assert time.monotonic() < deadline, w
            time.sleep(0.1)
        flush(target, role)
        w = load(target, role)
        assert w.pages_free == w.pages_total, (role, w)


def test_remote_prefill_generates_what_a_local_prefill_does(cluster):
    local = [tokens(generate(cluster["decode"], p)) for p in PROMPTS]
    flush(cluster["decode"])
    before = load(cluster["decode"])
    remote = [generate(cluster["decode"], p, cluster["prefill"]) for p in PROMPTS]
    assert [tokens(c) for c in remote] == local
    after = load(cluster["decode"])
    assert after.transfers - before.transfers == len(PROMPTS)
    pages = sum(-(-len(p) // 4) for p in PROMPTS)
    # layers, K+V, page size + the summary row, kv heads, head dim, fp32
    bytes_per_page = 2 * 2 * (4 + 1) * 2 * 16 * 4
    assert after.transfer_bytes - before.transfer_bytes == pages * bytes_per_page
    assert all(c[0].transfer_bytes > 0 for c in remote)  # reported on the first chunk
    assert load(cluster["prefill"], "Prefill").transfers == after.transfers
    # the same prompts again: the prefill worker finds them in its cache
    again = [generate(cluster["decode"], p, cluster["prefill"]) for p in PROMPTS]
    assert [tokens(c) for c in again] == local
    assert all(c[-1].usage.cached_tokens > 0 for c in again[1:])
    assert_baseline(cluster)


def test_seeded_sampling_and_logprobs_cross_the_split(cluster):
    params = SamplingParams(
        max_new_tokens=8, temperature=0.8, seed=11, logprobs=True, ignore_eos=True
    )
    local = generate(cluster["decode"], PROMPTS[2], params=params)
    remote = generate(cluster["decode"], PROMPTS[2], cluster["prefill"], params=params)
    assert tokens(remote) == tokens(local)
    lp = [x for c in remote for x in c.logprobs]
    assert lp == pytest.approx([x for c in local for x in c.logprobs], abs=1e-4)
    assert_baseline(cluster)


def test_an_unreachable_prefill_worker_is_a_clear_error(cluster):
    dead = f"127.0.0.1:{free_port()}"
    chunks = generate(cluster["decode"], PROMPTS[1], dead)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert f"prefill worker {dead}" in chunks[-1].error
    assert_baseline(cluster)


def test_a_mismatched_prefill_worker_is_refused_clearly(cluster):
    chunks = generate(cluster["decode"], PROMPTS[1], cluster["mismatched"])
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert "pages reserved" in chunks[-1].error or "KV layout" in chunks[-1].error
    assert_baseline(cluster)


def test_a_prefill_worker_of_another_tp_size_is_refused_at_the_handshake(cluster):
    start = time.monotonic()
    chunks = generate(cluster["decode"], PROMPTS[1], cluster["tp_prefill"])
    assert time.monotonic() - start < 10  # refused, not a hang until some timeout
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert "KV layout" in chunks[-1].error and "tp2" in chunks[-1].error
    assert "--tp-size" in chunks[-1].error
    assert_baseline(cluster)


def test_tensor_parallel_workers_move_each_ranks_kv_heads(cluster):
    """A prefill and a decode worker of two ranks each: every rank sends its own KV head
    over a channel of its own; the tokens are those of one rank's local prefill."""
    local = [tokens(generate(cluster["decode"], p)) for p in PROMPTS]
    prefill, decode = cluster["tp_prefill"], cluster["tp_decode"]
    remote = [generate(decode, p, prefill) for p in PROMPTS]
    assert [tokens(c) for c in remote] == local
    after = load(decode)
    assert after.transfers == len(PROMPTS)
    pages = sum(-(-len(p) // 4) for p in PROMPTS)
    # both ranks' halves: layers, K+V, page size + summary row, 2 x 1 KV head, dim, fp32
    assert after.transfer_bytes == pages * 2 * 2 * (4 + 1) * 2 * 16 * 4
    again = [generate(decode, p, prefill) for p in PROMPTS]  # pages from its cache now
    assert [tokens(c) for c in again] == local
    assert_baseline({"decode": decode, "prefill": prefill})


def test_bad_input_to_the_prefill_worker_is_invalid_argument(cluster):
    with grpc.insecure_channel(cluster["prefill"]) as channel:
        stub = worker_pb2_grpc.PrefillStub(channel)
        bad = worker_pb2.PrefillRequest(
            request_id="x", prompt_ids=[10**6], num_pages=1, sampling_params=params_to_proto(GREEDY)
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Prefill(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Pull(worker_pb2.PullRequest(request_id="x", channel_id="nope"), timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        layout = worker_pb2.ConnectRequest(decode_worker="t", kv_layout="1x1x1x1:float32")
        with pytest.raises(grpc.RpcError) as err:
            stub.Connect(layout, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "KV layout" in (err.value.details() or "")


def test_sigterm_lets_streams_in_flight_finish(cluster):
    target, proc = cluster["draining"], cluster["procs"]["draining"]
    long = SamplingParams(max_new_tokens=120, temperature=0, ignore_eos=True)
    with grpc.insecure_channel(target) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)
        call = stub.Generate(
            worker_pb2.WorkerGenerateRequest(
                request_id="long",
                prompt_ids=PROMPTS[0],
                sampling_params=params_to_proto(long),
                prefill_worker=cluster["prefill"],
            ),
            timeout=60,
        )
        first = next(call)
        proc.send_signal(signal.SIGTERM)
        rest = list(call)
        assert len(first.token_ids) + len(tokens(rest)) == 120
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert proc.wait(30) == 0
    assert_baseline(cluster)


def test_a_resumed_request_goes_on_after_the_tokens_it_was_given(cluster):
    """A decode worker given resume_ids (tokens another worker streamed) emits the rest of
    the uncut run; resumed tokens are checked like the prompt."""
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    whole = tokens(generate(cluster["decode"], PROMPTS[1], params=params))
    with grpc.insecure_channel(cluster["decode"]) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)

        def resume(ids: list[int], prefill: str = "") -> list:
            request = worker_pb2.WorkerGenerateRequest(
                request_id=f"r{time.monotonic_ns()}",
                prompt_ids=PROMPTS[1],
                sampling_params=params_to_proto(params),
                resume_ids=ids,
                prefill_worker=prefill,
            )
            return list(stub.Generate(request, timeout=60))

        rest = resume(whole[:5])
        assert tokens(rest) == whole[5:]
        assert rest[-1].usage.prompt_tokens == len(PROMPTS[1])
        assert rest[-1].usage.completion_tokens == len(whole)
        for bad, prefill in (([10**6], ""), (whole[:12], ""), (whole[:3], cluster["prefill"])):
            with pytest.raises(grpc.RpcError) as err:
                resume(bad, prefill)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert_baseline(cluster)


def test_a_stream_cut_by_a_killed_worker_goes_on_on_another(cluster):
    """The gateway's split backend streams 8 requests (greedy and seeded) over two decode
    workers; one is SIGKILLed once every stream has its first event. Every stream goes on on
    the other worker after the tokens it already has and ends with the uncut run's tokens."""
    import asyncio

    from gateway.remote import RemoteBackend
    from strata.engine.request import Checked
    from strata.model.loader import read_config
    from strata.model.registry import model_spec

    runs = [
        (PROMPTS[i % 4], SamplingParams(max_new_tokens=200, ignore_eos=True, seed=i, **kind))
        for i, kind in enumerate([{"temperature": 0}, {"temperature": 0.8}] * 4)
    ]
    uncut = [tokens(generate(cluster["decode"], p, params=s)) for p, s in runs]
    flush(cluster["decode"])
    folder = cluster["model"]
    doomed, proc = cluster["doomed"], cluster["procs"]["doomed"]
    backend = RemoteBackend(
        load_tokenizer(folder),
        "tiny",
        model_spec(read_config(folder)),
        cluster["cache"],
        [doomed, cluster["decode"]],
    )

    async def stream_all() -> list[list[int]]:
        streams = [backend.generate(Checked(p, s)) for p, s in runs]
        got = [list((await anext(s)).token_ids) for s in streams]
        proc.kill()
        for ids, s in zip(got, streams, strict=True):
            async for ev in s:
                assert ev.finish_reason != "error", ev.error
                ids += ev.token_ids
        return got

    got = asyncio.run(stream_all())
    assert backend.migrated >= 1
    assert got == uncut
    assert_baseline(cluster)
