"""The city's streaming job: live snapshots into the Feast online store through the push sources.

Every 5 world-minutes the kitchen load of every restaurant and the congestion of every known
delivery area are pushed (`restaurant_load_push`, `area_congestion_push`, online only), the
zeros too, so a kitchen that went quiet does not keep its last load until the TTL. In the
new-restaurants scenario the new kitchens' `restaurant_profile` rows are written as well, so
serving knows them. Event timestamps are the wall clock (UTC) of the snapshot.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from feast import FeatureStore
from feast.data_source import PushMode

from city.world import Snapshot, stamp
from feature_repo.store import open_store, registry_path

LOAD_PUSH = "restaurant_load_push"
CONGESTION_PUSH = "area_congestion_push"
PROFILE_VIEW = "restaurant_profile"
PROFILE_COLUMNS = ["restaurant_id", "lat", "lon", "cuisine", "price_level", "opens_hour", "closes_hour", "sponsored"]


def open_online_store(online: str, data_dir: Path | str, redis: str | None = None,
                      project: str | None = None) -> FeatureStore:
    """The project's feature store (registry under `<data_dir>/feast`), checked to be applied."""
    store = open_store(online, data_dir=Path(data_dir), redis=redis, project=project)
    if not registry_path(store).exists():
        raise FileNotFoundError(f"{registry_path(store)} does not exist: apply the feature repository first "
                                f"(`make features`, or `python -m feature_repo.store --online {online} apply`)")
    return store


class Pusher:
    """Writes the world's live features (and new restaurants' profiles) into one online store."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def push(self, snapshot: Snapshot) -> int:
        """Push one snapshot through both push sources; returns the rows written."""
        when = _event_time(snapshot.ts)
        load = snapshot.load.assign(event_timestamp=when)
        congestion = snapshot.congestion.assign(event_timestamp=when)
        self.store.push(LOAD_PUSH, load, to=PushMode.ONLINE)
        self.store.push(CONGESTION_PUSH, congestion, to=PushMode.ONLINE)
        return len(load) + len(congestion)

    def write_profiles(self, restaurants: pd.DataFrame, ts: float) -> int:
        """Write `restaurant_profile` rows (as of `ts`) for restaurants serving must learn about."""
        rows = restaurants[PROFILE_COLUMNS].assign(event_timestamp=_event_time(ts))
        self.store.write_to_online_store(PROFILE_VIEW, rows)
        return len(rows)


def _event_time(ts: float) -> pd.Timestamp:
    """The UTC event timestamp of epoch seconds, to the microsecond (Feast's resolution; it warns on more)."""
    return stamp(ts).floor("us")
