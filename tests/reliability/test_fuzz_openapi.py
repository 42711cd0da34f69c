"""Property-based fuzzing of every operation in the API's own OpenAPI document (schemathesis 4).

Requests go to the app in-process (ASGI transport) with the real Redis test database behind it.
Each operation gets schema-conforming cases (positive) and, where it takes a body, schema-breaking
ones (negative); POST /v1/jobs also gets positive cases pointed at a real generator and embedding
set, so generated specs reach the queue and not only the validator. Every answer must be documented
(status_code_conformance) and none may be a server error (not_a_server_error). Generation is
derandomized, so a failure reproduces run after run.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import status_code_conformance

from oal_synth.api.app import create_app
from oal_synth.store import EmbeddingSetStore
from tests.utils.live_server import embedding_set_bytes, write_described_generator

pytestmark = pytest.mark.redis

SPACE = "test/space-v1"
DIM = 8
#: Requests the whole fuzz run must make at least (over all operations and modes).
MIN_REQUESTS = 1000
#: Examples per (operation, mode); bodies get more, they are where the parsing is.
EXAMPLES_BODY = 150
EXAMPLES_PATH = 75
CHECKS = [not_a_server_error, status_code_conformance]


@dataclass
class FuzzLog:
    requests: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    failures: dict[tuple[str, int], str] = field(default_factory=dict)  # one example per stream and status

    def record(self, stream: str, case, response) -> None:
        self.requests[stream] += 1
        self.statuses.setdefault(stream, Counter())[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as failure:  # one entry per failed check
            self.failures.setdefault((stream, response.status_code), f"{stream}: {failure}")

    @property
    def total(self) -> int:
        return sum(self.requests.values())


def fuzz(strategy, examples: int, stream: str, log: FuzzLog) -> None:
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not raised
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case) -> None:
        log.record(stream, case, case.call())

    try:
        run()
    except Unsatisfiable:  # e.g. negative cases of an operation whose only input is a free-form string
        pass


def with_real_inputs(set_id: str):
    """Point a generated job spec at the real generator and set, so it can pass check_submission and enqueue."""

    def patch(case):
        if isinstance(case.body, dict):
            case.body["generator"] = "test-gen"
            if isinstance(case.body.get("embeddings"), dict) and "set_id" in case.body["embeddings"]:
                case.body["embeddings"] = {"set_id": set_id}
        return case

    return patch


@pytest.fixture
def app(oal_env, redis_conn):
    write_described_generator(oal_env.generator_root, "test-gen", "embedded", SPACE, DIM)
    write_described_generator(oal_env.generator_root, "test-sd", "stable-diffusion", "sd-token:test", DIM)
    return create_app(oal_env)


def test_fuzz_every_operation_without_server_errors(app, oal_env):
    set_id = EmbeddingSetStore.from_settings(oal_env).put_bytes(embedding_set_bytes(SPACE, DIM))["id"]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    log = FuzzLog()

    for result in schema.get_all_operations():
        operation = result.ok()
        has_body = bool(operation.body)
        examples = EXAMPLES_BODY if has_body else EXAMPLES_PATH
        fuzz(operation.as_strategy(GenerationMode.POSITIVE), examples, f"{operation.label} positive", log)
        if has_body:
            fuzz(operation.as_strategy(GenerationMode.NEGATIVE), examples, f"{operation.label} negative", log)
        if operation.label == "POST /v1/jobs":
            deep = operation.as_strategy(GenerationMode.POSITIVE).map(with_real_inputs(set_id))
            fuzz(deep, EXAMPLES_BODY, f"{operation.label} positive, real generator and set", log)

    summary = {stream: dict(sorted(log.statuses[stream].items())) for stream in log.requests}
    print(f"fuzzed {log.total} requests:\n{json.dumps(summary, indent=1)}")
    assert not log.failures, "\n\n".join(log.failures.values())
    assert log.total >= MIN_REQUESTS, summary
    assert 202 in log.statuses["POST /v1/jobs positive, real generator and set"], "no generated spec was accepted"
    assert len(log.requests) >= 10  # every operation was reached
