"""Prometheus metrics of the serving path, exported through Ray's metrics agent.

Locally they are on http://127.0.0.1:8080/metrics (`serving.launch --metrics-port`), prefixed
`ray_` by Ray; on Kubernetes KubeRay's pods expose the same port.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from ray.serve.metrics import Counter, Gauge, Histogram

# Milliseconds: fine below 10 ms where the work is, coarse above the 100 ms SLO.
LATENCY_BUCKETS_MS = [0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500]


class _Discard:
    """Stands in for a Prometheus metric outside Ray (benchmarks, plain ASGI): records nothing."""

    def observe(self, *args, **kwargs) -> None:
        pass

    def inc(self, *args, **kwargs) -> None:
        pass

    def set(self, *args, **kwargs) -> None:
        pass


class ServingMetrics:
    """Per-stage latency, fallbacks, refused requests, the prediction log, feature freshness, model age."""

    def __init__(self, export: bool = True) -> None:
        """`export=False` keeps the timing API but exports nothing (code running outside Ray Serve)."""
        if not export:
            self.stage_ms = self.fallbacks = self.rejected = _Discard()
            self.predictions_logged = self.predictions_dropped = _Discard()
            self.feature_reads = self.feature_expired_reads = self.model_trained = _Discard()
            self.model_answers = self.shadow_answers = self.shadow_failures = self.model_loaded_gauge = _Discard()
            return
        self.stage_ms = Histogram("courier_stage_latency_ms", description="Latency of one serving stage, ms.",
                                  boundaries=LATENCY_BUCKETS_MS, tag_keys=("endpoint", "stage"))
        self.fallbacks = Counter("courier_fallback_total", description="Answers given in a degraded mode.",
                                 tag_keys=("endpoint", "reason"))
        self.rejected = Counter("courier_rejected_requests_total", description="Requests refused with a 4xx/5xx.",
                                tag_keys=("endpoint", "status"))
        self.predictions_logged = Counter("courier_predictions_logged_total", tag_keys=("endpoint",),
                                          description="Predictions written to the prediction log.")
        self.predictions_dropped = Counter("courier_prediction_log_dropped_total", tag_keys=("endpoint", "reason"),
                                           description="Predictions answered but not logged (sink down, buffer full).")
        self.feature_reads = Counter("courier_feature_reads_total", tag_keys=("view",),
                                     description="Feature rows read per view (/v1/eta).")
        self.feature_expired_reads = Counter("courier_feature_expired_reads_total", tag_keys=("view",),
                                             description="Reads that found the view's value past its TTL (/v1/eta).")
        self.model_trained = Gauge("courier_model_trained_timestamp_seconds", tag_keys=("model", "version"),
                                   description="When the served model was trained (epoch seconds).")
        # Which version answered: a mixed fleet (two versions as champion) shows up here and in the gauge.
        self.model_answers = Counter("courier_model_answers_total", tag_keys=("model", "version", "variant"),
                                     description="Answers given per model, version and variant (champion|challenger).")
        self.shadow_answers = Counter("courier_shadow_answers_total", tag_keys=("model", "version"),
                                      description="Challenger answers computed in shadow (logged, never returned).")
        self.shadow_failures = Counter("courier_shadow_failures_total", tag_keys=("model", "version"),
                                       description="Shadow answers that failed (never seen by the caller).")
        self.model_loaded_gauge = Gauge("courier_model_loaded", tag_keys=("model", "version", "slot"),
                                        description="1 for each version this replica has loaded, by slot "
                                        "(champion|challenger); 0 once unloaded.")

    def model_loaded(self, model: str, version: str, created_at: str) -> None:
        """Export when a served model was trained (its age is time() minus this)."""
        from datetime import datetime

        if created_at:
            stamp = datetime.fromisoformat(created_at).timestamp()
            self.model_trained.set(stamp, tags={"model": model, "version": version})

    def model_loaded_slot(self, model: str, version: str, slot: str, loaded: int) -> None:
        """Say that this replica holds (1) or no longer holds (0) `version` of `model` in `slot`."""
        self.model_loaded_gauge.set(loaded, tags={"model": model, "version": version, "slot": slot})

    def answered(self, model: str, version: str, variant: str, n: int = 1) -> None:
        """Count answers given by one version of a model as one variant."""
        self.model_answers.inc(n, tags={"model": model, "version": version, "variant": variant})

    def feature_freshness(self, expired: dict[str, list[bool]]) -> None:
        """Count the rows read per view and those that found it expired."""
        for view, flags in expired.items():
            self.feature_reads.inc(len(flags), tags={"view": view})
            stale = sum(flags)
            if stale:
                self.feature_expired_reads.inc(stale, tags={"view": view})

    @contextmanager
    def stage(self, endpoint: str, stage: str, into: dict[str, float] | None = None) -> Iterator[None]:
        """Time a block; record it in the histogram (and in `into`, when given)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000
            self.stage_ms.observe(elapsed, tags={"endpoint": endpoint, "stage": stage})
            if into is not None:
                into[stage] = round(elapsed, 3)
