"""Online feature reads for serving: one Feast call per request, with TTLs enforced.

Feast's online store returns the last materialized value however old it is; the
point-in-time join that built the training set would have returned nothing past a
view's TTL. `read` applies the same rule, so serving sees what training saw.

A store that does not answer within the deadline counts as down (Redis clients retry
with backoff for seconds, far past a 100 ms budget), and after a failure the store is
left alone for a short cool-down instead of being hammered on every request.

A feed ranks ~100 (user, restaurant) rows that share one user. Asking Feast for the whole
service per row converts the user's values once per row, and again for the on-demand view.
`read_rows` instead reads each entity's views once per distinct key, then runs the service's
on-demand views (python mode) with Feast's own `transform_dict`: the same values, measured
twice as fast (docs/benchmarks.md "Feed"), and tested equal to Feast's answer.

With `cache_s` > 0 a row read less than `cache_s` ago is reused (the feed asks for the same
few hundred restaurants all the time; their features change daily). TTLs and ages are still
judged at read time; a row is at most `cache_s` late to show a new value.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from feast import FeatureStore, OnDemandFeatureView
from feast.errors import FeastError
from redis.exceptions import DataError as RedisDataError
from redis.exceptions import RedisError

from models.artifact import ArtifactError
from serving.errors import InvalidInput

logger = logging.getLogger("ray.serve")


class StoreUnavailable(RuntimeError):
    """The online store could not be read (connection refused, missing tables, timeouts...)."""


class UnreadableEntity(InvalidInput):
    """The store cannot look this entity key up (out of its type's range, wrong type): the request's fault.

    A 422 for the caller, and never a reason to call the store down for everyone else."""


def is_store_fault(exc: BaseException) -> bool:
    """True for what says the store itself is unwell: no connection, no answer, no tables, no memory.

    Anything else raised while reading (a key Feast cannot serialize, a value of the wrong type) is about
    the request, and must not open the breaker that answers every other request from the fallback.
    """
    if isinstance(exc, (OSError, TimeoutError, FeastError)):  # ConnectionError is an OSError
        return True
    if isinstance(exc, RedisError) and not isinstance(exc, RedisDataError):
        return True
    return isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError)) or type(exc) is sqlite3.DatabaseError


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

    def __init__(self, store: FeatureStore, service_name: str, deadline_s: float = 0.1, cooldown_s: float = 1.0,
                 cache_s: float = 0.0, cache_rows: int = 100_000):
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
        self._cache = RowCache(cache_s, cache_rows) if cache_s > 0 else None
        views = {view.name: view for view in store.list_feature_views()}
        on_demand = {view.name: view for view in store.list_on_demand_feature_views()}
        self.view_of: dict[str, str] = {}  # feature of the service -> its view
        self.transforms: list[tuple[OnDemandFeatureView, list[str]]] = []  # with the request fields each needs
        read: dict[str, list[str]] = defaultdict(list)  # stored view -> features to read (incl. on-demand inputs)
        for projection in self.service.feature_view_projections:
            for feature in projection.features:
                if feature.name in self.view_of:
                    raise ArtifactError(f"feature service {service_name!r} has two features named {feature.name!r} "
                                        f"({self.view_of[feature.name]}, {projection.name}); rename one")
                self.view_of[feature.name] = projection.name
            if projection.name in on_demand:
                view = _python_mode(on_demand[projection.name])
                self.transforms.append((view, [field.name for source in view.source_request_sources.values()
                                               for field in source.schema]))
                for source in view.source_feature_view_projections.values():
                    read[source.name] += [f.name for f in source.features]
            else:
                read[projection.name] += [f.name for f in projection.features]
        # per view; on-demand views are computed per request: never stale
        self.ttl_seconds = {name: views[name].ttl.total_seconds() or float("inf") for name in read}
        self.ttl_seconds.update({view.name: float("inf") for view, _ in self.transforms})
        # one Feast call per entity (join keys), each naming only the features it must read
        self.reads: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for view_name, features in read.items():
            keys = tuple(column.name for column in views[view_name].entity_columns)
            self.reads[keys] += [f"{view_name}:{name}" for name in dict.fromkeys(features)]
        self.join_keys = {key for keys in self.reads for key in keys}

    def read_rows(self, entities: list[dict[str, Any]], now: float | None = None) -> FeatureRows:
        """Read many entity rows in one call; values past their view's TTL come back as None."""
        if not self._check(entities):  # Feast fails on an empty read, which would mark a healthy store down
            return self._empty()
        return self._assemble(entities, self._fetch(entities), now)

    async def read_rows_async(self, entities: list[dict[str, Any]], now: float | None = None) -> FeatureRows:
        """`read_rows` for an event loop: the loop goes on serving while the store answers.

        The read runs on the same worker thread either way; awaiting it instead of blocking on it
        also lets Ray's replica see this request as in flight (its autoscaling metric).
        """
        if not self._check(entities):
            return self._empty()
        future = self._submit(entities)
        try:
            raw = await asyncio.wait_for(asyncio.wrap_future(future), self.deadline_s)
        except TimeoutError:  # asyncio.wait_for raises the builtin on Python 3.11+
            raise self._failed(None) from None
        except Exception as exc:
            raise self._failed_on(exc, entities) from exc
        return self._assemble(entities, raw, now)

    def _check(self, entities: list[dict[str, Any]]) -> bool:
        """True when there is something to read; a row missing a join key is the caller's bug."""
        if any(self.join_keys - row.keys() for row in entities):
            raise ValueError(f"every entity row of {self.service.name!r} needs {', '.join(sorted(self.join_keys))}")
        return bool(entities)

    def _empty(self) -> FeatureRows:
        views = set(self.view_of.values())
        return FeatureRows(columns={name: [] for name in self.view_of}, age_seconds={v: [] for v in views},
                           expired={v: [] for v in views})

    def _assemble(self, entities: list[dict[str, Any]], raw: dict[str, list], now: float | None) -> FeatureRows:
        """Columns from Feast's answer: TTLs applied, then the on-demand views computed."""
        now = time.time() if now is None else now
        ages: dict[str, list[float | None]] = {}
        stored: dict[str, list[Any]] = {}  # every feature read, with values past their view's TTL set to None
        for ref in (ref for refs in self.reads.values() for ref in refs):
            view, name = ref.split(":", 1)
            if view not in ages:
                ages[view] = [None if value is None or not stamp else max(0.0, now - stamp)
                              for value, stamp in zip(raw[ref], raw[f"{ref}__ts"])]
            ttl = self.ttl_seconds[view]
            stored[name] = [None if age is not None and age > ttl else value for value, age in zip(raw[ref], ages[view])]
        columns = {name: stored[name] for name in self.view_of if name in stored}
        for transform, fields in self.transforms:  # on-demand views see what training saw: TTLs already applied
            inputs = {**stored, **{field: [row.get(field) for row in entities] for field in fields}}
            outputs = transform.transform_dict(inputs)
            ages[transform.name] = [None] * len(entities)
            columns.update({f.name: [None if _is_nan(value) else value for value in outputs[f.name]]  # as Feast
                            for f in transform.features})
        expired = {view: [age is not None and age > self.ttl_seconds[view] for age in ages[view]]
                   for view in set(self.view_of.values())}
        return FeatureRows(columns=columns, age_seconds={view: ages[view] for view in expired}, expired=expired)

    def warm_up(self, entity: dict[str, Any]) -> None:
        """One read without a deadline: the first loads the registry and opens connections (seconds).

        Call it when the replica starts, so no request pays for it; a store that is down now only logs.
        """
        try:
            self._read_each_entity([entity])
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
        future = self._submit(entities)
        try:
            return future.result(timeout=self.deadline_s)
        except FutureTimeout:
            raise self._failed(None) from None
        except Exception as exc:
            raise self._failed_on(exc, entities) from exc

    def _submit(self, entities: list[dict[str, Any]]) -> Future:
        """Start the Feast read on a worker thread; raises StoreUnavailable while the store is down."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"store failed less than {self.cooldown_s:g} s ago; not retried yet")
        return self._pool.submit(self._read_each_entity, entities)

    def _failed_on(self, exc: Exception, entities: list[dict[str, Any]]) -> Exception:
        """A store fault opens the breaker; a key the store cannot look up is the request's (UnreadableEntity)."""
        if is_store_fault(exc):
            return self._failed(exc)
        keys = sorted(self.join_keys)
        values = {key: [row[key] for row in entities][:3] for key in keys}
        return UnreadableEntity(f"{', '.join(keys)}: the online store cannot look up {values} "
                                f"({exc.__class__.__name__}: {exc})", field=",".join(keys),
                                rule="ids must be integers the store can hold (1 .. 2**63-1)")

    def _failed(self, exc: Exception | None) -> StoreUnavailable:
        """Mark the store down for the cool-down; the error to raise (exc None: the deadline passed)."""
        with self._lock:
            self._down_until = time.monotonic() + self.cooldown_s
        if exc is None:
            return StoreUnavailable(f"no answer within {self.deadline_s * 1000:.0f} ms")
        return StoreUnavailable(f"{exc.__class__.__name__}: {exc}")

    def _read_each_entity(self, entities: list[dict[str, Any]]) -> dict[str, list]:
        """Feast's answer per "view:feature" (and its "__ts"), one call per entity over its distinct keys."""
        raw: dict[str, list] = {}
        for keys, refs in self.reads.items():
            row_keys = [tuple(row[key] for key in keys) for row in entities]
            found = {values: self._cache.get((keys, values)) if self._cache else None for values in row_keys}
            missing = [values for values, row in found.items() if row is None]
            if missing:
                answer = self.store.get_online_features(
                    features=refs, entity_rows=[dict(zip(keys, values)) for values in missing],
                    full_feature_names=True).to_dict(include_event_timestamps=True)
                for i, values in enumerate(missing):
                    found[values] = {ref + suffix: answer[ref.replace(":", "__", 1) + suffix][i]
                                     for ref in refs for suffix in ("", "__ts")}
                    if self._cache:
                        self._cache.put((keys, values), found[values])
            for column in (ref + suffix for ref in refs for suffix in ("", "__ts")):
                raw[column] = [found[values][column] for values in row_keys]
        return raw


class RowCache:
    """Feature rows by entity key, each kept for `max_age_s`; at most `max_rows` (oldest dropped first)."""

    def __init__(self, max_age_s: float, max_rows: int):
        self.max_age_s, self.max_rows = max_age_s, max_rows
        self._rows: dict[Any, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()  # reads run on the feast-read threads

    def get(self, key: Any) -> dict[str, Any] | None:
        """The row read less than max_age_s ago, else None."""
        entry = self._rows.get(key)
        return entry[1] if entry and time.monotonic() - entry[0] < self.max_age_s else None

    def put(self, key: Any, row: dict[str, Any]) -> None:
        """Keep a row just read; the oldest go when the cache is full."""
        with self._lock:
            self._rows.pop(key, None)  # re-inserted at the end: dict order is age order
            self._rows[key] = (time.monotonic(), row)
            while len(self._rows) > self.max_rows:
                del self._rows[next(iter(self._rows))]


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _python_mode(view: OnDemandFeatureView) -> OnDemandFeatureView:
    if view.mode != "python":
        raise ArtifactError(f"on-demand feature view {view.name!r} is in {view.mode!r} mode; serving computes "
                            "on-demand features per request and needs mode='python'")
    return view
