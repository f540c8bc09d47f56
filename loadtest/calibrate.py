"""How many requests each deployment has in flight at a given rate: the input to its autoscaling.

    python -m loadtest calibrate [--replicas 2]   # reports/loadtest/calibration-<replicas>.json

Ray Serve's autoscaler sizes a deployment as ceil(ongoing requests / target_ongoing_requests),
where "ongoing" is what Ray itself measures (`ray_serve_autoscaling_total_requests`). This
runs Courier with each deployment pinned to N replicas (default one), offers a series of open-loop rates,
and samples that metric from Ray's Prometheus endpoint, so `target_ongoing_requests` can be set
to the load one replica carries comfortably (read off the table at the rate where p99 is still
well under the SLO), instead of being guessed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from typing import Any

import httpx
import numpy as np

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\} (?P<value>[-+0-9.eEinfNa]+)$')


def scrape(text: str, metric: str) -> dict[str, float]:
    """{deployment: value} of a Ray Serve metric in Prometheus text (summed over series)."""
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match["name"] != metric:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        out[labels.get("deployment", "?")] += float(match["value"])
    return dict(out)


class MetricSampler:
    """A background job for openloop.drive: samples Ray's autoscaling metrics every `every_s`."""

    METRICS = ("ray_serve_autoscaling_total_requests", "ray_serve_autoscaling_desired_replicas")

    def __init__(self, metrics_url: str, every_s: float = 1.0):
        self.metrics_url, self.every_s = metrics_url, every_s
        self.samples: list[dict[str, Any]] = []

    async def __call__(self, clock) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                try:
                    text = (await client.get(self.metrics_url)).text
                    self.samples.append({"t": clock.now(), **{m: scrape(text, m) for m in self.METRICS}})
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(self.every_s)

    def mean(self, metric: str, since: float) -> dict[str, float]:
        values: dict[str, list[float]] = defaultdict(list)
        for sample in self.samples:
            if sample["t"] >= since:
                for deployment, value in sample[metric].items():
                    values[deployment].append(value)
        return {d: round(float(np.mean(v)), 3) for d, v in values.items()}


def calibrate(url: str, metrics_url: str, rates: list[float], duration_s: float, city, endpoints: list[str],
              log=print, server_pid: int | None = None) -> list[dict[str, Any]]:
    from loadtest.run import run_open

    rows = []
    for rate in rates:
        sampler = MetricSampler(metrics_url)
        result = run_open(url, {"rate": rate, "duration_s": duration_s, "warmup_s": duration_s / 3}, city, endpoints,
                          background=[sampler], server_pid=server_pid)
        s = result.summary
        row = {"rate": rate, "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "errors": s["errors"],
               "ongoing": sampler.mean("ray_serve_autoscaling_total_requests", duration_s / 2),
               "little_ongoing_total": round(rate * (s["mean_ms"] or 0) / 1000, 3), "cpu": s["cpu"]}
        rows.append(row)
        log(f"  {rate:6.1f} req/s: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, ongoing per deployment "
            f"{row['ongoing']} (Little's law, end to end: {row['little_ongoing_total']}); other work "
            f"{s['cpu']['foreign_cores']} cores")
        time.sleep(2)
    return rows
