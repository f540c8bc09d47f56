"""Training and evaluation sets of the retrieval model: orders with point-in-time user features.

Positives are every order the city saw: the order stream (orders.parquet, the user at the
drop-off point) and feed orders (ordered impressions, the user where the feed was opened).
Held-out evaluation uses the feed orders of later days only; the user features of each
order are those of `retrieval_v1` at its time (get_historical_features).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models.eta.data import SimulationWindow
from models.ranker.features import USER_FEATURES
from models.retrieval.features import FEATURE_SERVICE, RESTAURANT_COLUMNS

ORDER_COLUMNS = ["user_id", "restaurant_id", "event_timestamp", "user_lat", "user_lon", "source"]


def load_orders(data_dir: Path, window: SimulationWindow) -> pd.DataFrame:
    """Orders of both kinds in [start, end), sorted by time, with `source` "orders" or "feed"."""
    offline = Path(data_dir) / "offline"
    for name in ("orders", "impressions"):
        if not (offline / f"{name}.parquet").exists():
            raise FileNotFoundError(f"{offline / f'{name}.parquet'} missing: run `make data`")
    stream = pd.read_parquet(offline / "orders.parquet",
                             columns=["user_id", "restaurant_id", "event_timestamp", "delivery_lat", "delivery_lon"])
    stream = stream.rename(columns={"delivery_lat": "user_lat", "delivery_lon": "user_lon"}).assign(source="orders")
    feed = pd.read_parquet(offline / "impressions.parquet",
                           columns=["user_id", "restaurant_id", "event_timestamp", "user_lat", "user_lon", "ordered"])
    feed = feed[feed["ordered"] == 1].drop(columns="ordered").assign(source="feed")
    both = pd.concat([stream, feed], ignore_index=True)[ORDER_COLUMNS]
    keep = (both["event_timestamp"] >= window.start) & (both["event_timestamp"] < window.end)
    both = both[keep].sort_values(["event_timestamp", "source"], kind="stable").reset_index(drop=True)
    both.insert(0, "row_id", np.arange(len(both), dtype=np.int64))
    return both


def with_user_features(store, orders: pd.DataFrame) -> pd.DataFrame:
    """Orders joined point-in-time with the retrieval_v1 features, in the orders' order."""
    joined = store.get_historical_features(
        entity_df=orders[["row_id", "user_id", "event_timestamp"]],
        features=store.get_feature_service(FEATURE_SERVICE)).to_df()
    return orders.merge(joined[["row_id", *USER_FEATURES]], on="row_id", how="left", validate="one_to_one")


def restaurant_directory(data_dir: Path, until: pd.Timestamp | None = None) -> pd.DataFrame:
    """The latest row of every restaurant (known at `until`), sorted by id."""
    table = pd.read_parquet(Path(data_dir) / "offline" / "restaurants.parquet")
    if until is not None:
        table = table[table["event_timestamp"] <= until]
    table = table.sort_values("event_timestamp").drop_duplicates("restaurant_id", keep="last")
    return table[RESTAURANT_COLUMNS + ["event_timestamp"]].sort_values("restaurant_id").reset_index(drop=True)


def popularity_by_day(data_dir: Path, restaurant_ids: np.ndarray) -> pd.DataFrame:
    """Orders of the last 7 days per restaurant, as of each daily snapshot (0 when absent).

    From restaurant_prep_stats (the offline source of the `restaurant_prep_7d` view): rows are
    snapshot days, columns restaurant ids. The popularity baseline reads the row at or before
    each held-out order, i.e. only the past.
    """
    stats = pd.read_parquet(Path(data_dir) / "offline" / "restaurant_prep_stats.parquet",
                            columns=["restaurant_id", "event_timestamp", "orders_7d"])
    table = stats.pivot_table(index="event_timestamp", columns="restaurant_id", values="orders_7d", aggfunc="last")
    return table.reindex(columns=restaurant_ids).fillna(0.0).sort_index()


def truth(data_dir: Path, restaurants: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(restaurants with true_popularity in the index's row order, users with true tastes by user_id).

    Truth columns, for the evaluation's oracle only; never model inputs.
    """
    offline = Path(data_dir) / "offline"
    full = pd.read_parquet(offline / "restaurants.parquet").drop_duplicates("restaurant_id", keep="last")
    rows = full.set_index("restaurant_id").loc[restaurants["restaurant_id"]].reset_index()
    users = pd.read_parquet(offline / "users.parquet").set_index("user_id")
    return rows, users
