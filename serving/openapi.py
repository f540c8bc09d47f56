"""`GET /openapi.json`: the OpenAPI 3.1 document of Courier's HTTP API, generated from the pydantic models.

The request models are the ones the ingress validates with (serving/schemas.py), so the document
cannot drift from what is enforced; the response models below describe what the routes answer, and
tests/test_openapi.py holds the served app to them (schemathesis). Rules JSON Schema cannot say (the
drop-off inside the city, times near the server's clock) are in the field descriptions and docs/api.md.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from serving.schemas import EtaRequest, FeedRequest, V2InferRequest

VERSION = "0.1.0"
REF = "#/components/schemas/{model}"


class Error(BaseModel):
    """A refused request (4xx, 503): what is wrong and, for input errors, the field and the rule."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="What went wrong and what to do, in one sentence.")
    field: str | None = Field(default=None, description="The offending field (e.g. `order_time`, `inputs[0].data`).")
    rule: str | None = Field(default=None, description="The rule it breaks (e.g. `must be within ...`).")


class InternalError(BaseModel):
    """A server fault: no details, only the id to quote (the server's log has the traceback under it)."""

    error: str = Field(description='Always "internal error".')
    request_id: str = Field(description="Search the server's log for this id.")


class EtaResponse(BaseModel):
    """`POST /v1/eta`: the estimate, which model gave it, and how fresh its features were."""

    model_config = ConfigDict(extra="allow")

    request_id: str = Field(description="The caller's X-Request-Id, else the one the server gave.")
    eta_minutes: float = Field(description="Estimated minutes from order to delivery.")
    model_version: str
    variant: str = Field(description="champion, or challenger for a canary share.")
    feature_service: str
    feature_age_seconds: dict[str, float | None] = Field(description="Age of each feature view's row (null: no row).")
    expired_features: list[str] = Field(description="Views past their TTL, replaced by defaults.")
    degraded: bool = Field(description="True when the online store was unavailable and fallbacks were used.")
    fallback: str | None = Field(description="Why and how the answer was degraded; null when it was not.")


class Card(BaseModel):
    """One restaurant on a feed page."""

    model_config = ConfigDict(extra="allow")

    restaurant_id: int
    score: float
    p_order: float = Field(description="The ranker's probability that the user orders here.")
    eta_minutes: float | None = Field(description="ETA to the user; null for a restaurant the ETA model lacks.")
    sponsored: bool


class FeedResponse(BaseModel):
    """`POST /v1/feed`: a page of restaurant cards, ranked and blended with sponsored ones."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    user_id: int
    cold_start: bool = Field(description="True for a user the retrieval model does not know.")
    cards: list[Card]
    candidates: dict[str, int] = Field(description="`eligible` (open, in range) and `retrieved` counts.")
    model_versions: dict[str, str]
    variants: dict[str, str]
    sponsored_policy: dict[str, Any]
    degraded: bool
    fallbacks: list[str] | None = Field(default=None, description="Present when degraded: what fell back.")
    timings_ms: dict[str, float] | None = Field(default=None, description="Per-stage latency with include_timings.")


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    """`GET /v2`: the Open Inference Protocol server metadata."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    datatype: str = Field(description="FP32, FP64, INT32 or INT64.")
    shape: list[int] = Field(description="-1 marks a dimension of any size (the batch).")


class ModelMetadata(BaseModel):
    """`GET /v2/models/{model_name}`: the model's served versions, inputs and outputs."""

    model_config = ConfigDict(extra="allow")

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OutputTensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    datatype: str
    shape: list[int]
    data: list[float | int] | None = Field(default=None, description="Row-major values (absent when sent binary).")


class InferResponse(BaseModel):
    """`POST /v2/models/{model_name}/infer` (JSON): the outputs, and which version computed them."""

    model_config = ConfigDict(extra="allow")

    model_name: str
    model_version: str
    id: str | None = Field(default=None, description="The request's `id`, echoed.")
    outputs: list[OutputTensor]


class RepositoryEntry(BaseModel):
    """One model version of `POST /v2/repository/index`."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str | None = None
    state: str = Field(description="READY, or UNAVAILABLE with a reason.")
    reason: str | None = None


class Index(BaseModel):
    """`GET /`: the routes this deployment serves."""

    service: str
    endpoints: list[str]


class Document(BaseModel):
    """An OpenAPI document."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    paths: dict[str, Any]


_MODELS: list[tuple[type[BaseModel], str]] = [
    (EtaRequest, "validation"), (FeedRequest, "validation"), (V2InferRequest, "validation"),
    *((model, "serialization") for model in (Error, InternalError, EtaResponse, Card, FeedResponse, Live, Ready,
                                             ModelReady, ServerMetadata, TensorMetadata, ModelMetadata,
                                             OutputTensor, InferResponse, RepositoryEntry, Index, Document)),
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ref(model)}}}
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}
# What any route may answer besides its success: a refusal names the field and the rule, a fault only an id.
COMMON = {
    "401": _json(Error, "No or unknown API key (when auth is on): send `Authorization: Bearer <key>`."),
    "403": _json(Error, "The key lacks the route's scope (`public` for /v1, `internal` for /v2/models)."),
    "429": _json(Error, "Over this client's rate limit: wait Retry-After seconds.", RETRY_AFTER),
    "500": _json(InternalError, "A server fault: quote the request_id."),
    "503": _json(Error, "Overloaded, restarting or not ready: retry after Retry-After seconds, with backoff.",
                 RETRY_AFTER),
}
BODY = {
    "400": _json(Error, "The body is not JSON."),
    "413": _json(Error, "The body is larger than the server's limit (64 KiB by default)."),
    "422": _json(Error, "The body breaks a rule: `field` and `rule` say which and why."),
}
REQUEST_ID = {"name": "X-Request-Id", "in": "header", "required": False,
              "description": "Your id for this request (1-128 of A-Z a-z 0-9 . _ -); echoed, and logged.",
              "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}}


def _get(summary: str, model: type[BaseModel], description: str, tags: list[str],
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "tags": tags, "responses": {"200": _json(model, description), **COMMON,
                                                                    **(extra or {})}}}


def _post(summary: str, request: type[BaseModel], response: type[BaseModel], tags: list[str],
          extra: dict[str, Any] | None = None, parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"post": {"summary": summary, "tags": tags, "parameters": parameters or [REQUEST_ID],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
                     "responses": {"200": _json(response, "The answer."), **BODY, **COMMON, **(extra or {})}}}


def openapi_document(feed: bool = True, models: tuple[str, ...] = ("eta",)) -> dict[str, Any]:
    """The document for a deployment: /v1/feed only where the feed is served, `model_name` limited to `models`."""
    return _document(feed, tuple(sorted(models)))


@lru_cache(maxsize=8)
def _document(feed: bool, models: tuple[str, ...]) -> dict[str, Any]:
    _, schemas = models_json_schema(_MODELS, ref_template=REF)
    model_name = {"name": "model_name", "in": "path", "required": True, "description": "A served model.",
                  "schema": {"type": "string", "enum": list(models)}}
    not_found = {"404": _json(Error, "No such model, or (for /v1/eta) no such restaurant.")}
    paths: dict[str, Any] = {
        "/v1/eta": _post("Estimate a delivery's minutes", EtaRequest, EtaResponse, ["product"], not_found),
        "/v2/health/live": _get("Liveness", Live, "The process answers.", ["probes"]),
        "/v2/health/ready": _get("Readiness", Ready, "Every model can answer.", ["probes"],
                                 {"503": _json(Ready, "Not ready (ready=false): a model cannot answer yet.")}),
        "/v2": _get("Server metadata", ServerMetadata, "Name, version and protocol extensions.", ["inference"]),
        "/v2/models/{model_name}": {**_get("Model metadata", ModelMetadata, "Versions, inputs, outputs.",
                                           ["inference"], not_found), "parameters": [model_name]},
        "/v2/models/{model_name}/ready": {**_get("Model readiness", ModelReady, "The model can answer.",
                                                 ["inference"], {**not_found, "503": _json(
                                                     ModelReady, "Not ready (ready=false).")}),
                                          "parameters": [model_name]},
        "/v2/models/{model_name}/infer": {
            **_post("Raw inference (Open Inference Protocol, JSON tensors)", V2InferRequest, InferResponse,
                    ["inference"], not_found, [REQUEST_ID]),
            "parameters": [model_name]},
        "/v2/repository/index": {"post": {
            "summary": "Every model and served version with its state (read-only: the serve config loads models)",
            "tags": ["inference"],
            "responses": {"200": {"description": "The index.", "content": {"application/json": {"schema": {
                "type": "array", "items": _ref(RepositoryEntry)}}}}, **COMMON}}},
        "/": _get("The routes of this deployment", Index, "Route list.", ["probes"]),
        "/openapi.json": _get("This document", Document, "OpenAPI 3.1.", ["probes"]),
    }
    # The same model routes for one served version (no canary draw): a version not served is a 404.
    model_version = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"},
                     "description": "A served version (GET /v2/models/{model_name} lists them)."}
    for route in ("", "/ready", "/infer"):
        item = dict(paths[f"/v2/models/{{model_name}}{route}"])
        item["parameters"] = [model_name, model_version]
        paths[f"/v2/models/{{model_name}}/versions/{{model_version}}{route}"] = item
    if feed:
        paths["/v1/feed"] = _post("A page of restaurants for a user", FeedRequest, FeedResponse, ["product"])
    return {
        "openapi": "3.1.0",
        "info": {"title": "Courier", "version": VERSION,
                 "description": "Delivery ETAs, a ranked restaurant feed, and raw inference over the Open Inference "
                                "Protocol. Every refusal is JSON naming the field and the rule; see docs/api.md."},
        "paths": paths,
        "components": {"schemas": schemas["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "An API key, when auth is on (the chart)."}}},
    }
