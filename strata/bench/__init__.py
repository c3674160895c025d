"""The benchmark client (`strata bench`), its workloads and reports."""

from __future__ import annotations

import os
import sys

from strata.config import huge_page_malloc, system_env


def run_like_an_engine_process() -> None:
    """Re-exec this benchmark with the malloc settings an engine process is given
    (`huge_page_malloc`), so its in-process figures and the served ones compare on equal
    terms. Called first in a benchmark's main()."""
    want = huge_page_malloc()
    if (system_env("GLIBC_TUNABLES") or "") != want:
        env = {**os.environ, "GLIBC_TUNABLES": want}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
