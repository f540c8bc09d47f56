"""The input contract to its limits: every field's range is enforced, and nothing a client sends is a 500.

Two halves: `hypothesis` properties over the parsers (any body either parses into values inside the
documented ranges or is refused with a 4xx naming field and rule, never another exception), and the
inputs that used to be 500s sent to the served app, which must now answer 422 naming field and rule.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.geo import CITY
from serving.errors import CourierError, InvalidInput
from serving.schemas import (
    TIME_WINDOW,
    _check_time,
    _utc,
    parse_eta_request,
    parse_feed_request,
    parse_v2_request,
)

# Bounded: the properties run in `make test` and must stay within seconds.
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- values a client may send, weighted toward the edges ------------------------------------------------

EDGE_INTS = st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**31 - 1, 2**31, -(2**31),
                             -(2**31) - 1, 2**64, 10**30, -(10**30), 10**4000])
INTS = st.one_of(EDGE_INTS, st.integers(), st.integers(min_value=-(2**70), max_value=2**70))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e39, -1e39,
                   3.4028235e38, 3.4028236e38, 1.7976931348623157e308, 5e-324]))
OFFSETS = st.builds(lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-(24 * 60 - 1), 24 * 60 - 1))
NOW = datetime.now(UTC).replace(tzinfo=None)
BACK, AHEAD = TIME_WINDOW
NEAR_WINDOW = st.datetimes(min_value=NOW - BACK - timedelta(days=3), max_value=NOW + AHEAD + timedelta(days=3))
ANY_TIME = st.one_of(st.datetimes(), NEAR_WINDOW, st.sampled_from([datetime.min, datetime.max]))
TIMES = st.builds(lambda moment, zone: moment.replace(tzinfo=zone), ANY_TIME, st.one_of(st.none(), OFFSETS))
TIME_TEXT = st.one_of(TIMES.map(datetime.isoformat), st.sampled_from(["0001-01-01T00:00:00+01:00",
                      "9999-12-31T23:59:59-01:00", "yesterday", "", "2026-13-01T00:00:00Z"]))
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=20), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
LATS = st.one_of(st.floats(CITY.center_lat - 0.1, CITY.center_lat + 0.1), FLOATS, INTS)
LONS = st.one_of(st.floats(CITY.center_lon - 0.15, CITY.center_lon + 0.15), FLOATS, INTS)


@st.composite
def near_valid(draw, valid: st.SearchStrategy[dict], edges: dict[str, st.SearchStrategy]) -> dict:
    """A valid body with up to two fields swapped for an edge value or junk, or dropped, and maybe an unknown
    field: most examples then reach the rule under test instead of failing on the first field."""
    body = draw(valid)
    for name in draw(st.lists(st.sampled_from(sorted(edges)), max_size=2, unique=True)):
        change = draw(st.sampled_from(["edge", "edge", "junk", "drop"]))
        if change == "drop":
            body.pop(name, None)
        else:
            body[name] = draw(edges[name] if change == "edge" else JUNK)
    if draw(st.integers(0, 9)) == 0:
        body["surprise"] = draw(JUNK)
    return body


INT64_MAX = 2**63 - 1  # the documented bound, written out: the test must not take it from the code it checks
IN_CITY_LAT = st.floats(CITY.center_lat - 0.05, CITY.center_lat + 0.05)
IN_CITY_LON = st.floats(CITY.center_lon - 0.07, CITY.center_lon + 0.07)
VALID_TIME = st.datetimes(min_value=NOW - BACK + timedelta(hours=1), max_value=NOW + AHEAD - timedelta(hours=1),
                          timezones=st.just(UTC)).map(datetime.isoformat)
ETA_BODIES = near_valid(
    st.fixed_dictionaries({"restaurant_id": st.integers(1, INT64_MAX), "delivery_lat": IN_CITY_LAT,
                           "delivery_lon": IN_CITY_LON},
                          optional={"order_time": VALID_TIME, "user_id": st.integers(1, INT64_MAX)}),
    {"restaurant_id": INTS, "delivery_lat": LATS, "delivery_lon": LONS, "order_time": TIME_TEXT, "user_id": INTS})
FEED_BODIES = near_valid(
    st.fixed_dictionaries({"user_id": st.integers(1, INT64_MAX), "user_lat": IN_CITY_LAT, "user_lon": IN_CITY_LON},
                          optional={"page_size": st.integers(1, 50), "request_time": VALID_TIME,
                                    "include_timings": st.booleans()}),
    {"user_id": INTS, "user_lat": LATS, "user_lon": LONS, "page_size": INTS, "request_time": TIME_TEXT,
     "include_timings": JUNK})


def encode(body: dict) -> bytes:
    """JSON as a client may write it: NaN and Infinity included (Python's json writes them)."""
    return json.dumps(body, allow_nan=True).encode()


def refused_properly(exc: CourierError, allowed: set[str]) -> None:
    """A refusal is a 4xx naming a known field, with a rule, in a message that starts with the field."""
    assert 400 <= exc.status < 500, exc
    assert exc.field in allowed and exc.rule, (exc.field, exc.rule, exc.message)
    assert exc.message.startswith(exc.field.split(",")[0]), exc.message


def in_window(moment: datetime) -> bool:
    now = datetime.now(UTC)
    return now - BACK - timedelta(minutes=1) <= moment <= now + AHEAD + timedelta(minutes=1)


# --- properties over the parsers ------------------------------------------------------------------------

@FAST
@given(ETA_BODIES)
def test_eta_bodies_parse_inside_the_ranges_or_are_refused_naming_the_field(body):
    """Any /v1/eta body either parses into values inside every documented range or is a 4xx naming the field."""
    try:
        request = parse_eta_request(encode(body))
    except CourierError as exc:
        refused_properly(exc, {*body, "restaurant_id", "delivery_lat", "delivery_lon", "delivery_lat,delivery_lon",
                               "body"})
        return
    assert 1 <= request.restaurant_id <= INT64_MAX
    assert request.user_id is None or 1 <= request.user_id <= INT64_MAX
    assert CITY.contains(request.delivery_lat, request.delivery_lon)
    assert in_window(request.order_time_utc())


@FAST
@given(FEED_BODIES)
def test_feed_bodies_parse_inside_the_ranges_or_are_refused_naming_the_field(body):
    """Any /v1/feed body either parses into values inside every documented range or is a 4xx naming the field."""
    try:
        request = parse_feed_request(encode(body))
    except CourierError as exc:
        refused_properly(exc, {*body, "user_id", "user_lat", "user_lon", "user_lat,user_lon", "body"})
        return
    assert 1 <= request.user_id <= INT64_MAX and 1 <= request.page_size <= 50
    assert CITY.contains(request.user_lat, request.user_lon)
    assert in_window(request.request_time_utc())


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_are_an_answer_or_a_4xx(raw):
    """Arbitrary bytes never raise anything but a 4xx (400 for not JSON, 422 for JSON breaking a rule)."""
    for parse in (parse_eta_request, parse_feed_request):
        try:
            parse(raw)
        except CourierError as exc:
            assert exc.status in (400, 422) and exc.field and exc.rule


@FAST
@given(TIMES)
def test_any_time_with_any_offset_is_checked_without_overflow(moment):
    """Year 1 to 9999 with any UTC offset: inside the window it converts to UTC, outside it is a 422, never
    an OverflowError; the decision agrees with exact arithmetic on the instant."""
    now = datetime.now(UTC)
    offset = moment.utcoffset() or timedelta(0)
    # The instant in seconds since year 1, exactly (no datetime arithmetic that could overflow).
    instant = (moment.replace(tzinfo=None) - datetime.min).total_seconds() - offset.total_seconds()
    earliest = (now.replace(tzinfo=None) - BACK - datetime.min).total_seconds()
    latest = (now.replace(tzinfo=None) + AHEAD - datetime.min).total_seconds()
    try:
        _check_time("order_time", moment, now)
    except InvalidInput as exc:
        assert exc.field == "order_time" and "days before" in exc.rule
        assert not earliest <= instant <= latest
        return
    assert earliest <= instant <= latest
    assert _utc(moment).utcoffset() == timedelta(0)


# --- properties over /v2 tensors --------------------------------------------------------------------------

SPECS = [{"name": "dense", "datatype": "FP32", "shape": [-1, 2], "range": (None, None)},
         {"name": "wide", "datatype": "FP64", "shape": [-1, 2], "range": (None, None)},
         {"name": "ids", "datatype": "INT64", "shape": [-1, 2], "range": (None, None)},
         {"name": "small", "datatype": "INT32", "shape": [-1, 2], "range": (None, None)},
         {"name": "free", "datatype": "FP32", "shape": [-1, -1], "range": (None, None)}]  # any 2-d shape
VALUES = st.one_of(INTS, FLOATS, st.booleans(), st.text(max_size=3), st.none())


@st.composite
def v2_bodies(draw) -> dict:
    """A valid request for SPECS (a batch of 1-3 rows), then one input changed: a value drawn from the edges
    of every type, or a shape from any list of integers (its data resized to fit when small)."""
    rows = draw(st.integers(1, 3))
    inputs = []
    for spec in SPECS:
        valid = st.integers(-(2**31), 2**31 - 1) if spec["datatype"].startswith("INT") else st.floats(-1e6, 1e6)
        inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": [rows, 2],
                       "data": draw(st.lists(valid, min_size=rows * 2, max_size=rows * 2))})
    target = inputs[draw(st.integers(0, len(inputs) - 1))]
    change = draw(st.sampled_from(["value", "value", "shape", "none"]))
    if change == "value":
        target["data"][draw(st.integers(0, rows * 2 - 1))] = draw(VALUES)
    elif change == "shape":
        dims = st.sampled_from([rows, 2, 0, -1, 2**31, 2**63, 2**64, 10**30])
        target["shape"] = draw(st.one_of(st.lists(dims, min_size=2, max_size=2), st.lists(dims, max_size=3)))
        size = math.prod(target["shape"])
        if 0 <= size <= 12:
            target["data"] = draw(st.lists(st.floats(-1e6, 1e6) if target["datatype"].startswith("FP")
                                           else st.integers(-100, 100), min_size=size, max_size=size))
    return {"inputs": inputs}


@FAST
@given(v2_bodies())
def test_v2_tensors_fit_their_datatype_or_are_refused_naming_the_input(body):
    """Any tensor either becomes an array of its datatype holding exactly the values sent (finite, in range)
    or is a 422 naming the input's field (`inputs[i].data`, `.shape`) and the rule."""
    try:
        _, tensors = parse_v2_request(encode(body), SPECS)
    except CourierError as exc:
        assert exc.status == 422 and exc.rule
        assert exc.field == "inputs" or exc.field.startswith("inputs["), exc.field
        return
    for sent in body["inputs"]:
        array = tensors[sent["name"]]
        assert array.shape == tuple(sent["shape"]) and min(array.shape) >= 1  # no empty tensors
        assert array.dtype == {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64,
                               "INT32": np.int32}[sent["datatype"]]
        assert np.isfinite(array).all()
        if sent["datatype"].startswith("INT"):
            assert array.reshape(-1).tolist() == sent["data"]  # no wrap-around
        else:
            assert all(math.isclose(float(a), float(v), rel_tol=1e-6, abs_tol=1e-30)
                       for a, v in zip(array.reshape(-1).tolist(), sent["data"]))


# --- the former 500s, against the served app ---------------------------------------------------------------

# The classes of input that were 500s before the contract (issue #13): values beyond int64 in ids and in
# /v2 integer tensors, and times that overflow datetime once their UTC offset is applied.
BIG = 2**63  # one past the largest int64
HUGE = 10**30
FIVE_HUNDREDS = [
    ("eta restaurant_id past int64", "/v1/eta", {"restaurant_id": BIG}, "restaurant_id"),
    ("eta restaurant_id huge", "/v1/eta", {"restaurant_id": HUGE}, "restaurant_id"),
    ("eta user_id past int64", "/v1/eta", {"user_id": BIG}, "user_id"),
    ("eta order_time year 1 +01:00", "/v1/eta", {"order_time": "0001-01-01T00:00:00+01:00"}, "order_time"),
    ("eta order_time year 9999 -01:00", "/v1/eta", {"order_time": "9999-12-31T23:59:59-01:00"}, "order_time"),
    ("eta order_time year 2300", "/v1/eta", {"order_time": "2300-01-01T00:00:00Z"}, "order_time"),
    ("feed user_id past int64", "/v1/feed", {"user_id": BIG}, "user_id"),
    ("feed request_time year 1 +01:00", "/v1/feed", {"request_time": "0001-01-01T00:00:00+01:00"}, "request_time"),
    ("feed request_time year 9999 -01:00", "/v1/feed", {"request_time": "9999-12-31T23:59:59-01:00"},
     "request_time"),
]


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        yield http


@pytest.mark.integration
@pytest.mark.parametrize("case, path, change, field", FIVE_HUNDREDS, ids=[c[0] for c in FIVE_HUNDREDS])
def test_former_500s_are_422s_naming_field_and_rule(client, known, case, path, change, field):
    """Ids past int64 and times past datetime's limits are refused with a 422 that says which field and why."""
    base = known if path == "/v1/eta" else {"user_id": 3, "user_lat": known["delivery_lat"],
                                              "user_lon": known["delivery_lon"], "request_time": known["order_time"]}
    response = client.post(path, content=json.dumps({**base, **change}), headers={"content-type": "application/json"})
    assert response.status_code == 422, f"{case}: {response.status_code} {response.text}"
    error = response.json()
    assert error["field"] == field and error["rule"], error
    assert field in error["error"], error


def _v2_body(client, model: str, datatype: str, value) -> dict:
    """A /v2 infer body for `model` with every input valid except one `datatype` input holding `value`."""
    metadata = client.get(f"/v2/models/{model}").json()
    inputs = []
    replaced = False
    for spec in metadata["inputs"]:
        width = 1
        for dim in spec["shape"][1:]:
            width *= dim
        data: list = [1] * width if spec["datatype"].startswith("INT") else [0.5] * width
        if spec["datatype"] == datatype and not replaced:
            data[0], replaced = value, True
        inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": [1, *spec["shape"][1:]],
                       "data": data})
    assert replaced, f"{model} has no {datatype} input"
    return {"inputs": inputs}


V2_FIVE_HUNDREDS = [
    ("INT64 past int64", "INT64", BIG),
    ("INT64 below int64", "INT64", -BIG - 1),
    ("INT64 huge", "INT64", HUGE),
    ("FP32 past float32", "FP32", 1e39),
    ("FP32 huge integer", "FP32", 10**400),
]


@pytest.mark.integration
@pytest.mark.parametrize("case, datatype, value", V2_FIVE_HUNDREDS, ids=[c[0] for c in V2_FIVE_HUNDREDS])
def test_former_v2_500s_are_422s_naming_field_and_rule(client, case, datatype, value):
    """A tensor value outside its datatype's range is a 422 naming the input's data and the range."""
    body = json.dumps(_v2_body(client, "eta", datatype, value))
    response = client.post("/v2/models/eta/infer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, f"{case}: {response.status_code} {response.text}"
    error = response.json()
    assert error["field"].startswith("inputs[") and error["field"].endswith("].data"), error
    assert datatype in error["rule"], error


# --- a server fault: a 500 with a request id, and a log line with the same id -----------------------------

def test_a_server_fault_is_a_500_with_a_request_id_and_a_log_line():
    """A bug in a route (not an input error) answers 500 `{"error": "internal error", "request_id"}` with no
    internals, and logs the traceback under the same id. The fault is made by a route that raises: no input
    can cause one once the contract holds, which is the point."""
    import asyncio
    import logging

    from starlette.requests import Request

    from serving.ingress import Ingress
    from serving.metrics import ServingMetrics

    class Faulty(Ingress.func_or_class):
        def __init__(self):  # no models, no Ray: only the metrics the error path counts with
            self.metrics = ServingMetrics(export=False)

        def __getattr__(self, name):  # any other collaborator (auth, admission, ...) is the bug
            return {}["a key that is not there"]

        async def _route(self, request, path):
            return {}["a key that is not there"]  # the kind of bug a route could have

    scope = {"type": "http", "method": "GET", "path": "/v2/health/live", "raw_path": b"/v2/health/live",
             "query_string": b"", "headers": []}
    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    serve_logger, handler = logging.getLogger("ray.serve"), Lines()  # Ray's logger does not propagate to caplog
    serve_logger.addHandler(handler)
    try:
        response = asyncio.run(Faulty()(Request(scope)))
    finally:
        serve_logger.removeHandler(handler)
    assert response.status_code == 500 and response.media_type == "application/json"
    body = json.loads(response.body)
    assert set(body) == {"error", "request_id"} and body["error"] == "internal error"
    assert "a key that is not there" not in response.body.decode()  # no internals to the client
    lines = [record for record in handler.records if body["request_id"] in record.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info and lines[0].exc_info[0] is KeyError
    assert "/v2/health/live" in lines[0].getMessage()
