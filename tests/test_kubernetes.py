"""deploy/kubernetes/strata.yaml is what `strata kube` renders with its defaults; every
manifest, with the defaults and with the values a user would set, validates against the
Kubernetes schemas (kubernetes-validate, offline), and holds together: each Service selects
a Deployment, each strata container's args parse with strata's own CLI, each worker's pod
requests more memory than its budget, the Secrets and DNS names named are the ones set."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from launch.cli import build_parser
from launch.kube import DASHBOARD, RENDERED, Values, manifests, render

K8S_VERSION = "1.34"
USER = Values(
    namespace="llm",
    image="registry.example.com/strata:0.9",
    model_path="/models/qwen3-8b",
    prefill=0,
    decode=4,
    memory_budget_gb=40,
    worker_cpus=16,
    redis_maxmemory_gb=64,
    discovery="dns",
    api_key_secret="strata-api-key",
    tls_secret="strata-mtls",
    service_monitor=True,
)


def test_the_rendered_manifests_are_fresh():
    assert RENDERED.read_text() == render(Values()), (
        "run: strata kube > deploy/kubernetes/strata.yaml"
    )
    assert list(yaml.safe_load_all(RENDERED.read_text())) == manifests(Values())


def containers(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
        for d in docs
        if d["kind"] == "Deployment"
    }


@pytest.mark.parametrize("values", [Values(), USER], ids=["defaults", "user"])
def test_every_manifest_validates_and_holds_together(values):
    docs = manifests(values)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no schema in Kubernetes itself
            assert doc["spec"]["endpoints"][0]["port"] == "http"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == values.namespace
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in deployments]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for svc in services.values():
        assert svc["spec"]["selector"] in pods, svc["metadata"]["name"]
    parser = build_parser()
    byname = containers(docs)
    for name, c in byname.items():
        if c["args"][0] != "strata":
            continue
        parser.parse_args(c["args"][1:])  # exits (fails the test) on a flag strata lacks
        assert c["image"] == values.image
        tls = {e["name"]: e.get("value") for e in c["env"]}
        assert ("STRATA_TLS_CERT" in tls) == bool(values.tls_secret), name
    for role in ("prefill", "decode"):
        c = byname.get(f"strata-{role}")
        if c is None:
            assert values.prefill == 0 and role == "prefill"
            continue
        memory = int(c["resources"]["requests"]["memory"].removesuffix("Mi"))
        assert memory * 2**20 > values.memory_budget_gb * 1e9
        assert f"{values.memory_budget_gb:g}" in c["args"]
    gateway = byname["strata-gateway"]
    if values.discovery == "dns":
        named = [a for a in gateway["args"] if a.startswith("dns:")]
        assert named and all(a.split(":")[1].split(".")[0] in services for a in named)
    else:
        assert gateway["args"][gateway["args"].index("--discovery") + 1] == "registry"
    keys = [e for e in gateway["env"] if e["name"] == "STRATA_API_KEY"]
    assert bool(keys) == bool(values.api_key_secret)
    board = next(d for d in docs if d["kind"] == "ConfigMap")
    assert json.loads(board["data"]["strata.json"]) == json.loads(DASHBOARD.read_text())


def test_bad_values_are_refused():
    for bad in ({"decode": 0}, {"prefill": -1}, {"memory_budget_gb": 0}, {"discovery": "mdns"}):
        with pytest.raises(ValueError):
            Values(**bad)
