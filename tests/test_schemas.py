"""Request validation: every bad input becomes a 4xx naming the field and the rule."""

import json
from datetime import timezone

import numpy as np
import pytest

from models.geo import CITY
from serving.errors import InvalidInput, MalformedRequest
from serving.schemas import parse_eta_request, parse_v2_request

GOOD = {"restaurant_id": 7, "delivery_lat": CITY.center_lat, "delivery_lon": CITY.center_lon}
SPECS = [
    {"name": "dense", "datatype": "FP32", "shape": [-1, 3], "range": (None, None)},
    {"name": "areas", "datatype": "INT64", "shape": [-1, 2], "range": (0, 10)},
]


def body(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def test_valid_request_parses_with_utc_default_time():
    """A good body gives typed values and an aware UTC order time."""
    request = parse_eta_request(body(order_time="2026-11-28T12:30:00+01:00"))
    assert request.restaurant_id == 7
    assert request.order_time_utc().hour == 11 and request.order_time_utc().utcoffset().total_seconds() == 0


def test_naive_order_time_is_utc():
    """A time without zone is read as UTC, as documented."""
    assert parse_eta_request(body(order_time="2026-11-28T12:30:00")).order_time_utc().hour == 12


@pytest.mark.parametrize(
    "raw, field, words",
    [
        (body(delivery_lat=95.0), "delivery_lat", "less than or equal to 90"),
        (body(delivery_lat=-90.5), "delivery_lat", "greater than or equal to -90"),
        (body(delivery_lon=181), "delivery_lon", "less than or equal to 180"),
        (body(restaurant_id="7"), "restaurant_id", "valid integer"),
        (body(restaurant_id=7.0), "restaurant_id", "valid integer"),
        (body(restaurant_id=True), "restaurant_id", "valid integer"),
        (body(restaurant_id=0), "restaurant_id", "greater than or equal to 1"),
        (body(restaurant_id=2**63), "restaurant_id", "less than or equal to 9223372036854775807"),
        (body(user_id=2**63), "user_id", "less than or equal to 9223372036854775807"),
        (body(restaurant_id="x" * 5000), "restaurant_id", "(5002 characters)"),
        (body(delivery_lat="52.1"), "delivery_lat", "valid number"),
        (body(order_time="yesterday"), "order_time", "datetime"),
        (body(extra_field=1), "extra_field", "not permitted"),
        (json.dumps({"restaurant_id": 7, "delivery_lat": 52.3}).encode(), "delivery_lon", "field required"),
        (b'{"restaurant_id": 7, "delivery_lat": NaN, "delivery_lon": 4.9}', "delivery_lat", "finite"),
        (b'{"restaurant_id": 7, "delivery_lat": 52.3, "delivery_lon": Infinity}', "delivery_lon", "finite"),
        (b"[1, 2]", "body", "json object"),
    ],
)
def test_bad_eta_bodies_name_field_and_rule(raw, field, words):
    """Each broken rule is reported as a 422 with the field and the rule in the message."""
    with pytest.raises(InvalidInput) as caught:
        parse_eta_request(raw)
    assert caught.value.status == 422
    assert caught.value.field == field
    assert words in caught.value.message.lower()


def test_invalid_json_is_a_400():
    """Not JSON at all is a malformed request."""
    with pytest.raises(MalformedRequest) as caught:
        parse_eta_request(b'{"restaurant_id": ')
    assert caught.value.status == 400 and "not valid json" in caught.value.message.lower()


def test_delivery_outside_the_city_is_refused():
    """A drop-off beyond the served radius names both coordinates and the radius."""
    with pytest.raises(InvalidInput) as caught:
        parse_eta_request(body(delivery_lat=CITY.center_lat + 0.5))
    assert caught.value.field == "delivery_lat,delivery_lon"
    assert f"{CITY.radius_km:.1f} km" in caught.value.message


def v2(*tensors) -> bytes:
    return json.dumps({"inputs": list(tensors)}).encode()


DENSE = {"name": "dense", "datatype": "FP32", "shape": [2, 3], "data": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}
AREAS = {"name": "areas", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}


def test_v2_request_builds_typed_arrays():
    """Flat and nested data both become arrays of the declared shape and dtype."""
    request_id, tensors = parse_v2_request(json.dumps({"id": "r1", "inputs": [DENSE, AREAS]}).encode(), SPECS)
    assert request_id == "r1"
    assert tensors["dense"].dtype == np.float32 and tensors["dense"].shape == (2, 3)
    assert tensors["areas"].dtype == np.int64 and tensors["areas"].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    "raw, field, words",
    [
        (v2({**DENSE, "name": "wrong"}, AREAS), "inputs[0].name", "unknown input"),
        (v2({**DENSE, "datatype": "FP64"}, AREAS), "inputs[0].datatype", "must be fp32"),
        (v2({**DENSE, "shape": [2, 4]}, AREAS), "inputs[0].shape", "the model takes [-1, 3]"),
        (v2({**DENSE, "shape": [6]}, AREAS), "inputs[0].shape", "the model takes"),
        (v2({**DENSE, "shape": [3, 3]}, AREAS), "inputs[0].data", "do not fill shape"),
        (v2({**DENSE, "data": [0.1, "x", 0.3, 0.4, 0.5, 0.6]}, AREAS), "inputs[0].data", "takes numbers"),
        (v2(DENSE, {**AREAS, "data": [1.5, 2, 3, 4]}), "inputs[1].data", "takes integers"),
        (v2(DENSE, {**AREAS, "data": [1, 2, 3, 99]}), "inputs[1].data", "[0, 10]"),
        (v2(DENSE), "inputs", "missing ['areas']"),
        (v2(DENSE, DENSE, AREAS), "inputs[1].name", "given twice"),
        (v2(DENSE, {**AREAS, "shape": [1, 2], "data": [1, 2]}), "inputs", "batch sizes differ"),
        (json.dumps({"inputs": []}).encode(), "inputs", "at least 1"),
        (v2({**DENSE, "shape": [0, 3], "data": []}, AREAS), "inputs[0].shape", "at least 1"),
        (v2(DENSE, {**AREAS, "data": [1, 2, 3, 2**63]}), "inputs[1].data", "outside int64's range"),
        (v2(DENSE, {**AREAS, "data": [1, 2, 3, -(2**63) - 1]}), "inputs[1].data", "outside int64's range"),
        (v2({**DENSE, "data": [0.1, 0.2, 0.3, 0.4, 0.5, 1e39]}, AREAS), "inputs[0].data", "outside fp32's range"),
        (v2({**DENSE, "data": [0.1, 0.2, 0.3, 0.4, 0.5, 10**400]}, AREAS), "inputs[0].data", "outside fp32's range"),
        (v2({**DENSE, "data": [0.1, 0.2, 0.3, 0.4, 0.5, True]}, AREAS), "inputs[0].data", "takes numbers"),
        (b'{"inputs": [{"name": "dense", "datatype": "FP32", "shape": [1, 3], "data": [1, NaN, 2]}]}',
         "inputs[0].data", "nan or infinity"),
    ],
)
def test_bad_v2_requests_name_field_and_rule(raw, field, words):
    """Wrong tensor name, datatype, shape or values are 422s that say which input and why."""
    with pytest.raises(InvalidInput) as caught:
        parse_v2_request(raw, SPECS)
    assert caught.value.field == field
    assert words in caught.value.message.lower()


FREE = [{"name": "free", "datatype": "FP32", "shape": [-1, -1], "range": (None, None)}]


@pytest.mark.parametrize("shape", [[0, 2**64], [2**64, 0], [1, 0], [0, 0]])
def test_empty_or_huge_shapes_are_refused_not_reshaped(shape):
    """A zero dimension would let any other dimension through (numpy then fails on 2**64): every dimension
    must be at least 1, so the values bound the shape."""
    with pytest.raises(InvalidInput) as caught:
        parse_v2_request(v2({"name": "free", "datatype": "FP32", "shape": shape, "data": []}), FREE)
    assert caught.value.field == "inputs[0].shape" and "at least 1" in caught.value.rule


@pytest.mark.parametrize("value, accepted", [(2**31 - 1, True), (2**31, False), (-(2**31), True), (-(2**31) - 1, False)])
def test_int32_bounds(value, accepted):
    """INT32 values are checked against INT32's range, not INT64's."""
    spec = [{"name": "n", "datatype": "INT32", "shape": [-1], "range": (None, None)}]
    raw = v2({"name": "n", "datatype": "INT32", "shape": [1], "data": [value]})
    if accepted:
        assert parse_v2_request(raw, spec)[1]["n"].tolist() == [value]
    else:
        with pytest.raises(InvalidInput, match="outside INT32's range"):
            parse_v2_request(raw, spec)


def test_times_at_the_window_edges():
    """The window is inclusive, judged on the instant (offset applied), and its rule is stated."""
    from datetime import UTC, datetime, timedelta

    from serving.schemas import TIME_WINDOW, _check_time

    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    back, ahead = TIME_WINDOW
    _check_time("order_time", now - back, now)
    _check_time("order_time", (now + ahead).replace(tzinfo=None), now)  # naive is UTC
    # 13:00+02:00 is 11:00Z: inside when the window ends at 12:00Z, although its wall clock is past it
    _check_time("order_time", (now + ahead + timedelta(hours=1)).replace(tzinfo=timezone(timedelta(hours=2))), now)
    for outside in (now - back - timedelta(seconds=1), now + ahead + timedelta(seconds=1),
                    (now + ahead).replace(tzinfo=timezone(timedelta(hours=-1))),
                    datetime.min.replace(tzinfo=timezone(timedelta(hours=1))),
                    datetime.max.replace(tzinfo=timezone(timedelta(hours=-1)))):
        with pytest.raises(InvalidInput) as caught:
            _check_time("order_time", outside, now)
        assert caught.value.field == "order_time" and f"{back.days} days before" in caught.value.rule
