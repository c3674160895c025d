"""The reliability suite (`make reliability`; not part of `make test`, which it would push past
CI's time): schemathesis against the REST API, hypothesis-generated protobufs against every
gRPC service, a long concurrent load with memory and page accounting, and the fault
scenarios of tests/e2e/test_supervision.py. Each test prints the figures the table in
docs/reliability.md quotes, as lines starting with `FIGURE`."""

from __future__ import annotations

import pytest


def figure(name: str, value: object) -> None:
    print(f"FIGURE {name}: {value}")


@pytest.fixture(autouse=True)
def _show_figures(capsys):
    yield
    out = capsys.readouterr().out
    with capsys.disabled():
        for line in out.splitlines():
            if line.startswith("FIGURE"):
                print(line)
