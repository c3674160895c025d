"""Mutual TLS between services (`--tls-cert/--tls-key/--tls-ca`), with certificates made here
(trustme): a service refuses plain gRPC, a client without a certificate and one whose
certificate another CA signed; a cluster whose services all use TLS answers requests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launch.local import free_port, running_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """ca.pem; node.pem/node.key signed by it; rogue.pem/rogue.key signed by another CA."""
    d = tmp_path_factory.mktemp("tls")
    ca, rogue_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, issuer in (("node", ca), ("rogue", rogue_ca)):
        leaf = issuer.issue_cert("127.0.0.1", "localhost")
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
    return {p.name: p for p in d.iterdir()}


def tls_flags(certs: dict[str, Path]) -> list[str]:
    return [
        "--tls-cert",
        str(certs["node.pem"]),
        "--tls-key",
        str(certs["node.key"]),
        "--tls-ca",
        str(certs["ca.pem"]),
    ]


def check(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=3).status


def secure(target: str, certs: dict[str, Path], who: str | None) -> grpc.Channel:
    key = certs[f"{who}.key"].read_bytes() if who else None
    cert = certs[f"{who}.pem"].read_bytes() if who else None
    creds = grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes(), key, cert)
    return grpc.secure_channel(target, creds)


def test_a_service_with_tls_accepts_only_clients_the_ca_signed(certs):
    port = free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "launch.cli", "cache", "--port", str(port), *tls_flags(certs)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            deadline = time.monotonic() + 60
            with secure(target, certs, "node") as channel:
                while True:
                    try:
                        assert check(channel) == health_pb2.HealthCheckResponse.SERVING
                        break
                    except grpc.RpcError:
                        log.seek(0)
                        assert proc.poll() is None, log.read().decode(errors="replace")
                        assert time.monotonic() < deadline, "the cache service never answered"
                        time.sleep(0.3)
            for refused in (
                grpc.insecure_channel(target),
                secure(target, certs, None),
                secure(target, certs, "rogue"),
            ):
                with refused, pytest.raises(grpc.RpcError) as err:
                    check(refused)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            proc.terminate()
            proc.wait(30)


def test_half_the_tls_flags_are_refused(certs):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "cache",
            "--port",
            str(free_port()),
            "--tls-cert",
            str(certs["node.pem"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "--tls-ca together" in done.stderr


def test_a_cluster_over_mutual_tls_answers(certs):
    with running_cluster("--prefill", "1", "--decode", "1", *tls_flags(certs)) as (url, _):
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=300,
            json={
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        workers = httpx.get(f"{url}/health", timeout=30).json()["workers"]
        assert len(workers) == 2 and all(w["status"] == "ok" for w in workers), workers
        for w in workers:  # plain gRPC to a worker is refused
            with grpc.insecure_channel(w["worker"]) as plain, pytest.raises(grpc.RpcError):
                check(plain)
