"""Courier's features, in dependency order: entities -> sources -> views -> services.

The simulator writes the parquet sources (the offline store); `COURIER_DATA_DIR`
moves them (default: `data/` at the project root, `/data` in the chart's jobs).
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Float32, Int64, String
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

ALL = [restaurant, area, restaurant_profile, restaurant_prep_7d, restaurant_load_push, restaurant_load_15m,
       area_congestion_push, area_congestion_15m, eta_v1]
