"""Courier's features, in dependency order: entities -> sources -> views -> services.

The simulator writes the parquet sources (the offline store); `COURIER_DATA_DIR`
moves them (default: `data/` at the project root, `/data` in the chart's jobs).
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, RequestSource
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Bool, Float32, Float64, Int64, String
from feast.value_type import ValueType

DATA_DIR = Path(os.environ.get("COURIER_DATA_DIR", Path(__file__).resolve().parent.parent / "data"))
OFFLINE = DATA_DIR / "offline"

# --- entities -------------------------------------------------------------------------

# A kitchen: its place, its preparation times and how busy it is right now.
restaurant = Entity(name="restaurant", join_keys=["restaurant_id"], value_type=ValueType.INT64,
                    description="A restaurant on the marketplace.")
# A delivery area: the H3 resolution-7 cell of the drop-off point, where couriers are dispatched.
area = Entity(name="area", join_keys=["area_id"], value_type=ValueType.STRING,
              description="H3 resolution-7 cell of a delivery point.")
# A person using the app: their order history and tastes (the feed's personalisation).
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="A user of the marketplace app.")


def _source(table: str) -> FileSource:
    return FileSource(name=f"{table}_source", path=str(OFFLINE / f"{table}.parquet"),
                      timestamp_field="event_timestamp")


# --- views ----------------------------------------------------------------------------

# Where the kitchen is and what it sells; static, so it never expires.
restaurant_profile = FeatureView(
    name="restaurant_profile",
    entities=[restaurant],
    ttl=timedelta(0),
    schema=[
        Field(name="lat", dtype=Float32),
        Field(name="lon", dtype=Float32),
        Field(name="cuisine", dtype=String),
        Field(name="price_level", dtype=Int64),
        Field(name="opens_hour", dtype=Int64),
        Field(name="closes_hour", dtype=Int64),
        Field(name="sponsored", dtype=Bool),  # runs a sponsored campaign: eligible for the feed's ad slots
    ],
    source=_source("restaurants"),
)

# Preparation-time statistics over the trailing 7 days, refreshed daily; older than 7 days is stale.
restaurant_prep_7d = FeatureView(
    name="restaurant_prep_7d",
    entities=[restaurant],
    ttl=timedelta(days=7),
    schema=[
        Field(name="prep_time_mean_7d", dtype=Float32),
        Field(name="prep_time_p90_7d", dtype=Float32),
        Field(name="orders_7d", dtype=Int64),
    ],
    source=_source("restaurant_prep_stats"),
)

# Live kitchen load; a streaming job may push it, and past 15 minutes it means "no recent orders".
restaurant_load_push = PushSource(name="restaurant_load_push", batch_source=_source("restaurant_load"))
restaurant_load_15m = FeatureView(
    name="restaurant_load_15m",
    entities=[restaurant],
    ttl=timedelta(minutes=15),
    schema=[Field(name="open_orders_15m", dtype=Int64)],
    source=restaurant_load_push,
)

# Live courier congestion per delivery area; pushable, and worthless after 15 minutes.
area_congestion_push = PushSource(name="area_congestion_push", batch_source=_source("area_congestion"))
area_congestion_15m = FeatureView(
    name="area_congestion_15m",
    entities=[area],
    ttl=timedelta(minutes=15),
    schema=[
        Field(name="area_orders_15m", dtype=Int64),
        Field(name="couriers_on_shift", dtype=Int64),
        Field(name="congestion_ratio", dtype=Float32),
    ],
    source=area_congestion_push,
)

# --- feed views (issue 3): written daily by the simulator's batch job (models/sessions.py) ---

# The cuisines of models.simulator.CUISINES, repeated so the registry does not import the models.
FEED_CUISINES = ("pizza", "burgers", "sushi", "indian", "thai", "mexican", "salads", "chinese", "italian", "bakery")

# Feed impressions and orders per restaurant over 1 and 7 days, refreshed every midnight from
# past events only; older than 2 days means the nightly job stalled, so it is treated as missing.
restaurant_feed_stats = FeatureView(
    name="restaurant_feed_stats",
    entities=[restaurant],
    ttl=timedelta(days=2),
    schema=[
        Field(name="feed_impressions_1d", dtype=Int64),
        Field(name="feed_orders_1d", dtype=Int64),
        Field(name="feed_impressions_7d", dtype=Int64),
        Field(name="feed_orders_7d", dtype=Int64),
        Field(name="conversion_7d", dtype=Float64),
    ],
    source=_source("restaurant_feed_stats"),
)

# A user's last 30 days, refreshed every midnight for every user: feed sessions, orders, the
# smoothed share of each cuisine among the orders (user x cuisine affinity), mean price level.
user_history_30d = FeatureView(
    name="user_history_30d",
    entities=[user],
    ttl=timedelta(days=2),
    schema=[
        Field(name="feed_sessions_30d", dtype=Int64),
        Field(name="orders_30d", dtype=Int64),
        *[Field(name=f"taste_{cuisine}_30d", dtype=Float64) for cuisine in FEED_CUISINES],
        Field(name="price_level_30d", dtype=Float64),
    ],
    source=_source("user_history"),
)

# Where the user is when the feed is asked for: part of the request, not of any table.
feed_request = RequestSource(
    name="feed_request",
    schema=[Field(name="user_lat", dtype=Float64), Field(name="user_lon", dtype=Float64)],
)


# Request-time features of one (user, restaurant) row: the great-circle distance (same formula
# as models.geo.haversine_km) and the user's taste share of the restaurant's cuisine. Python
# mode: serving asks for ~100 rows per feed and a plain loop costs microseconds, not a DataFrame.
@on_demand_feature_view(
    sources=[restaurant_profile[["lat", "lon", "cuisine"]], user_history_30d, feed_request],
    schema=[Field(name="distance_km", dtype=Float64), Field(name="cuisine_affinity", dtype=Float64)],
    mode="python",
    description="distance_km from the request's user_lat/user_lon; cuisine_affinity = taste_<cuisine>_30d.",
)
def feed_context(inputs: dict) -> dict:
    import math

    # a missing input gives NaN (not None, which Feast cannot type): the model's default then applies
    nan = float("nan")
    distance, affinity = [], []
    for i, (lat, lon, user_lat, user_lon) in enumerate(
            zip(inputs["lat"], inputs["lon"], inputs["user_lat"], inputs["user_lon"])):
        if None in (lat, lon, user_lat, user_lon):
            distance.append(nan)
        else:
            lat1, lon1, lat2, lon2 = map(math.radians, (user_lat, user_lon, lat, lon))
            a = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
            distance.append(2 * 6371.0088 * math.asin(math.sqrt(min(max(a, 0.0), 1.0))))
        shares = inputs.get(f"taste_{inputs['cuisine'][i]}_30d")  # absent for an unknown cuisine
        share = None if shares is None else shares[i]
        affinity.append(nan if share is None else float(share))
    return {"distance_km": distance, "cuisine_affinity": affinity}


# --- feature services -----------------------------------------------------------------

# What the ETA model v1 is trained on and served with; a model artifact names this service.
eta_v1 = FeatureService(
    name="eta_v1",
    features=[
        restaurant_profile[["lat", "lon"]],
        restaurant_prep_7d,
        restaurant_load_15m,
        area_congestion_15m,
    ],
    description="Features of the ETA model, version 1.",
)

# What the retrieval model's user tower v1 needs: the user's history (plus request place and time).
retrieval_v1 = FeatureService(
    name="retrieval_v1",
    features=[user_history_30d],
    description="User features of the two-tower retrieval model, version 1.",
)

# What the feed ranker v1 needs per (user, restaurant) row; feed_context needs user_lat/user_lon
# in every entity row (request data).
ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[
        user_history_30d,
        restaurant_profile[["cuisine", "price_level"]],
        restaurant_prep_7d[["orders_7d"]],
        restaurant_feed_stats,
        feed_context,
    ],
    description="Features of the feed ranker p(order | impression), version 1.",
)

# What the prep-time model v1 needs (models/prep_time: Courier's worked example of adding a model,
# docs/adding-a-model.md): the kitchen's 7-day prep statistics and its live load.
prep_time_v1 = FeatureService(
    name="prep_time_v1",
    features=[restaurant_prep_7d, restaurant_load_15m],
    description="Features of the prep-time model, version 1.",
)

ALL = [restaurant, area, restaurant_profile, restaurant_prep_7d, restaurant_load_push, restaurant_load_15m,
       area_congestion_push, area_congestion_15m, eta_v1,
       user, restaurant_feed_stats, user_history_30d, feed_request, feed_context, retrieval_v1, ranker_v1,
       prep_time_v1]
