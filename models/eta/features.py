"""The one feature transform of the ETA model, shared by training and serving.

Serving imports this module on its hot path, so it is numpy only (no pandas) and
works on columns: one array (or list) per input name, one row per request.

Input columns of `build_inputs` (N rows each):

    lat, lon                   restaurant location (from Feast `restaurant_profile`, or the
                               artifact's restaurant directory when the online store is down)
    delivery_lat, delivery_lon drop-off point of the request
    order_time                 float epoch seconds, UTC (e.g. `time.time()`); use
                               `epoch_seconds()` to convert pandas / numpy timestamps
    area_id                    optional: H3 res-7 cell of the drop-off (computed when absent)
    LIVE_FEATURES              the 7 Feast statistics; None / NaN / absent -> `defaults[name]`

The clock of the city is UTC: hour of day and weekday are taken from UTC time, as the
simulator does. Output: the ONNX input tensors `dense` float32 [N, len(FEATURE_NAMES)] and
`areas` int64 [N, 2] (pickup-area bucket, drop-off-area bucket). Normalisation is done
inside the model, so `dense` holds raw values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from models.geo import AREA_RESOLUTION, bearing_rad, haversine_km

FEATURE_SERVICE = "eta_v1"

# Feast features of eta_v1 that can be missing or stale; each has a default in the manifest.
PREP_FEATURES = ["prep_time_mean_7d", "prep_time_p90_7d", "orders_7d"]
LOAD_FEATURES = ["open_orders_15m"]
CONGESTION_FEATURES = ["area_orders_15m", "couriers_on_shift", "congestion_ratio"]
LIVE_FEATURES = PREP_FEATURES + LOAD_FEATURES + CONGESTION_FEATURES
# Features of eta_v1 that are not statistics: the restaurant's place (restaurant_profile).
PROFILE_FEATURES = ["lat", "lon"]
REQUEST_COLUMNS = ["delivery_lat", "delivery_lon", "order_time"]

# Hour-of-day harmonics: k = 1..3 resolve two rush-hour dips of a couple of hours each.
HOUR_HARMONICS = (1, 2, 3)

FEATURE_NAMES = [
    "distance_km",
    "bearing_sin",
    "bearing_cos",
    *[f"hour_{f}{k}" for k in HOUR_HARMONICS for f in ("sin", "cos")],
    "dow_sin",
    "dow_cos",
    "weekend",
    # travel time = distance x pace(time): explicit products make the interaction easy to learn
    *[f"distance_x_hour_{f}{k}" for k in HOUR_HARMONICS for f in ("sin", "cos")],
    "distance_x_weekend",
    "prep_time_mean_7d",
    "prep_time_p90_7d",
    "log1p_orders_7d",
    "prep_stats_missing",
    "open_orders_15m",
    "log1p_area_orders_15m",
    "log1p_couriers_on_shift",
    "congestion_ratio",
]
N_DENSE = len(FEATURE_NAMES)

# Area ids are hashed into buckets; bucket 0 is "unknown area". H3 indexes share their low
# bits (unused digits are all 1), so the modulus must be a prime, never a power of two.
AREA_HASH_PRIME = 1021
N_AREA_BUCKETS = AREA_HASH_PRIME + 1
UNKNOWN_AREA = 0

_SECONDS_PER_DAY = 86400.0
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


def area_bucket(area: Any) -> int:
    """Stable bucket of an H3 cell id (hex string); 0 for a missing or malformed id."""
    if not isinstance(area, str) or not area:
        return UNKNOWN_AREA
    try:
        return 1 + int(area, 16) % AREA_HASH_PRIME
    except ValueError:
        return UNKNOWN_AREA


@lru_cache(maxsize=65536)
def _cell_bucket(lat: float, lon: float) -> int:
    # cached: pickup points are the few restaurant locations, looked up on every request
    import h3

    return area_bucket(h3.latlng_to_cell(lat, lon, AREA_RESOLUTION))


def pickup_buckets(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Buckets of the H3 res-7 cells of the restaurants' locations."""
    return np.fromiter(
        (_cell_bucket(float(a), float(b)) for a, b in zip(lat, lon, strict=True)),
        dtype=np.int64,
        count=len(lat),
    )


def dropoff_buckets(
    area_id: Sequence[Any] | np.ndarray | None, lat: np.ndarray, lon: np.ndarray
) -> np.ndarray:
    """Buckets of the drop-off areas: from `area_id` when given, else from the drop-off point."""
    if area_id is None:
        return pickup_buckets(lat, lon)
    if len(area_id) != len(lat):
        raise ValueError(f"column 'area_id' has {len(area_id)} rows, expected {len(lat)}")
    return np.fromiter((area_bucket(a) for a in area_id), dtype=np.int64, count=len(lat))


def epoch_seconds(times: Any) -> np.ndarray:
    """UTC epoch seconds (float64) from numpy datetime64, pandas timestamps or numbers."""
    # a pandas Series: tz-aware ones convert to UTC, naive ones are taken as UTC
    if hasattr(times, "dt"):
        times = (
            times.dt.tz_convert("UTC").dt.tz_localize(None) if times.dt.tz is not None else times
        )
        return times.to_numpy(dtype="datetime64[ns]").astype(np.int64) / 1e9
    if hasattr(times, "tz"):  # a pandas DatetimeIndex
        times = times.tz_convert("UTC").tz_localize(None) if times.tz is not None else times
        return np.asarray(times, dtype="datetime64[ns]").astype(np.int64) / 1e9
    array = np.asarray(times)
    if array.dtype.kind == "M":
        return array.astype("datetime64[ns]").astype(np.int64) / 1e9
    if array.dtype == object:  # datetime / Timestamp objects
        return np.array([t.timestamp() for t in array.ravel()], dtype=np.float64).reshape(
            array.shape
        )
    return array.astype(np.float64)


def _float_column(
    columns: Mapping[str, Any], name: str, n: int, default: float
) -> tuple[np.ndarray, np.ndarray]:
    """A float64 column, None/NaN/absent replaced by `default`; and the missing mask."""
    raw = columns.get(name)
    if raw is None:
        return np.full(n, default, dtype=np.float64), np.ones(n, dtype=bool)
    values = np.asarray(raw)
    if values.dtype == object:  # lists with None in them
        values = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    values = values.astype(np.float64, copy=True)
    if values.shape != (n,):
        raise ValueError(f"feature column {name!r} has shape {values.shape}, expected ({n},)")
    missing = ~np.isfinite(values)
    values[missing] = default
    return values, missing


def _required(columns: Mapping[str, Any], name: str, n: int | None = None) -> np.ndarray:
    if name not in columns or columns[name] is None:
        raise ValueError(f"build_inputs needs column {name!r}; got {sorted(columns)}")
    values = (
        epoch_seconds(columns[name])
        if name == "order_time"
        else np.asarray(columns[name], dtype=np.float64)
    )
    values = np.atleast_1d(values)
    if n is not None and values.shape != (n,):
        raise ValueError(f"column {name!r} has shape {values.shape}, expected ({n},)")
    if not np.isfinite(values).all():
        raise ValueError(
            f"column {name!r} has missing or non-finite values; it cannot be defaulted"
        )
    return values


def build_inputs(
    columns: Mapping[str, Sequence | np.ndarray], defaults: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """ONNX inputs {"dense": float32 [N, D], "areas": int64 [N, 2]} from raw columns (module doc).

    Live features that are None, NaN or absent take `defaults[name]` (the manifest's
    `feature_defaults`); coordinates and order_time are required and must be finite.
    """
    lat = _required(columns, "lat")
    n = len(lat)
    lon, d_lat, d_lon, t = (
        _required(columns, name, n)
        for name in ("lon", "delivery_lat", "delivery_lon", "order_time")
    )

    distance = haversine_km(lat, lon, d_lat, d_lon)
    bearing = bearing_rad(lat, lon, d_lat, d_lon)
    day = np.floor(t / _SECONDS_PER_DAY)
    # angle of the fractional hour of the day (not the whole hour: rush hours are short)
    hour_angle = 2 * math.pi * (t - day * _SECONDS_PER_DAY) / _SECONDS_PER_DAY
    weekday = (day + _EPOCH_WEEKDAY) % 7
    weekend = (weekday >= 5).astype(np.float64)
    dow_angle = 2 * math.pi * weekday / 7

    live = {}
    prep_missing = None
    for name in LIVE_FEATURES:
        if name not in defaults:
            raise ValueError(
                f"defaults has no value for {name!r}: pass the manifest's feature_defaults"
            )
        live[name], missing = _float_column(columns, name, n, float(defaults[name]))
        if name == "prep_time_mean_7d":
            prep_missing = missing

    hour = [h(k * hour_angle) for k in HOUR_HARMONICS for h in (np.sin, np.cos)]
    dense = np.empty((n, N_DENSE), dtype=np.float32)
    parts = [
        distance,
        np.sin(bearing),
        np.cos(bearing),
        *hour,
        np.sin(dow_angle),
        np.cos(dow_angle),
        weekend,
        *[distance * h for h in hour],
        distance * weekend,
        live["prep_time_mean_7d"],
        live["prep_time_p90_7d"],
        np.log1p(np.maximum(live["orders_7d"], 0)),
        prep_missing.astype(np.float64),
        live["open_orders_15m"],
        np.log1p(np.maximum(live["area_orders_15m"], 0)),
        np.log1p(np.maximum(live["couriers_on_shift"], 0)),
        live["congestion_ratio"],
    ]
    for i, part in enumerate(parts):
        dense[:, i] = part

    areas = np.empty((n, 2), dtype=np.int64)
    areas[:, 0] = pickup_buckets(lat, lon)
    areas[:, 1] = dropoff_buckets(columns.get("area_id"), d_lat, d_lon)
    return {"dense": dense, "areas": areas}


def feature_defaults(train_frame: Any) -> dict[str, float]:
    """Defaults for missing live features from the training frame: medians, and 0 open orders.

    `train_frame` is a DataFrame (or mapping of columns) holding LIVE_FEATURES, before filling.
    """
    defaults: dict[str, float] = {}
    for name in LIVE_FEATURES:
        if name in LOAD_FEATURES:
            defaults[name] = 0.0  # no row in the last 15 minutes means no open orders
            continue
        values = np.asarray(train_frame[name], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError(f"training frame has no value of {name!r}: cannot choose its default")
        defaults[name] = float(np.median(values))
    return defaults
