"""The feature transforms of the two-tower retrieval model, shared by training and serving.

User tower (serving calls this once per feed request; numpy only):

    features = store.get_online_features(
        features=store.get_feature_service("retrieval_v1"),
        entity_rows=[{"user_id": user_id}],
    ).to_dict()
    inputs = build_user_inputs(
        {**features, "user_lat": [lat], "user_lon": [lon], "request_time": [epoch_seconds_utc]},
        manifest.feature_defaults,
    )
    user_embedding = session.run(["user_embedding"], inputs)[0]  # float32 [1, EMBEDDING_DIM]

Columns of `build_user_inputs` (N rows each):

    feed_sessions_30d, orders_30d, taste_<cuisine>_30d (10), price_level_30d
                          the retrieval_v1 features (Feast view user_history_30d); None / NaN /
                          absent -> `defaults[name]` (a user without history: no orders,
                          every cuisine share 1/10), and a flag tells the tower
    user_lat, user_lon    where the user is (float degrees; required)
    request_time          float epoch seconds, UTC (required)

There is no user-id input: an unknown user gets the defaults and still a useful embedding
(the place and time of the request carry most of the signal for a new user).

Restaurant tower (run at training time for every restaurant; its output is stored in the
artifact as restaurant_embeddings.npy): `build_restaurant_inputs` of the restaurant
directory (restaurant_id, lat, lon, cuisine, price_level, opens_hour, closes_hour).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from models.geo import haversine_km
from models.marketplace import DELIVERY_RADIUS_KM, is_open
from models.ranker.features import (
    CUISINES,
    TASTE_FEATURES,
    USER_FEATURES,
    city_xy,
    cuisine_codes,
    float_column,
    required_column,
    restaurant_bucket,
    time_features,
)

FEATURE_SERVICE = "retrieval_v1"
EMBEDDING_DIM = 32

USER_FEATURE_NAMES = [
    *[f"log_{name}" for name in TASTE_FEATURES],  # log(0.2 + 10 * share): taste acts multiplicatively
    # orders_30d / feed_sessions_30d are not inputs: the simulated history is shorter than 30
    # days, so they grow with the calendar (see models/ranker/features.py)
    "price_level_30d",
    "user_history_missing",
    "user_north_km",
    "user_east_km",
    "user_radius_sq",
    "hour_sin1", "hour_cos1", "hour_sin2", "hour_cos2", "hour_sin3", "hour_cos3",
    "dow_sin",
    "dow_cos",
    "weekend",
]
N_USER_DENSE = len(USER_FEATURE_NAMES)

RESTAURANT_FEATURE_NAMES = [
    *[f"cuisine_{c}" for c in CUISINES],
    *[f"price_{level}" for level in (1, 2, 3, 4)],
    "north_km",
    "east_km",
    "radius_sq",
    "opens_hour",
    "closes_hour",
]
N_RESTAURANT_DENSE = len(RESTAURANT_FEATURE_NAMES)
RESTAURANT_COLUMNS = ["restaurant_id", "lat", "lon", "cuisine", "price_level", "opens_hour", "closes_hour"]


def user_defaults() -> dict[str, float]:
    """Defaults = the values the nightly job writes for a user without any history."""
    from models.ranker.features import no_history_defaults

    defaults = no_history_defaults(conversion=0.0)
    return {name: defaults[name] for name in USER_FEATURES}


def build_user_inputs(columns: Mapping[str, Sequence | np.ndarray], defaults: Mapping[str, float]) -> dict[str, np.ndarray]:
    """ONNX input {"user_dense": float32 [N, N_USER_DENSE]} of the user tower (module doc)."""
    for name in USER_FEATURES:
        if name not in defaults:
            raise ValueError(f"defaults has no value for {name!r}: pass the manifest's feature_defaults")
    lat = required_column(columns, "user_lat")
    n = len(lat)
    lon, request_time = required_column(columns, "user_lon", n), required_column(columns, "request_time", n)
    stat = {name: float_column(columns, name, n, float(defaults[name])) for name in USER_FEATURES}
    north, east = city_xy(lat, lon)
    parts = [
        *[np.log(0.2 + 10.0 * np.clip(stat[name][0], 0.0, 1.0)) for name in TASTE_FEATURES],
        stat["price_level_30d"][0],
        stat["orders_30d"][1].astype(np.float64),
        north,
        east,
        north**2 + east**2,
        *time_features(request_time),
    ]
    dense = np.empty((n, N_USER_DENSE), dtype=np.float32)
    for i, part in enumerate(parts):
        dense[:, i] = part
    return {"user_dense": dense}


def build_restaurant_inputs(restaurants: Mapping[str, Sequence | np.ndarray]) -> dict[str, np.ndarray]:
    """Restaurant tower inputs {"restaurant_dense" f32 [R, D], "restaurant_bucket" i64 [R]}."""
    missing = [c for c in RESTAURANT_COLUMNS if c not in restaurants]
    if missing:
        raise ValueError(f"restaurant directory lacks columns {missing}")
    bucket = restaurant_bucket(np.asarray(restaurants["restaurant_id"]))
    n = len(bucket)
    codes = cuisine_codes(list(restaurants["cuisine"]), n)
    price = np.asarray(restaurants["price_level"], dtype=np.int64)
    north, east = city_xy(np.asarray(restaurants["lat"]), np.asarray(restaurants["lon"]))
    dense = np.zeros((n, N_RESTAURANT_DENSE), dtype=np.float32)
    known = codes >= 0
    dense[np.flatnonzero(known), codes[known]] = 1.0
    in_range = (price >= 1) & (price <= 4)
    dense[np.flatnonzero(in_range), len(CUISINES) + price[in_range] - 1] = 1.0
    base = len(CUISINES) + 4
    dense[:, base] = north
    dense[:, base + 1] = east
    dense[:, base + 2] = north**2 + east**2
    dense[:, base + 3] = np.asarray(restaurants["opens_hour"], dtype=np.float64)
    dense[:, base + 4] = np.asarray(restaurants["closes_hour"], dtype=np.float64)
    return {"restaurant_dense": dense, "restaurant_bucket": bucket}


def hard_filter(lat: np.ndarray, lon: np.ndarray, opens_hour: np.ndarray, closes_hour: np.ndarray,
                user_lat: float | np.ndarray, user_lon: float | np.ndarray, request_time: float | np.ndarray,
                radius_km: float) -> np.ndarray:
    """Candidates a user may be shown: open at the request's hour (UTC) and within `radius_km`.

    Scalars give a bool mask [R]; arrays of M requests give [M, R]. Same rule as the simulator
    (`marketplace.is_open` at the whole hour, great-circle distance).
    """
    user_lat, user_lon, request_time = (np.asarray(v, dtype=np.float64) for v in (user_lat, user_lon, request_time))
    hour = np.floor((request_time % 86400.0) / 3600.0)
    km = haversine_km(user_lat[..., None], user_lon[..., None], lat, lon)
    return is_open(opens_hour, closes_hour, hour[..., None]) & (km <= radius_km)


def radius_of_city() -> float:
    """The delivery radius of the marketplace (the hard filter's distance)."""
    return float(DELIVERY_RADIUS_KM)

