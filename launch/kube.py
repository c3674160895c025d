"""`strata kube`: the split cluster as Kubernetes manifests, rendered from the values a user
sets (image, replicas, memory budget, Redis budget, secrets, discovery). The defaults are
rendered in deploy/kubernetes/strata.yaml (a test keeps it fresh); `kubectl apply -f` it.

Objects: a Namespace; Redis (the shared L3, its budget its maxmemory with volatile-lru: the
least recently used pages go, never one a retention priority holds); the cache service; prefill
and decode Deployments whose pods register at the cache service under their pod IP (or, with
`--discovery dns`, sit behind headless Services the gateway resolves); the gateway Deployment
and Service, scraped by Prometheus (annotations, and a ServiceMonitor on request); the Grafana
dashboard as a ConfigMap. Probes: gRPC health on the workers and the cache service (TCP under
mTLS, which the kubelet's gRPC probe cannot speak), /health on the gateway. The API key and the
mTLS files come from Secrets the user creates (named by --api-key-secret and --tls-secret).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "strata.json"
RENDERED = ROOT / "deploy" / "kubernetes" / "strata.yaml"
PORTS = {"gateway": 30000, "grpc": 30001, "cache": 30010, "decode": 30020, "prefill": 30030}
TLS_DIR = "/etc/strata/tls"
Manifest = dict[str, Any]


@dataclass(frozen=True)
class Values:
    namespace: str = "strata"
    image: str = "strata:latest"
    model_path: str = ""  # "": the embedded model in the image
    prefill: int = 1
    decode: int = 2
    memory_budget_gb: float = 6.0  # each worker's (weights, L1 and L2 pages)
    worker_cpus: int = 4
    redis_image: str = "redis:7.2-alpine"
    redis_maxmemory_gb: float = 4.0
    discovery: str = "registry"  # or "dns" (headless Services)
    api_key_secret: str = ""  # a Secret with key "api-key"
    tls_secret: str = ""  # a Secret with tls.crt, tls.key, ca.crt
    service_monitor: bool = False  # a prometheus-operator ServiceMonitor too

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 1:
            raise ValueError("--prefill must be >= 0 and --decode >= 1")
        if self.memory_budget_gb <= 0 or self.redis_maxmemory_gb <= 0:
            raise ValueError("--memory-budget-gb and --redis-maxmemory-gb must be positive")
        if self.discovery not in ("registry", "dns"):
            raise ValueError("--discovery must be registry or dns")


def meta(v: Values, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": f"strata-{name}", "namespace": v.namespace, "labels": labels(name), **extra}


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "strata", "app.kubernetes.io/component": component}


def service(v: Values, name: str, ports: dict[str, int], headless: bool = False) -> Manifest:
    spec: dict[str, Any] = {
        "selector": labels(name),
        "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports.items()],
    }
    if headless:
        spec["clusterIP"] = "None"
    suffix = "-headless" if headless else ""
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(v, name + suffix), "spec": spec}


def deployment(
    v: Values, name: str, replicas: int, container: dict[str, Any], **pod: Any
) -> Manifest:
    annotations = pod.pop("annotations", None)
    template_meta: dict[str, Any] = {"labels": labels(name)}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(v, name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels(name)},
            "template": {"metadata": template_meta, "spec": {"containers": [container], **pod}},
        },
    }


def strata_container(v: Values, name: str, args: list[str], port: int) -> dict[str, Any]:
    """A strata container: its args, the TLS files and the API key when set, and probes
    on its port (gRPC health; TCP under mTLS)."""
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    ]
    mounts = []
    if v.tls_secret:
        for var, file in (("CERT", "tls.crt"), ("KEY", "tls.key"), ("CA", "ca.crt")):
            env.append({"name": f"STRATA_TLS_{var}", "value": f"{TLS_DIR}/{file}"})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    probe = {"tcpSocket": {"port": port}} if v.tls_secret else {"grpc": {"port": port}}
    return {
        "name": name,
        "image": v.image,
        "args": ["strata", *args],
        "env": env,
        "ports": [{"name": "grpc", "containerPort": port}],
        **({"volumeMounts": mounts} if mounts else {}),
        "readinessProbe": {**probe, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {**probe, "initialDelaySeconds": 60, "periodSeconds": 10},
    }


def tls_volumes(v: Values) -> dict[str, Any]:
    if not v.tls_secret:
        return {}
    return {"volumes": [{"name": "tls", "secret": {"secretName": v.tls_secret}}]}


def redis(v: Values) -> list[Manifest]:
    maxmemory = f"{int(v.redis_maxmemory_gb * 1024)}mb"
    args = ["--maxmemory", maxmemory, "--maxmemory-policy", "volatile-lru", "--save", ""]
    memory = f"{math.ceil(v.redis_maxmemory_gb * 1.25 * 1024)}Mi"  # room past maxmemory
    container = {
        "name": "redis",
        "image": v.redis_image,
        "args": [*args, "--appendonly", "no"],
        "ports": [{"name": "redis", "containerPort": 6379}],
        "resources": {"requests": {"memory": memory, "cpu": "1"}, "limits": {"memory": memory}},
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 10},
    }
    return [deployment(v, "redis", 1, container), service(v, "redis", {"redis": 6379})]


def redis_url(v: Values) -> str:
    return f"redis://strata-redis.{v.namespace}.svc:6379/0"


def cache(v: Values) -> list[Manifest]:
    args = ["cache", "--host", "0.0.0.0", "--port", str(PORTS["cache"])]
    container = strata_container(
        v, "cache", [*args, "--hicache-storage-url", redis_url(v)], PORTS["cache"]
    )
    container["resources"] = {"requests": {"memory": "512Mi", "cpu": "500m"}}
    return [
        deployment(v, "cache", 1, container, **tls_volumes(v)),
        service(v, "cache", {"grpc": PORTS["cache"]}),
    ]


def worker(v: Values, role: str, replicas: int) -> list[Manifest]:
    """A prefill or decode Deployment; its memory request is its budget plus room for the
    runtime (the budget holds the weights, L1 and L2)."""
    port = PORTS[role]
    args = [
        role,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--worker-id",
        f"$(POD_IP):{port}",
        "--cache-service",
        f"strata-cache.{v.namespace}.svc:{PORTS['cache']}",
        "--memory-budget-gb",
        f"{v.memory_budget_gb:g}",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "redis",
        "--hicache-storage-url",
        redis_url(v),
    ]
    if v.model_path:
        args += ["--model-path", v.model_path]
    container = strata_container(v, role, args, port)
    memory = f"{math.ceil((v.memory_budget_gb + 1.5) * 1024)}Mi"
    container["resources"] = {
        "requests": {"memory": memory, "cpu": str(v.worker_cpus)},
        "limits": {"memory": memory},
    }
    out = [deployment(v, role, replicas, container, **tls_volumes(v))]
    if v.discovery == "dns":
        out.append(service(v, role, {"grpc": port}, headless=True))
    return out


def gateway(v: Values) -> list[Manifest]:
    svc = f"{v.namespace}.svc"
    if v.discovery == "registry":
        route = ["--discovery", "registry", "--decode", "", "--prefill", ""]
    else:
        route = ["--decode", f"dns:strata-decode-headless.{svc}:{PORTS['decode']}"]
        if v.prefill:
            route += ["--prefill", f"dns:strata-prefill-headless.{svc}:{PORTS['prefill']}"]
        else:
            route += ["--prefill", ""]
    args = [
        "gateway",
        "--host",
        "0.0.0.0",
        "--port",
        str(PORTS["gateway"]),
        "--grpc-port",
        str(PORTS["grpc"]),
        "--cache-service",
        f"strata-cache.{svc}:{PORTS['cache']}",
        *route,
    ]
    if v.model_path:
        args += ["--model-path", v.model_path]
    container = strata_container(v, "gateway", args, PORTS["grpc"])
    container["ports"] = [
        {"name": "http", "containerPort": PORTS["gateway"]},
        {"name": "grpc", "containerPort": PORTS["grpc"]},
    ]
    health = {"httpGet": {"path": "/health", "port": PORTS["gateway"]}}
    container["readinessProbe"] = {**health, "periodSeconds": 5}
    container["livenessProbe"] = {**health, "initialDelaySeconds": 30, "periodSeconds": 10}
    container["resources"] = {"requests": {"memory": "1Gi", "cpu": "1"}}
    if v.api_key_secret:
        key = {"secretKeyRef": {"name": v.api_key_secret, "key": "api-key"}}
        container["env"].append({"name": "STRATA_API_KEY", "valueFrom": key})
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORTS["gateway"]),
        "prometheus.io/path": "/metrics",
    }
    out = [
        deployment(v, "gateway", 1, container, annotations=scrape, **tls_volumes(v)),
        service(v, "gateway", {"http": PORTS["gateway"], "grpc": PORTS["grpc"]}),
    ]
    if v.service_monitor:
        out.append(
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "ServiceMonitor",
                "metadata": meta(v, "gateway"),
                "spec": {
                    "selector": {"matchLabels": labels("gateway")},
                    "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
                },
            }
        )
    return out


def dashboard(v: Values) -> Manifest:
    """The Grafana dashboard, for a Grafana sidecar that loads labelled ConfigMaps."""
    board = json.dumps(json.loads(DASHBOARD.read_text()), indent=1)
    m = meta(v, "dashboard")
    m["labels"]["grafana_dashboard"] = "1"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": m, "data": {"strata.json": board}}


def manifests(v: Values) -> list[Manifest]:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": v.namespace}}
    return [
        namespace,
        *redis(v),
        *cache(v),
        *worker(v, "prefill", v.prefill),
        *worker(v, "decode", v.decode),
        *gateway(v),
        dashboard(v),
    ]


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # plain YAML: no &anchors for shared parts
        return True


def render(v: Values) -> str:
    head = "# strata on Kubernetes, rendered by `strata kube` (its defaults); docs/kubernetes.md\n"
    body = yaml.dump_all(manifests(v), Dumper=_Dumper, sort_keys=False, width=100)
    return head + body


def add_kube_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("kube", help="print the split cluster as Kubernetes manifests")
    d = Values()
    k.add_argument("--namespace", default=d.namespace, help="where every object goes")
    k.add_argument("--image", default=d.image, help="the strata image (the Dockerfile's)")
    k.add_argument("--model-path", default=d.model_path, help="in the image (default: embedded)")
    k.add_argument("--prefill", type=int, default=d.prefill, help="prefill workers (0: none)")
    k.add_argument("--decode", type=int, default=d.decode, help="decode workers")
    k.add_argument(
        "--memory-budget-gb",
        type=float,
        default=d.memory_budget_gb,
        help="each worker's budget (weights, L1, L2); its pod requests 1.5 GB more",
    )
    k.add_argument("--worker-cpus", type=int, default=d.worker_cpus, help="each worker requests")
    k.add_argument("--redis-image", default=d.redis_image, help="Redis or Valkey, 7+")
    k.add_argument(
        "--redis-maxmemory-gb", type=float, default=d.redis_maxmemory_gb, help="the L3 budget"
    )
    k.add_argument(
        "--discovery",
        choices=["registry", "dns"],
        default=d.discovery,
        help="the gateway follows the cache service's registry, or headless Services' DNS",
    )
    k.add_argument("--api-key-secret", default="", help="a Secret whose key api-key is the key")
    k.add_argument("--tls-secret", default="", help="a Secret with tls.crt, tls.key, ca.crt")
    k.add_argument("--service-monitor", action="store_true", help="a ServiceMonitor too")
    k.set_defaults(func=cmd_kube, log_level="warning")


def cmd_kube(a: argparse.Namespace) -> int:
    names = [f for f in Values.__dataclass_fields__]
    print(render(Values(**{n: getattr(a, n) for n in names})), end="")
    return 0
