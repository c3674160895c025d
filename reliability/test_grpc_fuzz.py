"""Hypothesis-generated protobuf messages to every method of every gRPC service of a real
cluster (cache service, prefill worker, decode worker, gateway), each started as its own
process on loopback. A method may refuse a message with any status that names the caller's
mistake or the server's state; UNKNOWN, INTERNAL, DATA_LOSS or UNIMPLEMENTED (a crash in a
handler, or a method the reflection lists but nobody serves) fail the run, and so does a
process that died, a health check that is not SERVING, or a page still locked at the end."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch.local import free_port, grpc_service, running_http
from reliability.conftest import figure
from strata.proto.v1 import cache_pb2, gateway_pb2, worker_pb2

EXAMPLES = 60  # per method
CALL_TIMEOUT = 15.0
BROKEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
}
F = FieldDescriptor
INTS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # protobuf needs UTF-8


def scalar(f: FieldDescriptor, overrides: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    if f.name in overrides:
        return overrides[f.name]
    if f.type in INTS:
        lo, hi = INTS[f.type]
        small = st.integers(0, 64) if lo == 0 else st.integers(-64, 64)
        return st.one_of(small, st.integers(lo, hi))  # small values reach deeper code
    if f.type == F.TYPE_BOOL:
        return st.booleans()
    if f.type == F.TYPE_FLOAT:
        return st.floats(width=32)
    if f.type == F.TYPE_DOUBLE:
        return st.floats()
    if f.type == F.TYPE_STRING:
        return TEXT
    if f.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if f.type == F.TYPE_ENUM:
        return st.one_of(
            st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-5, 100)
        )
    raise AssertionError(f"field type {f.type}")


@st.composite
def messages(
    draw: Any, desc: Descriptor, overrides: dict[str, st.SearchStrategy], depth: int = 0
) -> Message:
    """Any message of type desc: each field set or not, repeated fields of 0-8 values,
    nested messages to depth 3."""
    msg = GetMessageClass(desc)()
    for f in desc.fields:
        if not draw(st.booleans()):
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f, val_f = (
                f.message_type.fields_by_name["key"],
                f.message_type.fields_by_name["value"],
            )
            for _ in range(draw(st.integers(0, 4))):
                key = draw(scalar(key_f, {}))
                if val_f.message_type is None:
                    getattr(msg, f.name)[key] = draw(scalar(val_f, {}))
                elif depth < 3:
                    getattr(msg, f.name)[key].CopyFrom(
                        draw(messages(val_f.message_type, {}, depth + 1))
                    )
            continue
        if f.message_type is not None:
            if depth >= 3:
                continue
            sub = messages(f.message_type, overrides, depth + 1)
            if f.is_repeated:
                getattr(msg, f.name).extend(draw(st.lists(sub, max_size=4)))
            else:
                getattr(msg, f.name).CopyFrom(draw(sub))
            continue
        value = scalar(f, overrides)
        if f.is_repeated:
            getattr(msg, f.name).extend(draw(st.lists(value, max_size=8)))
        else:
            setattr(msg, f.name, draw(value))
    return msg


def caller(stub: Any, path: str, streaming: bool, codes: Counter, broken: list[str]) -> Any:
    """Call one method with a message; count its status; note a broken one."""

    def call(msg: Message) -> None:
        try:
            reply = stub(msg, timeout=CALL_TIMEOUT)
            if streaming:
                for _ in reply:
                    pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            if code in BROKEN:
                broken.append(f"{path} {code.name} {exc.details()!r} <- {msg!r:.300}")
        codes[(path, code.name)] += 1

    return call


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    with ExitStack() as stack:
        cache, cache_proc = stack.enter_context(grpc_service("cache"))
        worker = ("--cache-service", cache, "--request-timeout", "3", "--num-pages", "256")
        prefill, prefill_proc = stack.enter_context(grpc_service("prefill", *worker))
        decode, decode_proc = stack.enter_context(grpc_service("decode", *worker))
        gport = free_port()
        url = stack.enter_context(
            running_http(
                "gateway",
                "--cache-service",
                cache,
                "--decode",
                decode,
                "--prefill",
                prefill,
                "--grpc-port",
                str(gport),
            )
        )
        procs = {"cache": cache_proc, "prefill": prefill_proc, "decode": decode_proc}
        yield {
            "cache": cache,
            "prefill": prefill,
            "decode": decode,
            "gateway": f"127.0.0.1:{gport}",
            "url": url,
            "procs": procs,
        }


SERVICES = [
    ("cache", cache_pb2, "Cache"),
    ("prefill", worker_pb2, "Prefill"),
    ("decode", worker_pb2, "Decode"),
    ("gateway", gateway_pb2, "Gateway"),
]


def test_generated_messages_crash_nothing(cluster):
    # NOTE: a decode worker dials the prefill worker a request names: only real addresses
    # (or a closed loopback port), so no call leaves the machine
    overrides = {"prefill_worker": st.sampled_from(["", cluster["prefill"], "127.0.0.1:9"])}
    codes: Counter[tuple[str, str]] = Counter()
    broken: list[str] = []
    for role, module, service in SERVICES:
        sdesc = module.DESCRIPTOR.services_by_name[service]
        with grpc.insecure_channel(cluster[role]) as channel:
            for method in sdesc.methods:
                path = f"/{sdesc.full_name}/{method.name}"
                out_cls = GetMessageClass(method.output_type)
                kind = channel.unary_stream if method.server_streaming else channel.unary_unary
                stub = kind(
                    path,
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=out_cls.FromString,
                )

                call = caller(stub, path, method.server_streaming, codes, broken)
                cases = given(msg=messages(method.input_type, overrides))(call)
                settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    derandomize=True,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )(cases)()
    for path in sorted({p for p, _ in codes}):
        by_code = {c: n for (p, c), n in sorted(codes.items()) if p == path}
        figure(f"grpc {path}", by_code)
    figure("grpc calls", sum(codes.values()))
    figure("grpc broken", len(broken))
    time.sleep(4)  # requests cut by the client end on the workers' side
    for name, proc in cluster["procs"].items():
        assert proc.poll() is None, f"the {name} process died"
    for role in ("cache", "prefill", "decode", "gateway"):
        with grpc.insecure_channel(cluster[role]) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=5)
                .status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING, role
    health = httpx.get(f"{cluster['url']}/health", timeout=30).json()
    for w in health["workers"]:
        assert w["status"] == "ok" and w["radix_cache_stats"]["locked_pages"] == 0, w
        assert w["pages_free"] + w["radix_cache_stats"]["cached_pages"] == w["pages_total"], w
    figure("grpc processes alive after", len(cluster["procs"]) + 1)
    assert not broken, "\n".join(broken[:20])
