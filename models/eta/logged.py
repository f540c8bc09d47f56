"""The live city's joined ETA rows as training rows: what serving saw, and what was delivered.

The monitor's joiner appends `<data_dir>/offline/logged/eta_outcomes/*.parquet` (monitoring/joiner.py):
one row per delivery joined to its /v1/eta prediction, with the served dense inputs as
`input_<name>` (models.eta.features.FEATURE_NAMES) and the delivered minutes as `delivery_minutes`.
`logged_frame` turns them into rows shaped like the point-in-time training frame (models/eta/data.py),
so they go through the same `build_inputs` as every other row: the restaurant's place from the
restaurant directory, the live statistics recovered from the served inputs (log1p undone; a row
served without preparation statistics gets them missing again, as the join would have left them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models.eta.features import PREP_FEATURES

LOGGED_TABLE = Path("offline") / "logged" / "eta_outcomes"
# served input -> (training-frame column, inverse of the transform build_inputs applied)
_RECOVER = {
    "prep_time_mean_7d": ("prep_time_mean_7d", None),
    "prep_time_p90_7d": ("prep_time_p90_7d", None),
    "log1p_orders_7d": ("orders_7d", np.expm1),
    "open_orders_15m": ("open_orders_15m", None),
    "log1p_area_orders_15m": ("area_orders_15m", np.expm1),
    "log1p_couriers_on_shift": ("couriers_on_shift", np.expm1),
    "congestion_ratio": ("congestion_ratio", None),
}
FRAME_COLUMNS = ["order_id", "event_timestamp", "restaurant_id", "area_id", "delivery_lat", "delivery_lon",
                 "delivery_minutes", "true_eta_minutes", "lat", "lon", *[c for c, _ in _RECOVER.values()]]


def logged_dir(data_dir: Path) -> Path:
    """Where the joiner writes the ETA outcome rows."""
    return Path(data_dir) / LOGGED_TABLE


def load_logged(data_dir: Path) -> pd.DataFrame:
    """Every joined ETA row the live city produced (empty when there are none)."""
    directory = logged_dir(data_dir)
    files = sorted(directory.glob("part-*.parquet")) if directory.exists() else []
    if not files:
        return pd.DataFrame()
    rows = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if "variant" in rows:  # a shadowed delivery also has the challenger's row: one delivery, one training row
        rows = rows[rows["variant"] != "shadow"]
    return rows.drop_duplicates("request_id", keep="last") if "request_id" in rows else rows


def logged_frame(rows: pd.DataFrame, restaurants: pd.DataFrame) -> pd.DataFrame:
    """Logged rows as training-frame rows (module doc); rows with an unknown restaurant or no label are dropped."""
    if rows.empty:
        return pd.DataFrame(columns=FRAME_COLUMNS)
    places = (restaurants.sort_values("event_timestamp").drop_duplicates("restaurant_id", keep="last")
              .set_index("restaurant_id")[["lat", "lon"]])
    rows = rows[rows["restaurant_id"].isin(places.index) & np.isfinite(rows["delivery_minutes"])]
    frame = pd.DataFrame({
        "order_id": -1 - np.arange(len(rows), dtype=np.int64),  # negative: never an offline order id
        "event_timestamp": pd.to_datetime(rows["event_timestamp"], utc=True).to_numpy(),
        "restaurant_id": rows["restaurant_id"].to_numpy(dtype=np.int64),
        "area_id": rows["area_id"].to_numpy(dtype=object),
        "delivery_lat": rows["delivery_lat"].to_numpy(dtype=np.float64),
        "delivery_lon": rows["delivery_lon"].to_numpy(dtype=np.float64),
        "delivery_minutes": rows["delivery_minutes"].to_numpy(dtype=np.float64),
        "true_eta_minutes": rows["true_eta_minutes"].to_numpy(dtype=np.float64),
        "lat": places.loc[rows["restaurant_id"], "lat"].to_numpy(),
        "lon": places.loc[rows["restaurant_id"], "lon"].to_numpy(),
    })
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    for served, (column, inverse) in _RECOVER.items():
        values = rows[f"input_{served}"].to_numpy(dtype=np.float64)
        frame[column] = inverse(values) if inverse is not None else values
    missing = rows["input_prep_stats_missing"].to_numpy(dtype=np.float64) > 0.5
    frame.loc[missing, PREP_FEATURES] = np.nan  # served with defaults: missing, as in the join
    return frame.reset_index(drop=True)
