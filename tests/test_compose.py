"""docker-compose.yml: valid for docker-compose, every command one the CLI accepts, every
address it names served by another service of the file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from launch.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


NO_COMPOSE = "docker-compose not installed (make installs it where apt exists)"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason=NO_COMPOSE)
def test_docker_compose_validates_the_file():
    run = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_every_command_is_accepted_by_the_cli(services):
    parser = build_parser()
    assert {"cache", "prefill", "decode", "gateway"} <= set(services)
    for name, svc in services.items():
        cmd = svc["command"]
        assert cmd[0] == "strata", name
        args = parser.parse_args(cmd[1:])  # argparse exits (SystemExit) on a bad flag
        assert args.command == name


def test_every_address_is_served_by_another_service(services):
    parser = build_parser()
    serves = {}
    for name, svc in services.items():
        args = parser.parse_args(svc["command"][1:])
        serves[name] = {args.port} | (
            {args.grpc_port} if getattr(args, "grpc_port", 0) > 0 else set()
        )
        assert args.host == "0.0.0.0", f"{name} must listen beyond its container"
    for name, svc in services.items():
        args = parser.parse_args(svc["command"][1:])
        named = [getattr(args, "cache", None)]
        if name == "gateway":
            named += args.decode.split(",") + args.prefill.split(",")
        for addr in filter(None, named):
            host, port = addr.rsplit(":", 1)
            assert host in services and host != name, f"{name}: {addr} names no other service"
            assert int(port) in serves[host], f"{name}: {host} does not serve port {port}"
            assert host in svc.get("depends_on", []), f"{name} must start after {host}"
        if name in ("prefill", "decode"):
            assert args.worker_id == f"{name}:{args.port}"  # the key the gateway routes by
    published = {int(p.split(":")[1]) for p in services["gateway"]["ports"]}
    assert published <= serves["gateway"]


def test_cache_and_workers_share_one_l3_volume(services):
    parser = build_parser()
    dirs = set()
    for name in ("cache", "prefill", "decode"):
        args = parser.parse_args(services[name]["command"][1:])
        dirs.add(args.hicache_storage_dir)
        mounts = {m.split(":")[1]: m.split(":")[0] for m in services[name].get("volumes", [])}
        assert mounts.get(args.hicache_storage_dir) == "kv-store", name
        if name != "cache":
            assert args.enable_hierarchical_cache and args.hicache_storage_backend == "file"
    assert len(dirs) == 1
    assert "kv-store" in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["volumes"]
