"""Request validation: every bad input becomes a 4xx naming the field and the rule."""

import json

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
        (body(restaurant_id=0), "restaurant_id", "greater than 0"),
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
