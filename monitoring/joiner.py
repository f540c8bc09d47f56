"""Joining outcomes to predictions by request_id, the online metrics, and the offline log.

Either half may arrive first: each waits in memory until the other comes or `expire_s` passes
(then it is dropped and counted in `courier_unjoined_expired_total`); at most `max_pending` wait
per kind, the oldest dropped (and counted the same way) beyond that, so predictions no one will
ever report on (a load test's) cannot fill the memory. A joined record updates the
counters of docs/monitoring.md and becomes rows of the offline store, appended as parquet files
`<data_dir>/offline/logged/<table>/part-<UTC time>-<seq>.parquet` in batches.

A request has up to two prediction records: the answer the caller got (`variant` "champion" or
"challenger"; records without a variant, logged before variants, count as "champion") and, when
the request was shadowed, the challenger's answer (`variant` "shadow", logged and never
returned). Each record joined to the outcome becomes rows of its own, so a shadowed delivery is
two rows of `eta_outcomes` with the same request_id: the paired comparison of monitoring/analysis.py.

Table `eta_outcomes`, one row per prediction record of a delivery (its /v1/eta answer, and its
shadow answer if any):
    request_id str, event_timestamp timestamp[us, UTC] (order time), prediction_ts, outcome_ts
    float (epoch s), model_version str, variant str (champion|challenger|shadow), restaurant_id int64, delivery_lat, delivery_lon float,
    area_id str, eta_minutes float (predicted), delivery_minutes float (delivered, as in
    orders.parquet), true_eta_minutes float (the city's noiseless expectation), error_minutes
    float (delivered - predicted), degraded bool, expired_features str (comma-separated views),
    scenario str, and input_<name> float for each dense input of models.eta.features.FEATURE_NAMES.

Table `feed_impressions`, one row per card shown, joined to its session's outcome (and, for a
shadowed session, one more row per card shown with the challenger's p_order, variant "shadow",
at the position the page showed it):
    request_id str, event_timestamp timestamp[us, UTC] (request time), prediction_ts, outcome_ts
    float, model_version str (ranker), variant str (champion|challenger|shadow), retrieval_version, eta_version str, user_id int64,
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
         ("outcome_ts", pa.float64()), ("model_version", pa.string()), ("variant", pa.string()),
         ("restaurant_id", pa.int64()),
         ("delivery_lat", pa.float64()), ("delivery_lon", pa.float64()), ("area_id", pa.string()),
         ("eta_minutes", pa.float64()), ("delivery_minutes", pa.float64()), ("true_eta_minutes", pa.float64()),
         ("error_minutes", pa.float64()), ("degraded", pa.bool_()), ("expired_features", pa.string()),
         ("scenario", pa.string()), *[(f"input_{name}", pa.float64()) for name in FEATURE_NAMES]]),
    "feed_impressions": pa.schema(
        [("request_id", pa.string()), ("event_timestamp", _TIME), ("prediction_ts", pa.float64()),
         ("outcome_ts", pa.float64()), ("model_version", pa.string()), ("variant", pa.string()),
         ("retrieval_version", pa.string()),
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
    """Waits for both halves of each request, then counts and logs the pair.

    A request has one outcome and up to two prediction records: the primary (the answer the caller
    got, `variant` "champion" or "challenger") and, when the request was shadowed, the challenger's
    record (`variant` "shadow", logged after the answer went out). Each prediction record joined to
    the outcome becomes its own rows. The shadow record may come after the outcome was joined to the
    primary, so a joined outcome (with the primary, for the request's context) is kept `late_s` more.
    """

    def __init__(self, metrics: MonitorMetrics, logged_dir: Path | None, expire_s: float = 3600.0,
                 batch_rows: int = 1000, batch_s: float = 30.0, max_pending: int = 200_000,
                 clock: Callable[[], float] = time.monotonic, late_s: float | None = None):
        """`logged_dir`: `<data_dir>/offline/logged` (None: no offline log); `expire_s`: how long
        (wall seconds) a half waits for the other; `late_s`: how long a joined outcome waits for a
        prediction record of the same request still to come (a shadow; default min(expire_s, 600))."""
        self.metrics, self.expire_s, self.max_pending, self.clock = metrics, expire_s, max_pending, clock
        self.late_s = min(expire_s, 600.0) if late_s is None else late_s
        # request_id -> (arrival, {slot: record}); slot "primary" | "shadow". Insertion order is
        # arrival order, so expiry pops from the front.
        self.predictions: OrderedDict[str, tuple[float, dict[str, dict]]] = OrderedDict()
        self.outcomes: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self.waiting = {(endpoint, kind): 0 for endpoint in TABLE_OF_ENDPOINT for kind in ("prediction", "outcome")}
        # recently joined ids and the slots joined: a redelivery is not new, a late shadow still joins
        self.done: OrderedDict[str, tuple[float, set[str]]] = OrderedDict()
        # request_id -> (joined at, outcome, primary record or None), kept late_s for late records
        self.recent: OrderedDict[str, tuple[float, dict, dict | None]] = OrderedDict()
        self.logs = {endpoint: ParquetLog(Path(logged_dir) / table, table, metrics, batch_rows, batch_s, clock)
                     for endpoint, table in TABLE_OF_ENDPOINT.items()} if logged_dir is not None else {}
        self.stats = {"joined": 0, "expired": 0, "duplicates": 0, "ignored": 0}

    def add_prediction(self, record: dict[str, Any]) -> bool:
        """Take in a prediction record (primary or shadow); True when it was joined to its outcome."""
        if record.get("endpoint") not in TABLE_OF_ENDPOINT:
            self.stats["ignored"] += 1
            return False
        rid, slot = record["request_id"], _slot(record)
        if rid in self.done:
            if slot in self.done[rid][1]:
                self.stats["duplicates"] += 1
                return False
            late = self.recent.get(rid)
            if late is None:  # its outcome was joined too long ago: the record can no longer be paired
                self.metrics.expired.labels(endpoint=record["endpoint"], kind="prediction").inc()
                self.stats["expired"] += 1
                return False
            _, outcome, primary = late
            self._join({slot: record}, outcome, context=primary)
            return True
        outcome = self._take_outcome(rid)
        if outcome is None:
            self._wait_prediction(rid, slot, record)
            return False
        self._join({slot: record}, outcome)
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
        entry = self.predictions.pop(rid, None)
        if entry is None:
            self._wait_outcome(record)
            return False
        records = entry[1]
        self.waiting[(_endpoint(next(iter(records.values()))), "prediction")] -= len(records)
        self._join(records, record)
        return True

    def expire(self) -> int:
        """Drop the halves that waited longer than `expire_s`; returns how many."""
        now = self.clock()
        cutoff = now - self.expire_s
        dropped = 0
        while self.predictions and next(iter(self.predictions.values()))[0] <= cutoff:
            dropped += self._drop_oldest_prediction()
        while self.outcomes and next(iter(self.outcomes.values()))[0] <= cutoff:
            self._drop_oldest_outcome()
            dropped += 1
        while self.done and next(iter(self.done.values()))[0] <= cutoff:
            self.done.popitem(last=False)
        while self.recent and next(iter(self.recent.values()))[0] <= now - self.late_s:
            self.recent.popitem(last=False)
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

    def _wait_prediction(self, rid: str, slot: str, record: dict[str, Any]) -> None:
        """Keep a prediction record until its outcome comes; the oldest request goes when too many wait."""
        entry = self.predictions.get(rid)
        if entry is None:
            entry = self.predictions[rid] = (self.clock(), {})
        if slot not in entry[1]:  # the same slot again before its pair: the newer one counts
            self.waiting[(_endpoint(record), "prediction")] += 1
        entry[1][slot] = record
        if len(self.predictions) > self.max_pending:
            self._drop_oldest_prediction()

    def _wait_outcome(self, record: dict[str, Any]) -> None:
        rid = record["request_id"]
        if self._take_outcome(rid) is not None:  # the same id again before its pair: the newer one counts
            pass
        self.outcomes[rid] = (self.clock(), record)
        self.waiting[(_endpoint(record), "outcome")] += 1
        if len(self.outcomes) > self.max_pending:
            self._drop_oldest_outcome()

    def _take_outcome(self, rid: str) -> dict[str, Any] | None:
        entry = self.outcomes.pop(rid, None)
        if entry is None:
            return None
        self.waiting[(_endpoint(entry[1]), "outcome")] -= 1
        return entry[1]

    def _drop_oldest_prediction(self) -> int:
        _, (_, records) = self.predictions.popitem(last=False)
        endpoint = _endpoint(next(iter(records.values())))
        self.waiting[(endpoint, "prediction")] -= len(records)
        self.metrics.expired.labels(endpoint=endpoint, kind="prediction").inc(len(records))
        self.stats["expired"] += len(records)
        return len(records)

    def _drop_oldest_outcome(self) -> None:
        _, (_, record) = self.outcomes.popitem(last=False)
        endpoint = _endpoint(record)
        self.waiting[(endpoint, "outcome")] -= 1
        self.metrics.expired.labels(endpoint=endpoint, kind="outcome").inc()
        self.stats["expired"] += 1

    def _join(self, records: dict[str, dict[str, Any]], outcome: dict[str, Any],
              context: dict[str, Any] | None = None) -> None:
        """Rows for each prediction record of one request; `context`: the primary joined earlier."""
        rid = outcome["request_id"]
        primary = records.get("primary") or context
        rows: dict[str, list[dict[str, Any]]] = {}
        for slot in ("primary", "shadow"):
            record = records.get(slot)
            if record is None:
                continue
            endpoint = record["endpoint"]
            if endpoint != ENDPOINT_OF_OUTCOME[outcome["kind"]]:  # a request id reused across endpoints
                self.stats["ignored"] += 1
                continue
            answer = record
            if slot == "shadow":  # the challenger's record names its answer; the request is the primary's
                record = {**(primary or {}), **{k: v for k, v in record.items() if v is not None}}
                record["variant"] = "shadow"
            made = self._eta(record, outcome) if endpoint == "eta" else self._feed(record, outcome, primary, answer)
            rows.setdefault(endpoint, []).extend(made)
            self.metrics.joined.labels(endpoint=endpoint).inc()
            self.stats["joined"] += 1
        seen = self.done.get(rid, (self.clock(), set()))[1] | set(records)
        self.done[rid] = (self.clock(), seen)
        if "shadow" not in seen:  # a shadow record may still come: keep what it needs
            self.recent[rid] = (self.clock(), outcome, primary)
        else:
            self.recent.pop(rid, None)
        for endpoint, made in rows.items():
            if endpoint in self.logs:
                self.logs[endpoint].append(made)

    def _eta(self, prediction: dict[str, Any], outcome: dict[str, Any]) -> list[dict[str, Any]]:
        version, variant = str(prediction["model_version"]), _variant(prediction)
        error = float(outcome["delivered_minutes"]) - float(prediction["eta_minutes"])
        m, labels = self.metrics, {"model_version": version, "variant": variant}
        m.eta_outcomes.labels(**labels).inc()
        m.eta_error.labels(**labels).inc(error)
        m.eta_abs_error.labels(**labels).inc(abs(error))
        m.eta_squared_error.labels(**labels).inc(error * error)
        inputs = prediction.get("inputs") or {}
        return [{
            "request_id": prediction["request_id"], "event_timestamp": _utc(prediction.get("order_time")),
            "prediction_ts": prediction.get("ts"), "outcome_ts": outcome.get("ts"), "model_version": version,
            "variant": variant,
            "restaurant_id": prediction.get("restaurant_id"), "delivery_lat": prediction.get("delivery_lat"),
            "delivery_lon": prediction.get("delivery_lon"), "area_id": prediction.get("area_id"),
            "eta_minutes": prediction["eta_minutes"], "delivery_minutes": outcome["delivered_minutes"],
            "true_eta_minutes": outcome.get("true_eta_minutes"), "error_minutes": error,
            "degraded": prediction.get("degraded"),
            "expired_features": ",".join(prediction.get("expired_features") or []),
            "scenario": outcome.get("scenario"),
            **{f"input_{name}": inputs.get(name) for name in FEATURE_NAMES},
        }]

    def _feed(self, prediction: dict[str, Any], outcome: dict[str, Any], primary: dict[str, Any] | None,
              answer: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per card shown. A shadow row is the challenger's p_order for a card the caller was
        shown (at the position the champion's page gave it): conversion belongs to the page the user
        saw, so shadow rows count only towards the top slot's calibration, not towards conversion."""
        version, variant = str(prediction["model_version"]), _variant(prediction)
        ordered = set(outcome.get("ordered") or [])
        versions = prediction.get("model_versions") or {}
        m = self.metrics
        shadow = variant == "shadow"
        rows = []
        for card in _cards(answer, primary) if shadow else prediction.get("cards") or []:
            position, took = int(card["position"]), int(card["restaurant_id"] in ordered)
            if not shadow:
                m.feed_impressions.labels(model_version=version, variant=variant, position=str(position)).inc()
                if took:
                    m.feed_orders.labels(model_version=version, variant=variant, position=str(position)).inc()
            if position == 1:
                m.feed_top_predicted.labels(model_version=version, variant=variant).inc(_finite(card.get("p_order")))
                m.feed_top_orders.labels(model_version=version, variant=variant).inc(took)
            rows.append({
                "request_id": prediction["request_id"], "event_timestamp": _utc(prediction.get("request_time")),
                "prediction_ts": prediction.get("ts"), "outcome_ts": outcome.get("ts"), "model_version": version,
                "variant": variant,
                "retrieval_version": versions.get("retrieval"), "eta_version": versions.get("eta"),
                "user_id": prediction.get("user_id"), "user_lat": prediction.get("user_lat"),
                "user_lon": prediction.get("user_lon"), "cold_start": prediction.get("cold_start"),
                "degraded": prediction.get("degraded"), "restaurant_id": card["restaurant_id"],
                "position": position, "p_order": card.get("p_order"), "eta_minutes": card.get("eta_minutes"),
                "sponsored": card.get("sponsored"), "ordered": took, "scenario": outcome.get("scenario"),
            })
        return rows


def _slot(record: dict[str, Any]) -> str:
    """"shadow" for the challenger's shadow record of a request, "primary" for the answer given."""
    return "shadow" if record.get("variant") == "shadow" else "primary"


def _variant(record: dict[str, Any]) -> str:
    """The record's variant; a record without one (logged before variants existed) was the champion's."""
    variant = record.get("variant")
    return str(variant) if variant else "champion"


def _cards(shadow: dict[str, Any], primary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The shown cards with the challenger's p_order: from the shadow record's `cards`, or its
    `restaurant_ids` + `p_order` lists; each at the position the page showed it (primary's cards)."""
    cards = None
    if shadow.get("restaurant_ids") is not None:
        cards = [{"restaurant_id": r, "p_order": p} for r, p in zip(shadow["restaurant_ids"], shadow.get("p_order")
                                                                       or [], strict=False)]
    if cards is None:
        cards = shadow.get("cards") or []
    shown = {int(c["restaurant_id"]): c for c in (primary or {}).get("cards") or []}
    out = []
    for i, card in enumerate(cards, start=1):
        page = shown.get(int(card["restaurant_id"]), {})
        out.append({"restaurant_id": int(card["restaurant_id"]), "p_order": card.get("p_order"),
                    "position": card.get("position") or page.get("position") or i,
                    "eta_minutes": page.get("eta_minutes", card.get("eta_minutes")),
                    "sponsored": page.get("sponsored", card.get("sponsored"))})
    return out


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
