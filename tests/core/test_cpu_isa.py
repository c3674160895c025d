"""The CPU kernels' ISA levels: chosen from what the CPU reports, forced lower with
STRATA_CPU_ISA (never higher), every level built from the same sources, one cached build per
level and compiler."""

from __future__ import annotations

import ctypes

import pytest
import torch

from strata.config import CPU_ISAS, cpu_isa, detected_cpu_isa
from strata.kernels.cpu import build as cpu_build


def test_the_detected_level_is_the_default_and_only_lower_ones_can_be_forced(monkeypatch):
    best = detected_cpu_isa()
    monkeypatch.delenv("STRATA_CPU_ISA", raising=False)
    assert cpu_isa() == best
    for level in CPU_ISAS[: CPU_ISAS.index(best) + 1]:
        monkeypatch.setenv("STRATA_CPU_ISA", level)
        assert cpu_isa() == level
    for level in CPU_ISAS[CPU_ISAS.index(best) + 1 :]:  # it would die of SIGILL: refused
        monkeypatch.setenv("STRATA_CPU_ISA", level)
        with pytest.raises(ValueError, match=f"runs at most {best}"):
            cpu_isa()
    monkeypatch.setenv("STRATA_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="choose one of none, avx2, avx512, amx"):
        cpu_isa()


def test_every_level_builds_here_into_its_own_cached_library():
    """The AVX-512 and AMX code compiles on any machine (it runs only where the CPU has
    them); each level is its own file, named by level, found again in the cache."""
    paths = {isa: cpu_build.build(isa=isa) for isa in cpu_build.levels()}
    assert len(set(paths.values())) == len(paths)
    for isa, path in paths.items():
        assert f"-{isa}-" in path.name and path.exists()
        assert cpu_build.build(isa=isa) == path


def test_each_runnable_level_loads_with_its_kernels(cpu_isa_level):
    lib = cpu_build.library()
    assert lib is not None and f"-{cpu_isa_level}-" in lib._name
    x = torch.zeros(1, 32)
    w = torch.zeros(16, 32, dtype=torch.bfloat16)
    y = torch.empty(1, 16)
    rc = lib.linear_avx2(0, x.data_ptr(), w.data_ptr(), 0, None, y.data_ptr(), 1, 16, 32)
    assert rc == (-1 if cpu_isa_level == "none" else 0)  # AVX2 code only from the AVX2 level
    assert isinstance(lib, ctypes.CDLL)
