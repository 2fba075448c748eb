"""Property-based requests from the served OpenAPI schema (schemathesis): no input gets a 5xx.

The server's limits are set tiny (2 images, 3 steps) so that the valid requests the generator finds
are cheap to run; the example count per operation is bounded to keep this well under a minute.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from diffuse.generate import load  # noqa: E402
from diffuse.serve.app import Limits, Served, create_app  # noqa: E402
from diffuse.serve.jobs import Worker  # noqa: E402


@pytest.fixture(scope="module")
def served_app(served_runs):
    loaded = {name: load(path, torch.device("cpu")) for name, path in served_runs.items()}
    limits = Limits(max_images=2, max_steps=3, queue=4)
    worker = Worker(torch.device("cpu"), loaded, max_queue=limits.queue, max_batch=limits.max_images).start()
    served = {name: Served(name, ld, worker) for name, ld in loaded.items()}
    # schemathesis' ASGI client sends Host: testserver, so that is this server's own name here
    yield create_app(served, limits, hosts={"testserver"})
    worker.stop()


@pytest.fixture(scope="module")
def api_schema(served_app):
    return schemathesis.openapi.from_asgi("/openapi.json", served_app)


def test_no_input_gets_a_server_error(api_schema):
    """Valid and invalid requests (schemathesis' positive and negative modes) for every operation.
    (schemathesis' own pytest plugin is not used: its lazy loader breaks on pytest 9.)"""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /api/generate", "POST /api/jobs", "GET /api/models",
                                               "GET /api/jobs/{job_id}", "DELETE /api/jobs/{job_id}"}
    seen: dict[str, set[int]] = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call()
                seen.setdefault(op.label, set()).add(response.status_code)
                case.validate_response(response, checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:
                # no invalid input exists where every parameter is a free string (a job id) or there are none
                assert mode == GenerationMode.NEGATIVE and not op.body, op.label
    # the generator reached both successful generations and validation errors
    assert 200 in seen["POST /api/generate"] and 422 in seen["POST /api/generate"], seen
