"""Property-based fuzzing of the router HTTP API from its own OpenAPI schema (schemathesis).

The app is driven in-process through its ASGI interface. For a bounded number of generated
requests per operation (valid ones and schema-violating ones), every answer must be a
non-5xx, documented status code, with a JSON body that matches the declared schema
(decisions for 200, ``{"error": str}`` for 4xx). A second, schema-free hypothesis test
throws arbitrary JSON values and raw bytes at ``/route``.
"""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deepinsert.router.service import create_app  # noqa: E402

LAYERS = (0, 4, 8)
MAX_BATCH = 4


@pytest.fixture(scope="module")
def app(make_tiny_bundle):
    bundle = make_tiny_bundle(algorithm="ppo", dim=8, layers=LAYERS, lam=0.3, seed=3, emb_seed=1, steps=64,
                              n_validation=30)[0]
    # docs=True only so schemathesis can fetch /openapi.json; the routes are the production ones
    return create_app(bundle, max_batch=MAX_BATCH, max_body_bytes=8192, max_prompt_chars=2000, docs=True)


def _schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz_no_5xx_and_schema_conformant(app, mode):
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = _schema(app)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    ran = []
    for op in schema.get_all_operations():
        operation = op.ok()
        has_body = operation.path == "/route"
        if mode == "negative" and not has_body:
            continue  # GET /health and /info take no input: nothing to violate
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

        @settings(max_examples=40 if has_body else 5, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            response = case.call_and_validate(checks=checks)
            ran.append(response.status_code)
            if response.status_code == 200 and operation.path == "/route":
                body = response.json()
                for d in body.get("results", [body]):
                    assert d["layer"] == LAYERS[d["index"]] and abs(sum(d["probs"]) - 1) < 1e-4

        run()
    assert len(ran) >= 30
    assert all(s < 500 for s in ran)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(["prompt", "prompts", "x"]),
                                                                     children, max_size=3),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(body=JSON | st.binary(max_size=200).map(lambda b: ("raw", b)))
def test_route_answers_any_body_with_json_and_no_5xx(app_client, body):
    if isinstance(body, tuple):
        r = app_client.post("/route", content=body[1], headers={"content-type": "application/json"})
    else:
        r = app_client.post("/route", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    payload = r.json()
    if r.status_code == 200:
        results = payload.get("results", [payload])
        assert all(d["layer"] in LAYERS for d in results)
    else:
        assert 400 <= r.status_code < 500 and isinstance(payload["error"], str)


@pytest.fixture(scope="module")
def app_client(app):
    from fastapi.testclient import TestClient

    return TestClient(app)
