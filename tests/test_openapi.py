"""`GET /openapi.json`: generated from the validators' own models, served, and held to by the served app.

The schemathesis run sends a few hundred generated requests (valid and deliberately invalid) to every
documented operation of the served app and requires: no 5xx, only documented status codes and content
types, and every response body conforming to its documented schema.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from models.geo import CITY
from serving.openapi import openapi_document
from serving.schemas import EtaRequest, FeedRequest, V2InferRequest

MODELS = ("eta", "ranker", "user_tower")


def test_document_is_openapi_31_with_the_validators_schemas():
    """The request schemas are the validators' own (no second copy to drift), every operation documents its
    refusals, and schemathesis accepts the document."""
    document = openapi_document(feed=True, models=MODELS)
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    for model in (EtaRequest, FeedRequest):
        assert schemas[model.__name__]["properties"] == model.model_json_schema()["properties"]
    assert schemas["EtaRequest"]["properties"]["restaurant_id"]["maximum"] == 2**63 - 1
    assert schemas["EtaRequest"]["additionalProperties"] is False  # unknown fields are refused, and said so
    assert "inputs" in schemas[V2InferRequest.__name__]["properties"]
    for path, item in document["paths"].items():
        for method in ("get", "post"):
            if method in item:
                responses = item[method]["responses"]
                assert {"200", "500", "503"} <= set(responses), (path, method)
                if "requestBody" in item[method]:
                    assert {"400", "413", "422"} <= set(responses), path
    operations = list(schemathesis.openapi.from_dict(document).get_all_operations())
    assert len(operations) == 14


def test_feed_is_documented_only_where_it_is_served():
    """A deployment without the feed does not advertise /v1/feed; model_name lists the served models."""
    document = openapi_document(feed=False, models=("eta",))
    assert "/v1/feed" not in document["paths"]
    infer = document["paths"]["/v2/models/{model_name}/infer"]
    assert infer["parameters"][0]["schema"]["enum"] == ["eta"]


@pytest.fixture(scope="module")
def served_document(served) -> dict:
    response = httpx.get(f"{served.url}/openapi.json", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


@pytest.mark.integration
def test_served_document_describes_the_served_app(served_document):
    """The served app documents its own routes and models."""
    assert served_document == openapi_document(feed=True, models=MODELS)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# Up to 20 per operation and mode (valid, invalid): ~300 requests (hypothesis stops early on operations with few
# distinct requests, e.g. GET /v2), about half a minute on the test app.
EXAMPLES = 20


def fuzz(document: dict, base_url: str, examples: int = EXAMPLES) -> dict[tuple[str, int], int]:
    """Send `examples` generated requests per operation and mode to `base_url`, each checked by CHECKS;
    returns the count of responses per (operation, status). (schemathesis's pytest plugin is not used:
    its lazy fixture loader does not run on this pytest.)"""
    from schemathesis import GenerationMode

    statuses: Counter[tuple[str, int]] = Counter()
    for result in schemathesis.openapi.from_dict(document).get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases = operation.as_strategy(generation_mode=mode)
            if mode == GenerationMode.POSITIVE:  # half the valid bodies moved into the city, to reach the models
                cases = st.tuples(cases, st.booleans()).map(lambda drawn: _in_city(*drawn))
            send = _sender(cases, base_url, examples, f"{operation.method.upper()} {operation.path}", statuses)
            try:
                send()
            except Unsatisfiable:  # an operation without parameters or body has no invalid request to make
                assert mode == GenerationMode.NEGATIVE, operation.label
    return dict(statuses)


def _in_city(case, move: bool):
    """The case, with its drop-off (or user) at the city centre and its time left to the server when `move`:
    random coordinates and times are almost never inside the city and the time window, which JSON Schema
    cannot express, so without this no generated body would reach the feature store and the models."""
    if move and isinstance(case.body, dict):
        for lat, lon in (("delivery_lat", "delivery_lon"), ("user_lat", "user_lon")):
            if lat in case.body:
                case.body.update({lat: CITY.center_lat, lon: CITY.center_lon})
        for time in ("order_time", "request_time"):
            case.body.pop(time, None)
    return case


def _sender(cases: st.SearchStrategy, base_url: str, examples: int, label: str,
            statuses: Counter[tuple[str, int]]) -> Callable[[], None]:
    """A hypothesis test sending `examples` of `cases` to the app and counting the statuses under `label`."""

    @given(case=cases)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def send(case) -> None:
        response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)
        statuses[label, response.status_code] += 1

    return send


@pytest.mark.integration
def test_fuzzed_requests_get_no_5xx_and_documented_answers(served, served_document):
    """Generated requests, valid and invalid, to every operation: no 5xx, documented statuses, content types
    and bodies, and every invalid request refused; and the run reached the models and the parsers."""
    statuses = fuzz(served_document, served.url)
    assert not {key: n for key, n in statuses.items() if key[1] >= 500}, statuses
    assert sum(statuses.values()) >= 300, statuses
    # Reached the feature store (an unknown restaurant is a 404), the models and the parsers:
    for reached in [("POST /v1/eta", 404), ("POST /v1/eta", 422), ("POST /v1/feed", 200),
                    ("POST /v1/feed", 422),
                    ("POST /v2/models/{model_name}/infer", 422), ("GET /v2/models/{model_name}", 200)]:
        assert reached in statuses, (reached, statuses)
