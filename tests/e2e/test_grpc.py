"""The gRPC strata.v1.Gateway of a real `strata serve`, called through stubs generated from
the protos (not the gateway's own code): streaming, constraints, bad input, cancellation,
health checking and reflection."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from launch.local import free_port, running_server
from strata.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.grammar_corpus import REGEXES, SCHEMAS
from tests.e2e.test_structured import no_pages_leaked

QUESTION = "Name three primary colors."


@pytest.fixture(scope="module")
def urls():
    port = free_port()
    with running_server("--grpc-port", str(port)) as url:
        yield url, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def stub(urls):
    with grpc.insecure_channel(urls[1]) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def chat_request(question: str = QUESTION, **sampling) -> gateway_pb2.GenerateRequest:
    message = gateway_pb2.ChatMessage(role="user", content=question)
    msgs = gateway_pb2.ChatMessages(messages=[message])
    params = common_pb2.SamplingParams(max_new_tokens=24, temperature=0, **sampling)
    return gateway_pb2.GenerateRequest(messages=msgs, sampling_params=params)


def test_streamed_generation_equals_rest(urls, stub):
    chunks = list(stub.GenerateStream(chat_request(), timeout=120))
    assert len(chunks) > 2
    text = "".join(c.chunk.text for c in chunks)
    last = chunks[-1].chunk
    assert last.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert last.usage.completion_tokens == sum(len(c.chunk.token_ids) for c in chunks)
    rest = httpx.post(
        f"{urls[0]}/v1/chat/completions",
        timeout=120,
        json={
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 24,
            "temperature": 0,
        },
    ).json()
    assert text == rest["choices"][0]["message"]["content"]
    unary = stub.Generate(chat_request(), timeout=120)
    assert unary.text == text and unary.usage.cached_tokens > 0
    metrics = httpx.get(f"{urls[0]}/metrics", timeout=30).text  # gRPC requests count too
    assert re.search(r'^strata_requests_total\{endpoint="grpc",status="ok"\} [2-9]', metrics, re.M)


def test_constraint_corpus_through_grpc(urls, stub):
    def run(constraint: common_pb2.Constraint, what: str) -> gateway_pb2.GenerateResponse:
        req = gateway_pb2.GenerateRequest(
            text=f"Write {what}: ",
            sampling_params=common_pb2.SamplingParams(
                max_new_tokens=160, temperature=0, constraint=constraint
            ),
        )
        return stub.Generate(req, timeout=300)

    with ThreadPoolExecutor(16) as pool:
        schema_jobs = [
            (sc, pool.submit(run, common_pb2.Constraint(json_schema=json.dumps(sc)), w))
            for w, sc in SCHEMAS
        ]
        regex_jobs = [
            (rx, pool.submit(run, common_pb2.Constraint(regex=rx), w)) for w, rx in REGEXES
        ]
        for schema, job in schema_jobs:
            out = job.result()
            assert out.finish_reason == common_pb2.FINISH_REASON_STOP, out.text
            jsonschema.validate(json.loads(out.text), schema)
        for pattern, job in regex_jobs:
            out = job.result()
            assert out.finish_reason == common_pb2.FINISH_REASON_STOP, out.text
            assert re.fullmatch(pattern, out.text), (pattern, out.text)
    no_pages_leaked(urls[0])


@pytest.mark.parametrize(
    "request_,needle",
    [
        (gateway_pb2.GenerateRequest(), "give text, token_ids or messages"),
        (
            gateway_pb2.GenerateRequest(
                text="hi",
                sampling_params=common_pb2.SamplingParams(
                    constraint=common_pb2.Constraint(regex="[a-z")
                ),
            ),
            "invalid regex",
        ),
        (
            gateway_pb2.GenerateRequest(
                text="hi", sampling_params=common_pb2.SamplingParams(temperature=-1)
            ),
            "temperature",
        ),
        (gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[10**6])), "token ids"),
        (gateway_pb2.GenerateRequest(text="word " * 9000), "context length"),
        (
            gateway_pb2.GenerateRequest(
                messages=gateway_pb2.ChatMessages(
                    messages=[gateway_pb2.ChatMessage(role="robot", content="hi")]
                )
            ),
            "unknown role 'robot'",
        ),
        (gateway_pb2.GenerateRequest(messages=gateway_pb2.ChatMessages()), "messages must not"),
    ],
)
def test_bad_input_is_invalid_argument(urls, stub, request_, needle):
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()
    no_pages_leaked(urls[0])


def test_rest_and_grpc_take_the_same_chat_roles(urls, stub):
    roles = ["system", "developer", "user", "assistant", "tool", "user"]
    msgs = [{"role": r, "content": f"A {r} line."} for r in roles]
    rest = httpx.post(
        f"{urls[0]}/v1/chat/completions",
        timeout=120,
        json={"messages": msgs, "max_tokens": 8, "temperature": 0},
    ).json()
    request_ = gateway_pb2.GenerateRequest(
        messages=gateway_pb2.ChatMessages(messages=[gateway_pb2.ChatMessage(**m) for m in msgs]),
        sampling_params=common_pb2.SamplingParams(max_new_tokens=8, temperature=0),
    )
    assert stub.Generate(request_, timeout=120).text == rest["choices"][0]["message"]["content"]


def test_cancelled_stream_frees_its_pages(urls, stub):
    req = chat_request("Write a very long story about the sea.")
    req.sampling_params.max_new_tokens = 400
    req.sampling_params.ignore_eos = True
    call = stub.GenerateStream(req, timeout=120)
    first = next(call)
    assert first.chunk.token_ids
    busy = json.loads(stub.HealthStats(gateway_pb2.HealthStatsRequest()).json)
    assert busy["running_requests"] == 1
    call.cancel()
    no_pages_leaked(urls[0])


def test_health_checking_and_reflection(urls):
    with grpc.insecure_channel(urls[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "strata.v1.Gateway"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert {"strata.v1.Gateway", "grpc.health.v1.Health"} <= names


def test_a_session_over_grpc(stub):
    """OpenSession, Generate with session_params (token ids continue the session), and
    CloseSession over gRPC, as over REST; a closed session is INVALID_ARGUMENT."""
    sid = stub.OpenSession(gateway_pb2.OpenSessionRequest(timeout_s=60)).session_id
    greedy = common_pb2.SamplingParams(max_new_tokens=6, temperature=0)
    whole: list[int] = []
    for ids in ([504, 3356, 282, 260], [1067, 6056, 30]):
        req = gateway_pb2.GenerateRequest(
            token_ids=gateway_pb2.TokenIds(ids=ids),
            sampling_params=greedy,
            session_params=gateway_pb2.SessionParams(id=sid),
        )
        out = stub.Generate(req, timeout=120)
        alone = gateway_pb2.GenerateRequest(
            token_ids=gateway_pb2.TokenIds(ids=whole + ids), sampling_params=greedy
        )
        assert list(out.token_ids) == list(stub.Generate(alone, timeout=120).token_ids)
        assert out.usage.prompt_tokens == len(whole + ids)
        whole += ids + list(out.token_ids)
    stub.CloseSession(gateway_pb2.CloseSessionRequest(session_id=sid))
    with pytest.raises(grpc.RpcError) as err:
        stub.CloseSession(gateway_pb2.CloseSessionRequest(session_id=sid))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
