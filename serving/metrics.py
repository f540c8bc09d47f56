"""Prometheus metrics of the serving path, exported through Ray's metrics agent.

Locally they are on http://127.0.0.1:8080/metrics (`serving.launch --metrics-port`), prefixed
`ray_` by Ray; on Kubernetes KubeRay's pods expose the same port.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from ray.serve.metrics import Counter, Histogram

# Milliseconds: fine below 10 ms where the work is, coarse above the 100 ms SLO.
LATENCY_BUCKETS_MS = [0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500]


class _Discard:
    """Stands in for a Prometheus metric outside Ray (benchmarks, plain ASGI): records nothing."""

    def observe(self, *args, **kwargs) -> None:
        pass

    def inc(self, *args, **kwargs) -> None:
        pass


class ServingMetrics:
    """Per-stage latency, fallbacks and refused requests, tagged by endpoint."""

    def __init__(self, export: bool = True) -> None:
        """`export=False` keeps the timing API but exports nothing (code running outside Ray Serve)."""
        if not export:
            self.stage_ms = self.fallbacks = self.rejected = _Discard()
            return
        self.stage_ms = Histogram("courier_stage_latency_ms", description="Latency of one serving stage, ms.",
                                  boundaries=LATENCY_BUCKETS_MS, tag_keys=("endpoint", "stage"))
        self.fallbacks = Counter("courier_fallback_total", description="Answers given in a degraded mode.",
                                 tag_keys=("endpoint", "reason"))
        self.rejected = Counter("courier_rejected_requests_total", description="Requests refused with a 4xx/5xx.",
                                tag_keys=("endpoint", "status"))

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
