"""Online feature reads for serving: one Feast call per request, with TTLs enforced.

Feast's online store returns the last materialized value however old it is; the
point-in-time join that built the training set would have returned nothing past a
view's TTL. `read` applies the same rule, so serving sees what training saw.

A store that does not answer within the deadline counts as down (Redis clients retry
with backoff for seconds, far past a 100 ms budget), and after a failure the store is
left alone for a short cool-down instead of being hammered on every request.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from feast import FeatureStore

from models.artifact import ArtifactError

logger = logging.getLogger("ray.serve")


class StoreUnavailable(RuntimeError):
    """The online store could not be read (connection refused, missing tables, timeouts...)."""


@dataclass
class FeatureRead:
    """The values of one entity row, how old each view's data is, and which were too old."""

    values: dict[str, Any]
    age_seconds: dict[str, float | None]  # per feature view; None when the view had no row
    expired: list[str] = field(default_factory=list)  # views past their TTL (values set to None)


@dataclass
class FeatureRows:
    """Several entity rows at once: a column per feature, and per view the age of each row."""

    columns: dict[str, list[Any]]  # None where missing or past the TTL
    age_seconds: dict[str, list[float | None]]
    expired: dict[str, list[bool]]


class OnlineFeatures:
    """Reads one feature service for one or many entity rows per call."""

    def __init__(self, store: FeatureStore, service_name: str, deadline_s: float = 0.1, cooldown_s: float = 1.0):
        try:
            self.service = store.get_feature_service(service_name)
        except Exception as exc:  # Feast raises its own not-found types, or registry errors
            raise ArtifactError(
                f"the model was trained with feature service {service_name!r}, which the feature store at "
                f"{store.config.registry.path} does not serve ({exc.__class__.__name__}); run `make features` "
                "or deploy a model trained on a served feature service") from exc
        self.store = store
        self.deadline_s, self.cooldown_s = deadline_s, cooldown_s
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="feast-read")
        self._down_until = 0.0
        self._lock = threading.Lock()
        views = {view.name: view for view in store.list_feature_views()}
        self.ttl_seconds: dict[str, float] = {}  # on-demand views are computed per request: never stale
        self.view_of: dict[str, str] = {}
        for projection in self.service.feature_view_projections:
            ttl = views[projection.name].ttl if projection.name in views else None
            self.ttl_seconds[projection.name] = ttl.total_seconds() if ttl else float("inf")
            for feature in projection.features:
                self.view_of[feature.name] = projection.name

    def read_rows(self, entities: list[dict[str, Any]], now: float | None = None) -> FeatureRows:
        """Read many entity rows in one call; values past their view's TTL come back as None."""
        if not entities:  # Feast fails on an empty read, which would mark a healthy store down
            views = set(self.view_of.values())
            return FeatureRows(columns={name: [] for name in self.view_of}, age_seconds={v: [] for v in views},
                               expired={v: [] for v in views})
        raw = self._fetch(entities)
        now = time.time() if now is None else now
        ages: dict[str, list[float | None]] = {}
        for name, view in self.view_of.items():
            if view in ages:
                continue
            ages[view] = [None if value is None or not stamp else max(0.0, now - stamp)
                          for value, stamp in zip(raw[name], raw.get(f"{name}__ts", [0] * len(entities)))]
        expired = {view: [age is not None and age > self.ttl_seconds[view] for age in row_ages]
                   for view, row_ages in ages.items()}
        columns = {name: [None if gone else value for value, gone in zip(raw[name], expired[view])]
                   for name, view in self.view_of.items()}
        return FeatureRows(columns=columns, age_seconds=ages, expired=expired)

    def warm_up(self, entity: dict[str, Any]) -> None:
        """One read without a deadline: the first loads the registry and opens connections (seconds).

        Call it when the replica starts, so no request pays for it; a store that is down now only logs.
        """
        try:
            self.store.get_online_features(features=self.service, entity_rows=[entity])
        except Exception as exc:  # serving starts anyway and answers from its fallbacks
            logger.warning("online store not readable at start-up (%s: %s); fallbacks will answer",
                           exc.__class__.__name__, exc)

    def read(self, entity: dict[str, Any], now: float | None = None) -> FeatureRead:
        """Read one entity row; values past their view's TTL come back as None and are listed."""
        rows = self.read_rows([entity], now)
        return FeatureRead(values={name: values[0] for name, values in rows.columns.items()},
                           age_seconds={view: ages[0] for view, ages in rows.age_seconds.items()},
                           expired=sorted(view for view, flags in rows.expired.items() if flags[0]))

    def _fetch(self, entities: list[dict[str, Any]]) -> dict[str, list]:
        """The Feast call, bounded by the deadline; raises StoreUnavailable while the store is down."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"store failed less than {self.cooldown_s:g} s ago; not retried yet")
        future = self._pool.submit(lambda: self.store.get_online_features(
            features=self.service, entity_rows=entities).to_dict(include_event_timestamps=True))
        try:
            return future.result(timeout=self.deadline_s)
        except FutureTimeout:
            self._mark_down()
            raise StoreUnavailable(f"no answer within {self.deadline_s * 1000:.0f} ms") from None
        except Exception as exc:  # any backend failure means the same thing to the caller
            self._mark_down()
            raise StoreUnavailable(f"{exc.__class__.__name__}: {exc}") from exc

    def _mark_down(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.cooldown_s
