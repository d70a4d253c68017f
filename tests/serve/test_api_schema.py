"""Schemathesis fuzzes `zhtune serve` from the app's own OpenAPI schema, against a real uvicorn server
and the real engine: whatever it sends, the answer is never a 5xx and always a declared status and
content type. Bounded (a few dozen examples per operation, a 24-token context) to run in ~1 minute."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

from zhtune.serve.api import create_app  # noqa: E402

# the coverage phase walks every boundary (n=64 prompts x choices, ...) and takes minutes on 2 cores;
# the fuzzing phase below still draws boundary values, just not all combinations
CONFIG = """
[generation]
mode = "all"

[phases.coverage]
enabled = false
"""


@pytest.fixture(scope="module")
def fuzz_url(api_engine, serve_app):
    # a 24-token context keeps every generation the fuzzer asks for short
    app = create_app(api_engine, served_model_name="tiny", max_model_len=24, max_concurrency=16, max_queue=4096,
                     max_body_bytes=64 * 1024)
    with serve_app(app) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_url):
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", config=SchemathesisConfig.from_str(CONFIG))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance],
                           timeout=120)
