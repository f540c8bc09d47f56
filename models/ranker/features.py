"""The one feature transform of the feed ranker, shared by training and serving.

Serving imports this module on its hot path (one call per feed, ~100 candidate rows), so it
is numpy only and works on columns: one array (or list) per name, one row per candidate.

What serving passes to Feast for the `ranker_v1` service, one entity row per candidate:

    store.get_online_features(
        features=store.get_feature_service("ranker_v1"),
        entity_rows=[{"user_id": u, "restaurant_id": r, "user_lat": lat, "user_lon": lon}, ...],
    ).to_dict()

`user_id` and `restaurant_id` are the join keys; `user_lat`/`user_lon` (float degrees) are
request data that the on-demand view `feed_context` needs to compute `distance_km`
and `cuisine_affinity` (a row without them makes Feast raise). The returned columns, plus
`restaurant_id`, `user_lat`, `user_lon` and `request_time` (float epoch seconds, UTC), are
what `build_inputs` reads:

    restaurant_id              int; hashed into an embedding bucket (restaurant_bucket)
    distance_km                from feed_context; when None/NaN, computed from `lat`/`lon`
                               (restaurant) if given, else ValueError (it has no default)
    cuisine, price_level       restaurant_profile; unknown cuisine -> all-zero one-hot
    cuisine_affinity           feed_context; when None/NaN, taken from taste_<cuisine>_30d
                               if given, else the default (no history: 1 / n cuisines)
    orders_7d                  restaurant_prep_7d (orders of the whole platform, 7 days)
    feed_impressions_1d/_7d, feed_orders_1d/_7d, conversion_7d     restaurant_feed_stats
    price_level_30d, taste_*_30d, orders_30d                      user_history_30d (orders_30d
                               only marks a missing history: raw 30-day counts are not inputs,
                               see FEATURE_NAMES; feed_sessions_30d is read but unused)
    request_time               float epoch seconds, UTC (or timestamps: see epoch_seconds)

Any statistic that is None/NaN/absent takes `defaults[name]` (the manifest's
`feature_defaults`: the values a user or restaurant without history gets); two flags tell
the network that user history or restaurant feed statistics were missing.

`position` is a training-only feature (the logged slot, 1..20, carries position bias).
Serving leaves it None and every row is scored as if shown at SERVING_POSITION (the top),
so the score is p(order | shown first) and candidates compete on relevance alone.

Output, the ONNX inputs: `dense` float32 [N, len(FEATURE_NAMES)] (raw values: normalisation
is inside the network), `restaurant_bucket` int64 [N] in [0, N_RESTAURANT_BUCKETS),
`position` int64 [N] in [1, MAX_POSITION].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.eta.features import epoch_seconds
from models.geo import CITY, haversine_km

FEATURE_SERVICE = "ranker_v1"
CUISINES = ("pizza", "burgers", "sushi", "indian", "thai", "mexican", "salads", "chinese", "italian", "bakery")
TASTE_FEATURES = [f"taste_{c}_30d" for c in CUISINES]
USER_FEATURES = ["feed_sessions_30d", "orders_30d", *TASTE_FEATURES, "price_level_30d"]
RESTAURANT_STATS = ["feed_impressions_1d", "feed_orders_1d", "feed_impressions_7d", "feed_orders_7d",
                    "conversion_7d"]
# the features of ranker_v1, by view (feed_context is the on-demand view)
PROFILE_FEATURES = ["cuisine", "price_level"]
PLATFORM_FEATURES = ["orders_7d"]
CONTEXT_FEATURES = ["distance_km", "cuisine_affinity"]
SERVICE_FEATURES = [*USER_FEATURES, *PROFILE_FEATURES, *PLATFORM_FEATURES, *RESTAURANT_STATS, *CONTEXT_FEATURES]
# features that may be missing and then take the manifest's default
DEFAULTED_FEATURES = [*USER_FEATURES, "price_level", *PLATFORM_FEATURES, *RESTAURANT_STATS, "cuisine_affinity"]
REQUEST_COLUMNS = ["restaurant_id", "user_lat", "user_lon", "request_time"]

# Restaurant ids are hashed into buckets of one embedding table; bucket 0 is "unknown".
# A prime modulus keeps ids < RESTAURANT_HASH_PRIME collision-free.
RESTAURANT_HASH_PRIME = 2053
N_RESTAURANT_BUCKETS = RESTAURANT_HASH_PRIME + 1
UNKNOWN_RESTAURANT = 0
MAX_POSITION = 20
SERVING_POSITION = 1
HOUR_HARMONICS = (1, 2, 3)

FEATURE_NAMES = [
    "distance_km",
    "cuisine_affinity",
    "log_affinity",  # log(0.2 + 10 * affinity): taste enters order choice multiplicatively
    # orders_30d and feed_sessions_30d are not inputs: the simulated history is shorter than
    # 30 days, so they grow with the calendar and a model would learn the date, not the user
    "price_level_30d",
    "user_history_missing",
    "price_level",
    "price_gap",  # price_level - price_level_30d: away from what the user usually pays
    "log1p_orders_7d",
    "log1p_feed_impressions_1d",
    "log1p_feed_orders_1d",
    "log1p_feed_impressions_7d",
    "log1p_feed_orders_7d",
    "logit_conversion_7d",
    "feed_stats_missing",
    *[f"hour_{f}{k}" for k in HOUR_HARMONICS for f in ("sin", "cos")],
    "dow_sin",
    "dow_cos",
    "weekend",
    *[f"cuisine_{c}" for c in CUISINES],
]
N_DENSE = len(FEATURE_NAMES)

_SECONDS_PER_DAY = 86400.0
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
_CUISINE_INDEX = {c: i for i, c in enumerate(CUISINES)}


def no_history_defaults(conversion: float, price_level: float = 2.5) -> dict[str, float]:
    """Defaults = what the batch jobs write for a user or restaurant without any history.

    `conversion` is the city's feed conversion (the smoothing prior of conversion_7d).
    """
    from models.sessions import DEFAULT_PRICE_LEVEL

    defaults = {name: 0.0 for name in DEFAULTED_FEATURES}
    defaults.update({name: 1.0 / len(CUISINES) for name in TASTE_FEATURES})
    defaults["cuisine_affinity"] = 1.0 / len(CUISINES)
    defaults["price_level_30d"] = DEFAULT_PRICE_LEVEL
    defaults["price_level"] = float(price_level)
    defaults["conversion_7d"] = float(conversion)
    return defaults


def restaurant_bucket(restaurant_id: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Embedding bucket of each restaurant id: 1 + id mod prime; 0 for a missing or negative id.

    A restaurant never seen in training lands in a bucket no training row touched, whose
    embedding stayed at zero: the same "unknown restaurant" vector as bucket 0 (cold start).
    """
    raw = np.asarray(restaurant_id, dtype=object) if not isinstance(restaurant_id, np.ndarray) else restaurant_id
    if raw.dtype == object:
        raw = np.array([-1 if v is None else v for v in raw], dtype=np.float64)
    ids = np.asarray(raw, dtype=np.float64)
    valid = np.isfinite(ids) & (ids >= 0)
    buckets = 1 + np.where(valid, ids, 0).astype(np.int64) % RESTAURANT_HASH_PRIME
    return np.where(valid, buckets, UNKNOWN_RESTAURANT).astype(np.int64)


def float_column(columns: Mapping[str, Any], name: str, n: int, default: float) -> tuple[np.ndarray, np.ndarray]:
    """A float64 column with None/NaN/absent replaced by `default`; and the missing mask."""
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


def required_column(columns: Mapping[str, Any], name: str, n: int | None = None) -> np.ndarray:
    """A finite float64 column that cannot be defaulted (coordinates, time); ValueError names it."""
    if name not in columns or columns[name] is None:
        raise ValueError(f"build_inputs needs column {name!r}; got {sorted(columns)}")
    values = epoch_seconds(columns[name]) if name == "request_time" else np.asarray(columns[name], dtype=np.float64)
    values = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if n is not None and values.shape != (n,):
        raise ValueError(f"column {name!r} has shape {values.shape}, expected ({n},)")
    if not np.isfinite(values).all():
        raise ValueError(f"column {name!r} has missing or non-finite values; it cannot be defaulted")
    return values


def time_features(request_time: np.ndarray) -> list[np.ndarray]:
    """Hour-of-day harmonics (k = 1..3), weekday sin/cos and weekend flag, UTC clock."""
    day = np.floor(request_time / _SECONDS_PER_DAY)
    hour_angle = 2 * math.pi * (request_time - day * _SECONDS_PER_DAY) / _SECONDS_PER_DAY
    weekday = (day + _EPOCH_WEEKDAY) % 7
    dow_angle = 2 * math.pi * weekday / 7
    hours = [h(k * hour_angle) for k in HOUR_HARMONICS for h in (np.sin, np.cos)]
    return [*hours, np.sin(dow_angle), np.cos(dow_angle), (weekday >= 5).astype(np.float64)]


def cuisine_codes(cuisine: Sequence[Any] | None, n: int) -> np.ndarray:
    """Index of each cuisine in CUISINES; -1 for a missing or unknown one."""
    if cuisine is None:
        return np.full(n, -1, dtype=np.int64)
    if len(cuisine) != n:
        raise ValueError(f"column 'cuisine' has {len(cuisine)} rows, expected {n}")
    return np.fromiter((_CUISINE_INDEX.get(c, -1) for c in cuisine), dtype=np.int64, count=n)


def _affinity(columns: Mapping[str, Any], codes: np.ndarray, n: int, defaults: Mapping[str, float]) -> np.ndarray:
    """cuisine_affinity; rows without it take the user's taste share of the cuisine, else the default."""
    affinity, missing = float_column(columns, "cuisine_affinity", n, float(defaults["cuisine_affinity"]))
    if missing.any() and any(columns.get(name) is not None for name in TASTE_FEATURES):
        shares = np.stack([float_column(columns, name, n, float(defaults[name]))[0] for name in TASTE_FEATURES], 1)
        known = missing & (codes >= 0)
        affinity[known] = shares[known, codes[known]]
    return affinity


def _distance(columns: Mapping[str, Any], n: int) -> np.ndarray:
    """distance_km, or the haversine from `lat`/`lon` of the restaurant where it is missing."""
    if columns.get("distance_km") is None and columns.get("lat") is None:
        raise ValueError("build_inputs needs column 'distance_km' (feed_context) or the restaurant's 'lat'/'lon'")
    distance, missing = float_column(columns, "distance_km", n, np.nan)
    if missing.any():
        if columns.get("lat") is None or columns.get("lon") is None:
            raise ValueError("column 'distance_km' has missing values and no restaurant 'lat'/'lon' to compute it")
        lat, lon = required_column(columns, "lat", n), required_column(columns, "lon", n)
        user_lat, user_lon = required_column(columns, "user_lat", n), required_column(columns, "user_lon", n)
        distance[missing] = haversine_km(user_lat, user_lon, lat, lon)[missing]
    return distance


def positions(position: int | Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """The position input: SERVING_POSITION when None, else the logged slot clipped to 1..MAX_POSITION."""
    if position is None:
        return np.full(n, SERVING_POSITION, dtype=np.int64)
    values = np.broadcast_to(np.asarray(position, dtype=np.int64), (n,))
    return np.clip(values, 1, MAX_POSITION).astype(np.int64)


def build_inputs(
    columns: Mapping[str, Sequence | np.ndarray],
    defaults: Mapping[str, float],
    position: int | Sequence[int] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """ONNX inputs {"dense", "restaurant_bucket", "position"} from raw columns (module doc).

    `position` None scores every row at the serving position (1); training and evaluation
    pass the logged positions. Statistics that are None/NaN/absent take `defaults[name]`.
    """
    for name in DEFAULTED_FEATURES:
        if name not in defaults:
            raise ValueError(f"defaults has no value for {name!r}: pass the manifest's feature_defaults")
    if columns.get("restaurant_id") is None:
        raise ValueError(f"build_inputs needs column 'restaurant_id'; got {sorted(columns)}")
    bucket = restaurant_bucket(columns["restaurant_id"])
    n = len(bucket)
    request_time = required_column(columns, "request_time", n)
    stat = {name: float_column(columns, name, n, float(defaults[name])) for name in DEFAULTED_FEATURES}
    codes = cuisine_codes(columns.get("cuisine"), n)
    distance = _distance(columns, n)
    affinity = _affinity(columns, codes, n, defaults)
    conversion = np.clip(stat["conversion_7d"][0], 1e-4, 1 - 1e-4)
    one_hot = np.zeros((n, len(CUISINES)))
    one_hot[codes >= 0, codes[codes >= 0]] = 1.0

    parts = [
        distance,
        affinity,
        np.log(0.2 + 10.0 * np.clip(affinity, 0.0, 1.0)),
        stat["price_level_30d"][0],
        stat["orders_30d"][1].astype(np.float64),
        stat["price_level"][0],
        stat["price_level"][0] - stat["price_level_30d"][0],
        np.log1p(np.maximum(stat["orders_7d"][0], 0)),
        *[np.log1p(np.maximum(stat[name][0], 0)) for name in RESTAURANT_STATS[:4]],
        np.log(conversion / (1 - conversion)),
        stat["feed_impressions_7d"][1].astype(np.float64),
        *time_features(request_time),
    ]
    dense = np.empty((n, N_DENSE), dtype=np.float32)
    for i, part in enumerate(parts):
        dense[:, i] = part
    dense[:, len(parts):] = one_hot
    return {"dense": dense, "restaurant_bucket": bucket, "position": positions(position, n)}


def city_xy(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kilometres north and east of the city centre (equirectangular, fine at city scale)."""
    north = (np.asarray(lat, dtype=np.float64) - CITY.center_lat) * 111.32
    east = (np.asarray(lon, dtype=np.float64) - CITY.center_lon) * 111.32 * math.cos(math.radians(CITY.center_lat))
    return north, east
