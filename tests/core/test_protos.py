"""The checked-in generated code is what scripts/gen_protos.py makes of protos/ today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_generator_is_the_pinned_one():
    """The checked-in code is what constraints.txt's grpcio-tools makes (an unpinned one
    writes other version checks into *_pb2_grpc.py)."""
    from importlib.metadata import version

    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert version("grpcio-tools") == pins["grpcio-tools"], "run make (it installs the pins)"


def test_generated_proto_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in gen.generate(tmp_path)}
    checked_in = {
        p.relative_to(ROOT / "strata" / "proto"): p.read_text()
        for p in (ROOT / "strata" / "proto").rglob("*.py*")
        if "__pycache__" not in p.parts
    }
    stale = sorted(
        str(k) for k in fresh.keys() | checked_in.keys() if fresh.get(k) != checked_in.get(k)
    )
    assert not stale, f"run `python scripts/gen_protos.py`; stale: {stale}"
