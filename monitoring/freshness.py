"""Freshness: how old the newest value of each served feature view is in the online store.

Every probe reads, for each stored feature view of the served feature services (on-demand
views are computed per request and never stale), one feature for a sample of entity keys (all
restaurants and areas of the offline tables, up to `max_keys` users) with Feast's event
timestamps, and sets `courier_feature_view_newest_age_seconds{view}` to now - the newest
timestamp (+Inf when no key has a value). Alongside: the view's TTL and its freshness budget,
how old the newest value may get before the pipeline is late: 2 x the push cadence for views fed
by a push source (a missed push is tolerated, two are not), the TTL for batch views, both divided
by the time scale S of a drill. The TTL gauge is the TTL serving enforces, never scaled (serving
judges TTLs on the wall clock whatever the drill's speed).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from feast import PushSource

from monitoring.metrics import MonitorMetrics

logger = logging.getLogger("monitoring")


@dataclass
class ViewProbe:
    """What to read for one view: its join keys and one of its features."""

    name: str
    join_keys: tuple[str, ...]
    feature: str
    ttl_s: float  # +inf: never expires
    pushed: bool  # fed by a push source (live) rather than by materialization (batch)


def served_views(store: Any, services: Iterable[str]) -> list[ViewProbe]:
    """The stored feature views the named feature services read (on-demand views' sources included)."""
    views = {view.name: view for view in store.list_feature_views()}
    on_demand = {view.name: view for view in store.list_on_demand_feature_views()}
    names: dict[str, None] = {}
    for service in services:
        for projection in store.get_feature_service(service).feature_view_projections:
            if projection.name in on_demand:
                names.update(dict.fromkeys(s.name for s in on_demand[projection.name]
                                           .source_feature_view_projections.values()))
            else:
                names[projection.name] = None
    probes = []
    for name in names:
        view = views[name]
        ttl = view.ttl.total_seconds() if view.ttl else 0.0
        pushed = isinstance(view.stream_source, PushSource)
        probes.append(ViewProbe(name, tuple(c.name for c in view.entity_columns), view.features[0].name,
                                ttl or math.inf, pushed))
    return probes


class FreshnessProbe:
    """Reads the newest timestamps of each view and sets the freshness gauges."""

    def __init__(self, store: Any, views: list[ViewProbe], offline_dir: Path, metrics: MonitorMetrics,
                 entity_tables: dict[str, str], push_cadence_s: float = 300.0, time_scale: float = 1.0,
                 max_keys: int = 5000, budgets: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.time):
        """`entity_tables` maps a join key to the offline table whose column of that name lists the
        keys to read; `budgets` overrides the budget (world seconds) of named views."""
        self.store, self.views, self.metrics, self.clock = store, views, metrics, clock
        self.offline_dir, self.entity_tables, self.max_keys = Path(offline_dir), entity_tables, max_keys
        self.keys: dict[str, list[Any]] = {}
        for view in views:
            budget = (budgets or {}).get(view.name, 2 * push_cadence_s if view.pushed else view.ttl_s)
            # Only pushed views run on the city's clock; batch views are refreshed by jobs on the wall clock.
            metrics.view_ttl.labels(view=view.name).set(view.ttl_s)
            metrics.view_budget.labels(view=view.name).set(budget / time_scale if view.pushed else budget)

    def load_keys(self) -> None:
        """The entity keys to read, from the offline tables (re-read now and then: cities grow)."""
        needed = {key for view in self.views for key in view.join_keys}
        for key in needed:
            table = self.entity_tables.get(key)
            if table is None:
                raise ValueError(f"no offline table lists the entity key {key!r}: add it to "
                                 "freshness.entity_tables in monitoring/config.yaml")
            values = pd.read_parquet(self.offline_dir / f"{table}.parquet", columns=[key])[key].dropna().unique()
            if len(values) > self.max_keys:  # a fixed sample: the same keys each probe
                values = np.random.default_rng(0).choice(values, self.max_keys, replace=False)
            self.keys[key] = [v.item() if hasattr(v, "item") else v for v in values]

    def probe(self) -> dict[str, float]:
        """One round: {view: age of its newest value in seconds (+inf: none)}; sets the gauges."""
        if not self.keys:
            self.load_keys()
        ages = {}
        for view in self.views:
            newest = self.newest(view)
            ages[view.name] = math.inf if newest is None else max(0.0, self.clock() - newest)
            self.metrics.view_age.labels(view=view.name).set(ages[view.name])
        return ages

    def newest(self, view: ViewProbe) -> float | None:
        """The newest event timestamp (epoch s) of the view over the sampled keys; None when none has a value."""
        if len(view.join_keys) != 1:
            raise ValueError(f"view {view.name!r} has join keys {view.join_keys}: only single-key views are probed")
        key = view.join_keys[0]
        ref = f"{view.name}:{view.feature}"
        answer = self.store.get_online_features(features=[ref], entity_rows=[{key: k} for k in self.keys[key]],
                                                full_feature_names=True).to_dict(include_event_timestamps=True)
        column = f"{view.name}__{view.feature}"
        stamps = [ts for value, ts in zip(answer[column], answer[f"{column}__ts"]) if value is not None and ts]
        return float(max(stamps)) if stamps else None
