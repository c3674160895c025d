"""Imports go one way: launch (the wiring) -> gateway -> services -> strata (the core), and
inside strata engine -> model -> attention -> kernels and cache -> kv: the import-linter
contracts in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("strata", "gateway", "services", "launch")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(lint), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_layers_hold():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


def lint_with(tmp_path: Path, module: str, text: str) -> subprocess.CompletedProcess[str]:
    """lint-imports over a copy of the packages with one module added (a path under them)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.c")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / module).write_text(text)
    return lint_imports(tmp_path)


def test_a_core_module_that_imports_the_wiring_breaks_the_contract(tmp_path):
    run = lint_with(tmp_path, "strata/engine/wired.py", "from gateway import app\n")
    assert run.returncode != 0
    assert "strata.engine.wired -> gateway.app" in run.stdout


def test_a_kernel_that_imports_the_model_breaks_the_inner_layers(tmp_path):
    run = lint_with(tmp_path, "strata/kernels/upward.py", "from strata.model import decoder\n")
    assert run.returncode != 0
    assert "strata.kernels.upward -> strata.model.decoder" in run.stdout


# What the fronts run at start: `strata up`, the cache service, the gateway and `strata
# serve`'s front read the checkpoint's config and tokenizer, never the model.
FRONTS = """
import sys
import gateway.app, gateway.remote, launch.cli, launch.serve, launch.up, services.cache.server
from strata.engine.messages import EngineStats  # what a front unpickles from its engine
from strata.model.loader import load_tokenizer, read_config, resolve_checkpoint
from strata.model.registry import model_spec
folder = resolve_checkpoint(None)
model_spec(read_config(folder)), load_tokenizer(folder)
print(",".join(m for m in ("torch", "xgrammar", "transformers.models.auto") if m in sys.modules))
"""


def test_the_fronts_import_neither_torch_nor_transformers_auto_classes():
    """Each would cost every front process 2-3.4 s of its start (2-core EPYC), on the cores
    its workers load their models on."""
    run = subprocess.run(
        [sys.executable, "-c", FRONTS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""
