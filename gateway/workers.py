"""WorkerSet: the split gateway's decode and prefill workers, who they are and how they are.

Who: static addresses (`--decode host:port,...`), a Kubernetes headless Service's DNS name
(`dns:NAME:PORT`, resolved to one worker per address it returns), and, with
`--discovery registry`, the cache service's registry, where each worker renews its entry
with a heartbeat. `watch` follows all three every PERIOD: a worker that registers gets
traffic within a period; one that stops heartbeating leaves routing when its entry expires.
How: every worker is health-checked each PERIOD; routing skips the ones that fail and takes
them back when they answer. Also the requests each holds (for load-aware routing).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.grpcio import open_aio_channel
from strata.proto.v1 import cache_pb2, cache_pb2_grpc, worker_pb2_grpc

log = logging.getLogger(__name__)

PERIOD = 1.0  # seconds between health checks of every worker (and their timeout)
FOLLOW = 0.5  # seconds between looks at the registry and the DNS names
DISCOVERY = ("static", "registry")


def split_addresses(addresses: Sequence[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """host:port entries, and the (name, port) of `dns:NAME:PORT` entries."""
    static, names = [], []
    for a in addresses:
        if a.startswith("dns:"):
            host, _, port = a.removeprefix("dns:").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"a DNS entry is dns:NAME:PORT, not {a!r}")
            names.append((host, int(port)))
        elif a.rpartition(":")[2].isdigit():
            static.append(a)
        else:
            raise ValueError(f"a worker address is host:port or dns:NAME:PORT, not {a!r}")
    return static, names


async def resolve(name: str, port: int) -> list[str]:
    """Every address a DNS name has (a headless Service: one per ready pod), as targets."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    out = []
    for family, _, _, _, addr in infos:
        host = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
        out.append(f"{host}:{port}")
    return sorted(set(out))


class WorkerSet:
    def __init__(
        self,
        decode: Sequence[str],
        prefill: Sequence[str],
        cache_service: str,
        discovery: str = "static",
    ) -> None:
        if discovery not in DISCOVERY:
            raise ValueError(f"--discovery must be one of {', '.join(DISCOVERY)}")
        self.static = {"decode": split_addresses(decode), "prefill": split_addresses(prefill)}
        if discovery == "static" and not any(self.static["decode"]):
            raise ValueError("the gateway needs a decode worker (or --discovery registry)")
        self.cache_service, self.discovery = cache_service, discovery
        self.decode: list[str] = []
        self.prefill: list[str] = []
        self.inflight: dict[str, int] = {}  # requests (or prefills) each worker holds
        self.healthy: dict[str, bool] = {}  # answered its last health check
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cache: cache_pb2_grpc.CacheStub | None = None
        self._watcher: asyncio.Task | None = None
        self.set(self.static["decode"][0], self.static["prefill"][0])

    def set(self, decode: Sequence[str], prefill: Sequence[str]) -> None:
        """The workers to route to from now on (a new one counts as healthy)."""
        for role, now, targets in (
            ("decode", self.decode, decode),
            ("prefill", self.prefill, prefill),
        ):
            added, gone = set(targets) - set(now), set(now) - set(targets)
            for t in sorted(added):
                log.warning("%s worker %s joins", role, t)
                self.inflight.setdefault(t, 0)
                self.healthy[t] = True
            for t in sorted(gone):
                log.warning("%s worker %s leaves", role, t)
        self.decode, self.prefill = sorted(set(decode)), sorted(set(prefill))

    # aio channels belong to the event loop that first uses them: made on first use
    def channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = open_aio_channel(target)
            if self._watcher is None:
                self._watcher = asyncio.get_running_loop().create_task(self.watch())
        return self._channels[target]

    def cache(self) -> cache_pb2_grpc.CacheStub:
        if self._cache is None:
            self._cache = cache_pb2_grpc.CacheStub(self.channel(self.cache_service))
        return self._cache

    def decode_stub(self, target: str) -> worker_pb2_grpc.DecodeStub:
        return worker_pb2_grpc.DecodeStub(self.channel(target))

    def prefill_stub(self, target: str) -> worker_pb2_grpc.PrefillStub:
        return worker_pb2_grpc.PrefillStub(self.channel(target))

    def pick(
        self, targets: list[str], key: dict[str, float], avoid: frozenset[str], turn: int
    ) -> str:
        """The healthy target not in avoid (any, if none is) with the least (key, requests
        held); equals take turns."""
        targets = [t for t in targets if self.healthy.get(t) and t not in avoid] or targets
        score = {t: (key.get(t, 0.0), self.inflight.get(t, 0)) for t in targets}
        best = min(score.values())
        ties = [t for t in targets if score[t] == best]
        return ties[turn % len(ties)]

    async def watch(self) -> None:
        """Follow the registry and DNS names every FOLLOW seconds, and health-check every
        worker every PERIOD."""
        checked = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if (
                self.discovery == "registry"
                or self.static["decode"][1]
                or self.static["prefill"][1]
            ):
                await self.follow()
            if loop.time() - checked >= PERIOD:
                checked = loop.time()
                await asyncio.gather(*(self._check(t) for t in self.decode + self.prefill))
            await asyncio.sleep(FOLLOW)

    async def follow(self) -> None:
        """One look at the registry and the DNS names: the workers become the static ones,
        the ones the names resolve to and the live registered ones."""
        found: dict[str, list[str]] = {}
        for role, (static, names) in self.static.items():
            resolved = await asyncio.gather(*(resolve(n, p) for n, p in names))
            found[role] = static + [t for ts in resolved for t in ts]
        if self.discovery == "registry":
            try:
                reply = await self.cache().Workers(cache_pb2.WorkersRequest(), timeout=FOLLOW)
            except grpc.aio.AioRpcError:
                return  # the cache service is away: keep the workers as they are
            for w in reply.workers:
                found[w.role].append(w.address)
            if reply.settling:  # a restarted registry: keep whom it has not heard from yet
                gone = set(reply.gone)
                found["decode"] += [t for t in self.decode if t not in gone]
                found["prefill"] += [t for t in self.prefill if t not in gone]
        self.set(found["decode"], found["prefill"])

    async def _check(self, target: str) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel(target))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PERIOD)
            up = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            up = False
        if up != self.healthy.get(target, True):
            log.warning("worker %s is %s", target, "back" if up else "down")
        self.healthy[target] = up
