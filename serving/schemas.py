"""Request bodies and their rules: the public contract of `/v1/eta` and `/v2/.../infer`.

Parsing and validation happen here, once, at the ingress; what passes is safe for the
model deployments. Every failure becomes a 4xx naming the field and the rule.

The ranges (docs/api.md): ids 1..2**63-1 (int64, what the feature store and numpy hold); times
within TIME_WINDOW of the server's clock (naive = UTC, offsets applied without overflow);
coordinates inside the served city; /v2 tensor values within their datatype (INT32/INT64 bounds,
FP32/FP64 finite and within the type's largest magnitude) and the model's own value ranges.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.geo import CITY
from serving.errors import InvalidInput, MalformedRequest

# Open Inference Protocol datatypes Courier's models use, and their numpy types.
V2_DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}
ID_MAX = 2**63 - 1  # ids are int64 in the feature store, the prediction log and the models' inputs
# Times a request may carry, relative to the server's clock: replaying a few years of logged orders (an
# evaluation, the test city of 2026) is legitimate; year 1 or 9999 is a mistake (and once overflowed).
TIME_WINDOW = (timedelta(days=5 * 366), timedelta(days=1))  # (back, ahead)


def _time_rule() -> str:
    back, ahead = TIME_WINDOW
    return f"must be within {back.days} days before and {ahead.days} day(s) after the server's clock (UTC)"


def _id(description: str, default: Any = ...) -> Any:
    """An id field: a positive int64."""
    return Field(default=default, ge=1, le=ID_MAX, description=f"{description} An integer in 1..2**63-1.")


def _time(description: str) -> Any:
    """A time field: ISO 8601, optional, inside TIME_WINDOW."""
    back, ahead = TIME_WINDOW
    return Field(default=None, description=f"{description} ISO 8601; default now; naive means UTC; within "
                 f"{back.days} days before and {ahead.days} day(s) after the server's clock.")


class EtaRequest(BaseModel):
    """`POST /v1/eta`: where the food goes, from which restaurant, and (optionally) when."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    restaurant_id: int = _id("The restaurant the order is placed with.")
    delivery_lat: float = Field(ge=-90, le=90, description="Drop-off latitude, degrees; inside the served city.")
    delivery_lon: float = Field(ge=-180, le=180, description="Drop-off longitude, degrees; inside the served city.")
    order_time: datetime | None = _time("When the order is placed.")
    user_id: int | None = _id("Who orders: keeps a canary user on the same model version across requests; "
                              "without it each request is drawn on its own.", default=None)

    def order_time_utc(self) -> datetime:
        """The order time as an aware UTC datetime (now when not given)."""
        return _utc(self.order_time)


def _utc(moment: datetime | None) -> datetime:
    """Aware UTC: now when missing, naive taken as UTC (the parsers have checked the window, so no overflow)."""
    if moment is None:
        return datetime.now(UTC)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _check_time(field: str, moment: datetime | None, now: datetime | None = None) -> None:
    """Refuse a time outside TIME_WINDOW around `now` (aware UTC; default the clock) without ever overflowing.

    The wall-clock time is compared first, with a day's slack for the offset (|offset| < 24 h): only a
    time near the window gets its offset applied, so year 1 or 9999 with an offset is a 422, not an error."""
    if moment is None:
        return
    back, ahead = TIME_WINDOW
    now = (now or datetime.now(UTC)).replace(tzinfo=None)
    earliest, latest = now - back, now + ahead
    wall = moment.replace(tzinfo=None)
    slack = timedelta(days=1)
    inside = earliest - slack <= wall <= latest + slack
    if inside and moment.tzinfo is not None:
        offset = moment.utcoffset() or timedelta(0)
        inside = earliest <= wall - offset <= latest
    elif inside:
        inside = earliest <= wall <= latest
    if not inside:
        rule = _time_rule()
        raise InvalidInput(f"{field}: {rule}, i.e. {earliest:%Y-%m-%dT%H:%M:%SZ}..{latest:%Y-%m-%dT%H:%M:%SZ} now "
                           f"(got {moment.isoformat()})", field=field, rule=rule, value=moment.isoformat())


class FeedRequest(BaseModel):
    """`POST /v1/feed`: who is looking, from where, how many cards, and (optionally) when."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    user_id: int = _id("The user; unknown users get a cold-start feed.")
    user_lat: float = Field(ge=-90, le=90, description="Where the user is (the drop-off), latitude.")
    user_lon: float = Field(ge=-180, le=180, description="Where the user is (the drop-off), longitude.")
    page_size: int = Field(default=20, ge=1, le=50, description="Cards on the page.")
    request_time: datetime | None = _time("When the feed is asked for: opening hours and feature freshness "
                                          "(TTLs) are judged at this time.")
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
    shown = "" if err["type"] == "missing" else f" (got {_shorten(repr(value))})"
    rule = err["msg"][0].lower() + err["msg"][1:]
    if field == "body" and err["type"] == "model_type":
        rule = "body must be a JSON object"
    return InvalidInput(f"{field}: {rule}{shown}", field=field, rule=rule, value=value)


def _shorten(text: str, limit: int = 80) -> str:
    """An echoed value cut to `limit` characters: the error names the value, it does not return the body."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_eta_request(body: bytes) -> EtaRequest:
    """Validate a `/v1/eta` body, including that the drop-off is inside the served city."""
    try:
        request = EtaRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    _check_in_city("delivery_lat", "delivery_lon", request.delivery_lat, request.delivery_lon)
    _check_time("order_time", request.order_time)
    return request


def parse_feed_request(body: bytes) -> FeedRequest:
    """Validate a `/v1/feed` body, including that the user is inside the served city."""
    try:
        request = FeedRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    _check_in_city("user_lat", "user_lon", request.user_lat, request.user_lon)
    _check_time("request_time", request.request_time)
    return request


def _check_in_city(lat_field: str, lon_field: str, lat: float, lon: float) -> None:
    distance = CITY.distance_from_center_km(lat, lon)
    if distance > CITY.radius_km:
        raise InvalidInput(
            f"{lat_field}/{lon_field}: ({lat}, {lon}) is {distance:.1f} km from the centre of {CITY.name}; "
            f"deliveries are served within {CITY.radius_km:.1f} km",
            field=f"{lat_field},{lon_field}", rule=f"must be within {CITY.radius_km} km of the city centre",
        )


def parse_v2_request(body: bytes | dict[str, Any],
                     inputs_spec: list[dict[str, Any]]) -> tuple[str | None, dict[str, np.ndarray]]:
    """Validate an inference request against the model's input metadata; returns (id, tensors).

    `body` is the JSON bytes, or the object serving/oip.py decoded from a binary-tensor body (its
    binary inputs' values filled in as `data`), so both encodings meet the same rules."""
    try:
        if isinstance(body, dict):
            request = V2InferRequest.model_validate(body)
        else:
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
    """Check shape against the model's (-1 is the free batch dimension), every value against the datatype's
    range and the model's value range, and build the array. serving/oip.py calls it for binary tensors too."""
    model_shape = spec["shape"]
    shape_ok = len(tensor.shape) == len(model_shape) and all(
        want in (-1, got) and got >= 1 for want, got in zip(model_shape, tensor.shape))
    if not shape_ok:
        raise InvalidInput(f"{where}.shape: {tensor.name!r} has shape {_shorten(str(tensor.shape))}, the model takes "
                           f"{model_shape} (-1 = any size of at least 1)", field=f"{where}.shape",
                           rule=f"must match {model_shape}, every dimension at least 1")
    data = _flatten(tensor.data)
    if len(data) != math.prod(tensor.shape):
        raise InvalidInput(f"{where}.data: {len(data)} values do not fill shape {tensor.shape}",
                           field=f"{where}.data", rule="number of values must equal the product of the shape")
    datatype = spec["datatype"]
    dtype = V2_DATATYPES.get(datatype)
    if dtype is None:  # a model input of a type the JSON codec does not carry (e.g. BYTES)
        raise InvalidInput(f"{where}.datatype: {datatype} inputs are not supported; Courier takes "
                           f"{sorted(V2_DATATYPES)}", field=f"{where}.datatype", rule=f"one of {sorted(V2_DATATYPES)}")
    _check_values(where, tensor.name, datatype, dtype, data)
    array = np.asarray(data, dtype=dtype).reshape(tensor.shape)
    low, high = spec.get("range", (None, None))
    if low is not None and (array.min(initial=low) < low or array.max(initial=high) > high):
        raise InvalidInput(f"{where}.data: {tensor.name!r} values must lie in [{low}, {high}]",
                           field=f"{where}.data", rule=f"values in [{low}, {high}]")
    return array


def _check_values(where: str, name: str, datatype: str, dtype: type, data: list[Any]) -> None:
    """Every value is a number of the datatype's kind and fits it: before numpy sees it, as numpy raises
    OverflowError (or makes infinities) for values past the type's range."""
    is_int = np.issubdtype(dtype, np.integer)
    if is_int:
        info = np.iinfo(dtype)
        low, high, kind = int(info.min), int(info.max), "integers"
    else:
        high = float(np.finfo(dtype).max)
        low, kind = -high, "numbers"
    rule = f"{datatype} values must be {kind} in [{low}, {high}]" if is_int else \
        f"{datatype} values must be finite numbers in [{low:.8g}, {high:.8g}]"
    for value in data:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (is_int and not isinstance(value, int)):
            raise InvalidInput(f"{where}.data: {name!r} takes {kind}, got {_shorten(repr(value))}",
                               field=f"{where}.data", rule=f"values must be {kind} ({rule})")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{where}.data: {name!r} contains NaN or Infinity", field=f"{where}.data",
                               rule=f"values must be finite ({rule})")
        if not low <= value <= high:  # exact for Python ints of any size, no conversion
            raise InvalidInput(f"{where}.data: {name!r} value {_shorten(repr(value))} is outside {datatype}'s range",
                               field=f"{where}.data", rule=rule)


def _flatten(data: list[Any]) -> list[Any]:
    """The protocol allows flat or nested (row-major) data; flatten nested lists."""
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat
