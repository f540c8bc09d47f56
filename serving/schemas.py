"""Request bodies and their rules: the public contract of `/v1/eta` and `/v2/.../infer`.

Parsing and validation happen here, once, at the ingress; what passes is safe for the
model deployments. Every failure becomes a 4xx naming the field and the rule.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.geo import CITY
from serving.errors import InvalidInput, MalformedRequest

# Open Inference Protocol datatypes Courier's models use, and their numpy types.
V2_DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


class EtaRequest(BaseModel):
    """`POST /v1/eta`: where the food goes, from which restaurant, and (optionally) when."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    restaurant_id: int = Field(gt=0, description="The restaurant the order is placed with.")
    delivery_lat: float = Field(ge=-90, le=90, description="Drop-off latitude, degrees.")
    delivery_lon: float = Field(ge=-180, le=180, description="Drop-off longitude, degrees.")
    order_time: datetime | None = Field(default=None, description="ISO 8601; default now; naive means UTC.")
    user_id: int | None = Field(default=None, gt=0, description="Who orders: keeps a canary user on the same "
                                "model version across requests; without it each request is drawn on its own.")

    def order_time_utc(self) -> datetime:
        """The order time as an aware UTC datetime (now when not given)."""
        return _utc(self.order_time)


def _utc(moment: datetime | None) -> datetime:
    """Aware UTC: now when missing, naive taken as UTC."""
    if moment is None:
        return datetime.now(timezone.utc)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


class FeedRequest(BaseModel):
    """`POST /v1/feed`: who is looking, from where, how many cards, and (optionally) when."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    user_id: int = Field(gt=0, description="The user; unknown users get a cold-start feed.")
    user_lat: float = Field(ge=-90, le=90, description="Where the user is (the drop-off), latitude.")
    user_lon: float = Field(ge=-180, le=180, description="Where the user is (the drop-off), longitude.")
    page_size: int = Field(default=20, ge=1, le=50, description="Cards on the page.")
    request_time: datetime | None = Field(default=None, description="ISO 8601; default now; naive means UTC. "
                                          "Opening hours and feature freshness (TTLs) are judged at this time.")
    include_timings: bool = Field(default=False, description="Add per-stage latency (ms) to the response.")

    def request_time_utc(self) -> datetime:
        """The request time as an aware UTC datetime (now when not given)."""
        return _utc(self.request_time)


class V2Tensor(BaseModel):
    """One input tensor of an Open Inference Protocol request."""

    model_config = ConfigDict(extra="allow", strict=True)  # `parameters` and future fields are tolerated

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class V2InferRequest(BaseModel):
    """`POST /v2/models/{name}/infer` body."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[dict[str, Any]] | None = None


def _first_error(exc: ValidationError) -> InvalidInput | MalformedRequest:
    """Turn pydantic's first error into one sentence naming the field and the rule."""
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return MalformedRequest(f"request body is not valid JSON: {err['msg']}", field="body",
                                rule="body must be a JSON object")
    field = ".".join(str(part) for part in err["loc"]) or "body"
    value = err.get("input")
    shown = "" if err["type"] == "missing" else f" (got {value!r})"
    rule = err["msg"][0].lower() + err["msg"][1:]
    if field == "body" and err["type"] == "model_type":
        rule = "body must be a JSON object"
    return InvalidInput(f"{field}: {rule}{shown}", field=field, rule=rule, value=value)


def parse_eta_request(body: bytes) -> EtaRequest:
    """Validate a `/v1/eta` body, including that the drop-off is inside the served city."""
    try:
        request = EtaRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    _check_in_city("delivery_lat", "delivery_lon", request.delivery_lat, request.delivery_lon)
    return request


def parse_feed_request(body: bytes) -> FeedRequest:
    """Validate a `/v1/feed` body, including that the user is inside the served city."""
    try:
        request = FeedRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    _check_in_city("user_lat", "user_lon", request.user_lat, request.user_lon)
    return request


def _check_in_city(lat_field: str, lon_field: str, lat: float, lon: float) -> None:
    distance = CITY.distance_from_center_km(lat, lon)
    if distance > CITY.radius_km:
        raise InvalidInput(
            f"{lat_field}/{lon_field}: ({lat}, {lon}) is {distance:.1f} km from the centre of {CITY.name}; "
            f"deliveries are served within {CITY.radius_km:.1f} km",
            field=f"{lat_field},{lon_field}", rule=f"must be within {CITY.radius_km} km of the city centre",
        )


def parse_v2_request(body: bytes, inputs_spec: list[dict[str, Any]]) -> tuple[str | None, dict[str, np.ndarray]]:
    """Validate an inference request against the model's input metadata; returns (id, tensors)."""
    try:
        request = V2InferRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    expected = {spec["name"]: spec for spec in inputs_spec}
    tensors: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}]"
        spec = expected.get(tensor.name)
        if spec is None:
            raise InvalidInput(f"{where}.name: unknown input {tensor.name!r}; the model takes {sorted(expected)}",
                               field=f"{where}.name", rule=f"must be one of {sorted(expected)}")
        if tensor.name in tensors:
            raise InvalidInput(f"{where}.name: input {tensor.name!r} is given twice", field=f"{where}.name",
                               rule="each input once")
        if tensor.datatype != spec["datatype"]:
            raise InvalidInput(f"{where}.datatype: {tensor.name!r} must be {spec['datatype']}, got {tensor.datatype!r}",
                               field=f"{where}.datatype", rule=f"must be {spec['datatype']}")
        tensors[tensor.name] = _tensor_array(where, tensor, spec)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise InvalidInput(f"inputs: missing {missing}; the model takes {sorted(expected)}", field="inputs",
                           rule=f"must contain {sorted(expected)}")
    batch = {array.shape[0] for array in tensors.values()}
    if len(batch) > 1:
        raise InvalidInput(f"inputs: batch sizes differ between inputs ({sorted(batch)})", field="inputs",
                           rule="all inputs share the first (batch) dimension")
    return request.id, tensors


def _tensor_array(where: str, tensor: V2Tensor, spec: dict[str, Any]) -> np.ndarray:
    """Check shape against the model's (-1 is the free batch dimension) and build the array."""
    model_shape = spec["shape"]
    shape_ok = len(tensor.shape) == len(model_shape) and all(
        want in (-1, got) and got >= 0 for want, got in zip(model_shape, tensor.shape))
    if not shape_ok:
        raise InvalidInput(f"{where}.shape: {tensor.name!r} has shape {tensor.shape}, the model takes {model_shape} "
                           f"(-1 = any batch size)", field=f"{where}.shape", rule=f"must match {model_shape}")
    data = _flatten(tensor.data)
    if len(data) != math.prod(tensor.shape):
        raise InvalidInput(f"{where}.data: {len(data)} values do not fill shape {tensor.shape}",
                           field=f"{where}.data", rule="number of values must equal the product of the shape")
    dtype = V2_DATATYPES[spec["datatype"]]
    is_int = np.issubdtype(dtype, np.integer)
    for value in data:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (is_int and not isinstance(value, int)):
            kind = "integers" if is_int else "numbers"
            raise InvalidInput(f"{where}.data: {tensor.name!r} takes {kind}, got {value!r}", field=f"{where}.data",
                               rule=f"values must be {kind}")
    array = np.asarray(data, dtype=dtype).reshape(tensor.shape)
    if not is_int and not np.isfinite(array).all():
        raise InvalidInput(f"{where}.data: {tensor.name!r} contains NaN or Infinity", field=f"{where}.data",
                           rule="values must be finite")
    low, high = spec.get("range", (None, None))
    if low is not None and (array.min(initial=low) < low or array.max(initial=high) > high):
        raise InvalidInput(f"{where}.data: {tensor.name!r} values must lie in [{low}, {high}]",
                           field=f"{where}.data", rule=f"values in [{low}, {high}]")
    return array


def _flatten(data: list[Any]) -> list[Any]:
    """The protocol allows flat or nested (row-major) data; flatten nested lists."""
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat
