"""The benchmark client (`strata bench`), its workloads and reports."""

from __future__ import annotations

import os
import sys

from strata.config import engine_environment


def run_like_an_engine_process() -> None:
    """Re-exec this benchmark with the environment an engine process is given (malloc on
    huge pages, OpenMP's spin count: `engine_environment`), so its in-process figures and
    the served ones compare on equal terms. Called first in a benchmark's main()."""
    want = engine_environment()
    if any(os.environ.get(name) != value for name, value in want.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})
