"""The monitor as one object: streams -> join, metrics, offline log; drift; freshness.

    monitor = Monitor.build(data_dir=Path("data"), time_scale=60)   # artifact root from the serve config
    monitor.start(port=9108) # a consumer thread, a freshness thread, /metrics
    ...
    monitor.stop()           # flushes the offline log, joins the threads

`python -m monitoring` runs the same object in the foreground (monitoring/__main__.py).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import redis
import yaml
from pydantic import BaseModel, ConfigDict, Field

from monitoring.drift import DriftMonitor
from monitoring.joiner import Joiner
from monitoring.metrics import MonitorMetrics
from monitoring.reference import Artifacts
from monitoring.streams import StreamConsumer, connect

logger = logging.getLogger("monitoring")
CONFIG = Path(__file__).resolve().parent / "config.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamSettings(_Strict):
    predictions: str = Field("courier:predictions", min_length=1)
    outcomes: str = Field("courier:outcomes", min_length=1)
    group: str = Field("courier-monitor", min_length=1)
    start_id: str = "0"
    read_count: int = Field(500, gt=0)
    block_ms: int = Field(500, ge=0)


class JoinSettings(_Strict):
    expire_world_s: float = Field(10800, gt=0)
    max_pending: int = Field(200_000, gt=0)


class OfflineLogSettings(_Strict):
    batch_rows: int = Field(1000, gt=0)
    batch_s: float = Field(30, gt=0)


class DriftSettings(_Strict):
    window: int = Field(1000, gt=1)
    min_count: int = Field(200, gt=0)
    every_s: float = Field(15, gt=0)
    max_versions: int = Field(4, gt=0)
    eta_features: list[str] = Field(default_factory=list)


class FreshnessSettings(_Strict):
    every_s: float = Field(15, gt=0)
    push_cadence_world_s: float = Field(300, gt=0)
    budgets_world_s: dict[str, float] = Field(default_factory=dict)
    max_keys: int = Field(5000, gt=0)
    sample_refresh_s: float = Field(600, gt=0)
    entity_tables: dict[str, str] = Field(default_factory=dict)


class ModelSettings(_Strict):
    age_budget_world_s: float = Field(gt=0)


class MonitorSettings(_Strict):
    """monitoring/config.yaml; unknown keys are refused, so a typo does not pass silently."""

    streams: StreamSettings = StreamSettings()
    join: JoinSettings = JoinSettings()
    offline_log: OfflineLogSettings = OfflineLogSettings()
    drift: DriftSettings = DriftSettings()
    freshness: FreshnessSettings = FreshnessSettings()
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    progress_s: float = Field(10, gt=0)

    @classmethod
    def load(cls, path: Path = CONFIG) -> MonitorSettings:
        """Read and check a config file; the error names the bad key."""
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


MODELS = ("eta", "ranker", "retrieval")


def from_serve_config(path: Path) -> dict[str, Any]:
    """From the serve config's args: {"artifacts": the artifact root, "predictions": the prediction
    log's stream key, "redis": its Redis} (None where the config does not say; artifacts defaults to
    COURIER_ARTIFACTS, then ./artifacts)."""
    from models.registry import default_artifacts
    from serving.config import load_serve_config
    from serving.paths import resolve

    args = load_serve_config(path)["applications"][0].get("args", {})
    log = args.get("prediction_log") or {}
    return {"artifacts": resolve(args.get("artifacts") or default_artifacts()),
            "predictions": log.get("stream"), "redis": log.get("redis")}


class Monitor:
    """Consumes both streams, joins, exports, logs and probes; `start()`/`stop()` or `run(stop_event)`."""

    def __init__(self, settings: MonitorSettings, client: redis.Redis, data_dir: Path, artifacts: Path,
                 time_scale: float = 1.0, store: Any | None = None, metrics: MonitorMetrics | None = None,
                 models: tuple[str, ...] = MODELS):
        """`store`: the Feast store to probe for freshness (None: no probe); `artifacts`: the artifact
        root, where a version named in the prediction log is `<artifacts>/<model>/<model_version>/`."""
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0 (1 = real time), got {time_scale}")
        self.settings, self.client, self.time_scale = settings, client, time_scale
        self.data_dir = Path(data_dir)
        self.metrics = metrics or MonitorMetrics()
        self.artifact_root = Path(artifacts)
        self.artifacts = {model: Artifacts(self.artifact_root / model) for model in models}
        s = settings
        self.consumer = StreamConsumer(client, {"predictions": s.streams.predictions, "outcomes": s.streams.outcomes},
                                       s.streams.group, start_id=s.streams.start_id)
        self.joiner = Joiner(self.metrics, self.data_dir / "offline" / "logged", s.join.expire_world_s / time_scale,
                             s.offline_log.batch_rows, s.offline_log.batch_s, s.join.max_pending)
        self.drift = DriftMonitor(self.metrics, self.artifacts, s.drift.window, s.drift.min_count,
                                  s.drift.eta_features, s.drift.max_versions)
        self.freshness = self._freshness(store) if store is not None else None
        self.read = {"predictions": 0, "outcomes": 0, "bad": 0}
        self._rmse_versions: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None  # the /metrics server when start() was given a port
        self._due = {"drift": 0.0, "progress": time.monotonic() + s.progress_s}
        for model, budget in s.models.items():  # models are trained on the wall clock, not the city's
            self.metrics.model_age_budget.labels(model=model).set(budget.age_budget_world_s)
        eta = self.artifacts.get("eta")
        if eta is not None and not eta.versions():
            logger.warning("no ETA model under %s: offline RMSE and drift wait for one (`make train`)", eta.root)

    @classmethod
    def build(cls, data_dir: Path = Path("data"), redis_address: str | None = None, time_scale: float = 1.0,
              online_store: str | None = "sqlite", serve_config: Path | None = None,
              settings: MonitorSettings | None = None, metrics: MonitorMetrics | None = None) -> Monitor:
        """A monitor wired as `python -m monitoring` wires it (online_store None: no freshness probe)."""
        from serving.config import SERVE_CONFIG

        settings = (settings or MonitorSettings.load()).model_copy(deep=True)  # the caller's stays as it was
        served = from_serve_config(serve_config or SERVE_CONFIG)
        if served["predictions"]:
            settings.streams.predictions = served["predictions"]
        data_dir = Path(data_dir).resolve()
        store = None
        if online_store is not None:
            from feature_repo.store import open_store

            store = open_store(online_store, data_dir=data_dir, redis=redis_address)
        return cls(settings, connect(redis_address or served["redis"]), data_dir, served["artifacts"], time_scale,
                   store, metrics)

    # --- the loop -------------------------------------------------------------------------

    def start(self, port: int | None = None, addr: str = "0.0.0.0") -> Monitor:
        """Run the consumer (and the freshness probe) in background threads; with `port`, serve /metrics too."""
        self.consumer.ensure_groups()
        self._stop.clear()
        if port is not None:
            self._server = self.metrics.serve(port, addr)[0]
        self._threads = [threading.Thread(target=self.run, args=(self._stop,), name="monitor-streams", daemon=True)]
        if self.freshness is not None:
            self._threads.append(threading.Thread(target=self.probe_forever, args=(self._stop,),
                                                  name="monitor-freshness", daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads; everything joined so far is written to the offline log."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def alive(self) -> bool:
        """True while every started thread runs (a dead one means a bug: see the log)."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def run(self, stop: threading.Event) -> None:
        """Read, join and export until `stop` is set; Redis outages are waited out."""
        self.consumer.ensure_groups()
        try:
            while not stop.is_set():
                try:
                    self.step()
                except redis.RedisError as exc:
                    logger.warning("redis: %s: %s; retrying in 1 s", exc.__class__.__name__, exc)
                    stop.wait(1.0)
                self.tick()
        finally:
            self.joiner.flush()

    def step(self) -> int:
        """One read of both streams: take every entry in, then acknowledge them; returns how many."""
        entries = self.consumer.read(self.settings.streams.read_count, self.settings.streams.block_ms)
        for entry in entries:
            self.metrics.records_read.labels(stream=entry.stream).inc()
            self.read[entry.stream] += 1
            if entry.record is None or not self._take(entry.stream, entry.record):
                self.read["bad"] += 1
                self.metrics.bad_records.labels(stream=entry.stream).inc()
                if self.read["bad"] <= 10:  # say what is wrong, without flooding the log
                    logger.warning("skipping %s entry %s: %s", entry.stream, entry.entry_id, entry.error)
        self.consumer.ack(entries)
        return len(entries)

    def _take(self, stream: str, record: dict[str, Any]) -> bool:
        try:
            if stream == "outcomes":
                self.joiner.add_outcome(record)
                return True
            if record.get("endpoint") == "eta" and record.get("model_version") not in self._rmse_versions:
                self._offline_rmse(str(record.get("model_version")))
            self.drift.observe(record)
            self.joiner.add_prediction(record)
            return True
        except (KeyError, TypeError, ValueError, AttributeError):  # a record not in the documented format
            return False

    def tick(self) -> None:
        """What runs between reads: expiry, due parquet batches, PSI, progress."""
        now = time.monotonic()
        self.joiner.expire()
        self.joiner.flush_if_due()
        if now >= self._due["drift"]:
            self.drift.update()
            self._due["drift"] = now + self.settings.drift.every_s
        if now >= self._due["progress"]:
            print(self.progress(), flush=True)
            self._due["progress"] = now + self.settings.progress_s

    def probe_forever(self, stop: threading.Event) -> None:
        """Probe freshness every `every_s` until `stop`; the keys are re-read every `sample_refresh_s`."""
        refreshed = time.monotonic()
        while not stop.is_set():
            try:
                if time.monotonic() - refreshed > self.settings.freshness.sample_refresh_s:
                    self.freshness.load_keys()
                    refreshed = time.monotonic()
                self.freshness.probe()
            except Exception as exc:  # noqa: BLE001 (store down, tables missing: count, say so, go on)
                self.metrics.probe_errors.inc()
                logger.warning("freshness probe failed: %s: %s", exc.__class__.__name__, exc)
            stop.wait(self.settings.freshness.every_s)

    def progress(self) -> str:
        """One line: what was read, joined, expired and written so far."""
        j = self.joiner
        rows = {t: int(self.metrics.value("courier_offline_rows_appended_total", {"table": t}) or 0)
                for t in ("eta_outcomes", "feed_impressions")}
        return (f"monitor: read {self.read['predictions']} predictions, {self.read['outcomes']} outcomes "
                f"({self.read['bad']} bad); joined {j.stats['joined']}, waiting {len(j.predictions)} predictions / "
                f"{len(j.outcomes)} outcomes, expired {j.stats['expired']}; rows written {rows}")

    # --- helpers --------------------------------------------------------------------------

    def _offline_rmse(self, version: str) -> None:
        """Export a version's offline test RMSE (once per version)."""
        self._rmse_versions.add(version)
        manifest = self.artifacts["eta"].manifest(version) if "eta" in self.artifacts else None
        rmse = (manifest or {}).get("metrics", {}).get("rmse")
        if rmse is not None:
            self.metrics.eta_offline_rmse.labels(model_version=version).set(float(rmse))

    def _freshness(self, store: Any):
        from monitoring.freshness import FreshnessProbe, served_views

        # the feature services every version on disk needs (a shadow or canary serves two versions)
        manifests = [artifacts.manifest(v) for artifacts in self.artifacts.values() for v in artifacts.versions()]
        services = [manifest["feature_service"] for manifest in manifests if manifest and "feature_service" in manifest]
        if not services:
            services = [s.name for s in store.list_feature_services()]
            logger.warning("no served model found: probing every feature service (%s)", ", ".join(services))
        f = self.settings.freshness
        views = served_views(store, dict.fromkeys(services))
        return FreshnessProbe(store, views, self.data_dir / "offline", self.metrics, f.entity_tables,
                              f.push_cadence_world_s, self.time_scale, f.max_keys, f.budgets_world_s)
