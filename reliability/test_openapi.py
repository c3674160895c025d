"""schemathesis against a real `strata serve`: cases generated from its OpenAPI document for
every operation; none may answer 5xx (or fail to answer). Generation is bounded by the
server's --request-timeout, so a valid request for a million tokens costs a few seconds."""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from launch.local import running_server
from reliability.conftest import figure

EXAMPLES = 120  # per operation and mode (valid and invalid bodies): >= 1000 cases in all


def test_no_operation_answers_5xx():
    flags = ("--request-timeout", "3", "--max-queued-requests", "8", "--context-length", "1024")
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    with running_server(*flags) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]

        def call(case) -> None:
            response = case.call(base_url=url, timeout=60)
            statuses[(f"{case.method.upper()} {case.path}", response.status_code)] += 1
            if response.status_code >= 500:
                failures.append(f"{response.status_code} {case.as_curl_command()}")

        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                cases = op.as_strategy(generation_mode=mode)
                run = settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    derandomize=True,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )(given(case=cases)(call))
                try:
                    run()
                except Unsatisfiable:  # no invalid input exists (a GET with no parameters)
                    assert mode is GenerationMode.NEGATIVE
    for label in sorted({label for label, _ in statuses}):
        kinds: Counter[str] = Counter()
        for (op_label, code), n in statuses.items():
            if op_label == label:
                kinds[f"{code // 100}xx"] += n
        figure(f"openapi {label}", f"{sum(kinds.values())} cases {dict(sorted(kinds.items()))}")
    total = sum(statuses.values())
    figure("openapi operations", len(operations))
    figure("openapi cases", total)
    figure("openapi 5xx", len(failures))
    assert total >= 1000
    assert not failures, "\n".join(failures[:20])
