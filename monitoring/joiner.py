"""Joining outcomes to predictions by request_id, the online metrics, and the offline log.

Either half may arrive first: each waits in memory until the other comes or `expire_s` passes
(then it is dropped and counted in `courier_unjoined_expired_total`); at most `max_pending` wait
per kind, the oldest dropped (and counted the same way) beyond that, so predictions no one will
ever report on (a load test's) cannot fill the memory. A joined record updates the
counters of docs/monitoring.md and becomes rows of the offline store, appended as parquet files
`<data_dir>/offline/logged/<table>/part-<UTC time>-<seq>.parquet` in batches.

Table `eta_outcomes`, one row per delivery joined to its /v1/eta prediction:
    request_id str, event_timestamp timestamp[us, UTC] (order time), prediction_ts, outcome_ts
    float (epoch s), model_version str, restaurant_id int64, delivery_lat, delivery_lon float,
    area_id str, eta_minutes float (predicted), delivery_minutes float (delivered, as in
    orders.parquet), true_eta_minutes float (the city's noiseless expectation), error_minutes
    float (delivered - predicted), degraded bool, expired_features str (comma-separated views),
    scenario str, and input_<name> float for each dense input of models.eta.features.FEATURE_NAMES.

Table `feed_impressions`, one row per card shown, joined to its session's outcome:
    request_id str, event_timestamp timestamp[us, UTC] (request time), prediction_ts, outcome_ts
    float, model_version str (ranker), retrieval_version, eta_version str, user_id int64,
    user_lat, user_lon float, cold_start, degraded bool, restaurant_id int64, position int64
    (1-based), p_order float, eta_minutes float (null when none), sponsored bool, ordered int64
    (0/1, as in impressions.parquet), scenario str.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from models.eta.features import FEATURE_NAMES
from monitoring.metrics import MonitorMetrics

logger = logging.getLogger("monitoring")
MAX_BATCHES_KEPT = 50  # rows kept while the offline store cannot be written, in batches
ENDPOINT_OF_OUTCOME = {"delivery": "eta", "feed": "feed"}
TABLE_OF_ENDPOINT = {"eta": "eta_outcomes", "feed": "feed_impressions"}
_TIME = pa.timestamp("us", tz="UTC")
SCHEMAS = {
    "eta_outcomes": pa.schema(
        [("request_id", pa.string()), ("event_timestamp", _TIME), ("prediction_ts", pa.float64()),
         ("outcome_ts", pa.float64()), ("model_version", pa.string()), ("restaurant_id", pa.int64()),
         ("delivery_lat", pa.float64()), ("delivery_lon", pa.float64()), ("area_id", pa.string()),
         ("eta_minutes", pa.float64()), ("delivery_minutes", pa.float64()), ("true_eta_minutes", pa.float64()),
         ("error_minutes", pa.float64()), ("degraded", pa.bool_()), ("expired_features", pa.string()),
         ("scenario", pa.string()), *[(f"input_{name}", pa.float64()) for name in FEATURE_NAMES]]),
    "feed_impressions": pa.schema(
        [("request_id", pa.string()), ("event_timestamp", _TIME), ("prediction_ts", pa.float64()),
         ("outcome_ts", pa.float64()), ("model_version", pa.string()), ("retrieval_version", pa.string()),
         ("eta_version", pa.string()), ("user_id", pa.int64()), ("user_lat", pa.float64()),
         ("user_lon", pa.float64()), ("cold_start", pa.bool_()), ("degraded", pa.bool_()),
         ("restaurant_id", pa.int64()), ("position", pa.int64()), ("p_order", pa.float64()),
         ("eta_minutes", pa.float64()), ("sponsored", pa.bool_()), ("ordered", pa.int64()),
         ("scenario", pa.string())]),
}


def _utc(epoch: Any) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(float(epoch), UTC)


class ParquetLog:
    """Rows of one table, written as a new parquet file per batch (every `batch_rows` or `batch_s`)."""

    def __init__(self, directory: Path, table: str, metrics: MonitorMetrics, batch_rows: int = 1000,
                 batch_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.directory, self.table, self.metrics = Path(directory), table, metrics
        self.schema = SCHEMAS[table]
        self.batch_rows, self.batch_s, self.clock = batch_rows, batch_s, clock
        self.rows: list[dict[str, Any]] = []
        self.first_at: float | None = None  # when the oldest buffered row came
        self.retry_at = 0.0  # after a failed write, no new attempt before this
        self.seq = 0
        self.files: list[Path] = []

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Buffer rows; a full batch is written at once."""
        if rows and not self.rows:
            self.first_at = self.clock()
        self.rows.extend(rows)
        if len(self.rows) >= self.batch_rows and self.clock() >= self.retry_at:
            self.flush()

    def flush_if_due(self) -> None:
        """Write the buffer when its oldest row has waited `batch_s`."""
        if self.rows and self.clock() - self.first_at >= self.batch_s and self.clock() >= self.retry_at:
            self.flush()

    def flush(self) -> Path | None:
        """Write every buffered row as one new file (temp file + rename: readers never see half a file)."""
        if not self.rows:
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.directory / f"part-{stamp}-{self.seq:06d}.parquet"
        tmp = self.directory / f".{path.name}.tmp"  # a dot file: parquet dataset readers skip it
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), tmp)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only volume: keep the rows (bounded) and try again later
            keep = self.batch_rows * MAX_BATCHES_KEPT
            logger.error("cannot write %s (%s); %d rows kept, retried in %g s%s", path, exc, min(len(self.rows), keep),
                         self.batch_s, f", {len(self.rows) - keep} oldest dropped" if len(self.rows) > keep else "")
            self.rows, self.retry_at = self.rows[-keep:], self.clock() + self.batch_s
            return None
        self.metrics.rows_appended.labels(table=self.table).inc(len(self.rows))
        self.seq += 1
        self.rows, self.first_at = [], None
        self.files.append(path)
        return path


class Joiner:
    """Waits for both halves of each request, then counts and logs the pair."""

    def __init__(self, metrics: MonitorMetrics, logged_dir: Path | None, expire_s: float = 3600.0,
                 batch_rows: int = 1000, batch_s: float = 30.0, max_pending: int = 200_000,
                 clock: Callable[[], float] = time.monotonic):
        """`logged_dir`: `<data_dir>/offline/logged` (None: no offline log); `expire_s`: how long
        (wall seconds) a half waits for the other."""
        self.metrics, self.expire_s, self.max_pending, self.clock = metrics, expire_s, max_pending, clock
        # request_id -> (arrival, record); insertion order is arrival order, so expiry pops from the front
        self.predictions: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self.outcomes: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self.waiting = {(endpoint, kind): 0 for endpoint in TABLE_OF_ENDPOINT for kind in ("prediction", "outcome")}
        self.done: OrderedDict[str, float] = OrderedDict()  # recently joined ids: a redelivery is not new
        self.logs = {endpoint: ParquetLog(Path(logged_dir) / table, table, metrics, batch_rows, batch_s, clock)
                     for endpoint, table in TABLE_OF_ENDPOINT.items()} if logged_dir is not None else {}
        self.stats = {"joined": 0, "expired": 0, "duplicates": 0, "ignored": 0}

    def add_prediction(self, record: dict[str, Any]) -> bool:
        """Take in a prediction; True when it completed a pair."""
        if record.get("endpoint") not in TABLE_OF_ENDPOINT:
            self.stats["ignored"] += 1
            return False
        rid = record["request_id"]
        if rid in self.done:
            self.stats["duplicates"] += 1
            return False
        outcome = self._take(self.outcomes, "outcome", rid)
        if outcome is None:
            self._wait(self.predictions, "prediction", record)
            return False
        self._join(record, outcome)
        return True

    def add_outcome(self, record: dict[str, Any]) -> bool:
        """Take in an outcome; True when it completed a pair."""
        if record.get("kind") not in ENDPOINT_OF_OUTCOME:
            self.stats["ignored"] += 1
            return False
        rid = record["request_id"]
        if rid in self.done:
            self.stats["duplicates"] += 1
            return False
        prediction = self._take(self.predictions, "prediction", rid)
        if prediction is None:
            self._wait(self.outcomes, "outcome", record)
            return False
        self._join(prediction, record)
        return True

    def expire(self) -> int:
        """Drop the halves that waited longer than `expire_s`; returns how many."""
        cutoff = self.clock() - self.expire_s
        dropped = 0
        for kind, waiting in (("prediction", self.predictions), ("outcome", self.outcomes)):
            while waiting and next(iter(waiting.values()))[0] <= cutoff:
                self._drop_oldest(waiting, kind)
                dropped += 1
        while self.done and next(iter(self.done.values())) <= cutoff:
            self.done.popitem(last=False)
        for (endpoint, kind), n in self.waiting.items():
            self.metrics.pending.labels(endpoint=endpoint, kind=kind).set(n)
        return dropped

    def flush_if_due(self) -> None:
        """Write batches that have waited long enough."""
        for log in self.logs.values():
            log.flush_if_due()

    def flush(self) -> None:
        """Write everything buffered (on stop)."""
        for log in self.logs.values():
            log.flush()

    def _wait(self, waiting: OrderedDict, kind: str, record: dict[str, Any]) -> None:
        """Keep a half until its other half comes; the oldest goes when too many wait."""
        rid = record["request_id"]
        if rid in waiting:  # the same id again before its pair: the newer one counts
            self._take(waiting, kind, rid)
        waiting[rid] = (self.clock(), record)
        self.waiting[(_endpoint(record), kind)] += 1
        if len(waiting) > self.max_pending:
            self._drop_oldest(waiting, kind)

    def _take(self, waiting: OrderedDict, kind: str, rid: str) -> dict[str, Any] | None:
        entry = waiting.pop(rid, None)
        if entry is None:
            return None
        self.waiting[(_endpoint(entry[1]), kind)] -= 1
        return entry[1]

    def _drop_oldest(self, waiting: OrderedDict, kind: str) -> None:
        _, (_, record) = waiting.popitem(last=False)
        endpoint = _endpoint(record)
        self.waiting[(endpoint, kind)] -= 1
        self.metrics.expired.labels(endpoint=endpoint, kind=kind).inc()
        self.stats["expired"] += 1

    def _join(self, prediction: dict[str, Any], outcome: dict[str, Any]) -> None:
        endpoint = prediction["endpoint"]
        expected = ENDPOINT_OF_OUTCOME[outcome["kind"]]
        if endpoint != expected:  # a request id reused across endpoints: not a pair
            self.stats["ignored"] += 1
            return
        rows = self._eta(prediction, outcome) if endpoint == "eta" else self._feed(prediction, outcome)
        self.done[prediction["request_id"]] = self.clock()
        self.metrics.joined.labels(endpoint=endpoint).inc()
        self.stats["joined"] += 1
        if endpoint in self.logs:
            self.logs[endpoint].append(rows)

    def _eta(self, prediction: dict[str, Any], outcome: dict[str, Any]) -> list[dict[str, Any]]:
        version = str(prediction["model_version"])
        error = float(outcome["delivered_minutes"]) - float(prediction["eta_minutes"])
        m = self.metrics
        m.eta_outcomes.labels(model_version=version).inc()
        m.eta_error.labels(model_version=version).inc(error)
        m.eta_abs_error.labels(model_version=version).inc(abs(error))
        m.eta_squared_error.labels(model_version=version).inc(error * error)
        inputs = prediction.get("inputs") or {}
        return [{
            "request_id": prediction["request_id"], "event_timestamp": _utc(prediction.get("order_time")),
            "prediction_ts": prediction.get("ts"), "outcome_ts": outcome.get("ts"), "model_version": version,
            "restaurant_id": prediction.get("restaurant_id"), "delivery_lat": prediction.get("delivery_lat"),
            "delivery_lon": prediction.get("delivery_lon"), "area_id": prediction.get("area_id"),
            "eta_minutes": prediction["eta_minutes"], "delivery_minutes": outcome["delivered_minutes"],
            "true_eta_minutes": outcome.get("true_eta_minutes"), "error_minutes": error,
            "degraded": prediction.get("degraded"),
            "expired_features": ",".join(prediction.get("expired_features") or []),
            "scenario": outcome.get("scenario"),
            **{f"input_{name}": inputs.get(name) for name in FEATURE_NAMES},
        }]

    def _feed(self, prediction: dict[str, Any], outcome: dict[str, Any]) -> list[dict[str, Any]]:
        version = str(prediction["model_version"])
        ordered = set(outcome.get("ordered") or [])
        versions = prediction.get("model_versions") or {}
        m = self.metrics
        rows = []
        for card in prediction.get("cards") or []:
            position, took = int(card["position"]), int(card["restaurant_id"] in ordered)
            m.feed_impressions.labels(model_version=version, position=str(position)).inc()
            if took:
                m.feed_orders.labels(model_version=version, position=str(position)).inc()
            if position == 1:
                m.feed_top_predicted.labels(model_version=version).inc(_finite(card.get("p_order")))
                m.feed_top_orders.labels(model_version=version).inc(took)
            rows.append({
                "request_id": prediction["request_id"], "event_timestamp": _utc(prediction.get("request_time")),
                "prediction_ts": prediction.get("ts"), "outcome_ts": outcome.get("ts"), "model_version": version,
                "retrieval_version": versions.get("retrieval"), "eta_version": versions.get("eta"),
                "user_id": prediction.get("user_id"), "user_lat": prediction.get("user_lat"),
                "user_lon": prediction.get("user_lon"), "cold_start": prediction.get("cold_start"),
                "degraded": prediction.get("degraded"), "restaurant_id": card["restaurant_id"],
                "position": position, "p_order": card.get("p_order"), "eta_minutes": card.get("eta_minutes"),
                "sponsored": card.get("sponsored"), "ordered": took, "scenario": outcome.get("scenario"),
            })
        return rows


def _endpoint(record: dict[str, Any]) -> str:
    """"eta" or "feed": a prediction names it, an outcome's kind implies it."""
    return record.get("endpoint") or ENDPOINT_OF_OUTCOME[record["kind"]]


def _finite(value: Any) -> float:
    """A non-negative finite float for a counter (a missing p_order counts as 0)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0
