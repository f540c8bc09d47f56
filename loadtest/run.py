"""Scenario runners: one open-loop run, a step load, a capacity sweep, the chaos drill.

Each function takes a base URL (of a server already running) and returns what it measured;
`loadtest.__main__` starts the server, calls these and writes the reports.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest import openloop
from loadtest.cpu import CpuSampler, ForeignLoad
from loadtest.openloop import NO_RETRY, Clock, Records, RetryPolicy, Stage
from loadtest.report import summarize
from loadtest.slo import SLO, GateResult, check
from loadtest.traffic import City, Request


@dataclass
class RunResult:
    records: Records
    stages: list[Stage]
    summary: dict[str, Any]
    windows: list[dict[str, Any]]
    gate: GateResult | None = None
    cpu: list[dict[str, float]] | None = None  # per-second cores busy / used by other work


def stages_of(spec: dict[str, Any]) -> list[Stage]:
    if "stages" in spec:
        return [Stage(float(s["duration_s"]), float(s["rate"])) for s in spec["stages"]]
    return [Stage(float(spec["duration_s"]), float(spec["rate"]))]


def offered_series(stages: Sequence[Stage]) -> dict[str, list]:
    t, rate, at = [], [], 0.0
    for stage in stages:
        t.append(round(at, 3))
        rate.append(stage.rate)
        at += stage.duration_s
    t.append(round(at, 3))
    rate.append(0.0)
    return {"t": t, "rate": rate}


def step_windows(stages: Sequence[Stage], warmup_s: float, step_warmup_s: float) -> list[dict[str, Any]]:
    """Excluded from the gate: the first `warmup_s` of the run, and `step_warmup_s` after each step up."""
    windows = [{"start": 0.0, "end": warmup_s, "label": "warm-up"}] if warmup_s > 0 else []
    at, previous = 0.0, 0.0
    for stage in stages:
        if at > 0 and stage.rate > previous and step_warmup_s > 0:
            windows.append({"start": round(at, 3), "end": round(at + step_warmup_s, 3), "label": "scale-up warm-up"})
        previous = stage.rate
        at += stage.duration_s
    return windows


def requests_for(city: City, endpoints: list[str], n: int) -> list[Request]:
    return city.request_stream(max(n, 1), endpoints)


def run_open(url: str, spec: dict[str, Any], city: City, endpoints: list[str], *, slo: SLO | None = None,
             target_rate: float | None = None, retry: RetryPolicy = NO_RETRY, background: Sequence = (),
             clock: Clock | None = None, seed: int = 0, timeout_s: float = 10.0,
             server_pid: int | None = None) -> RunResult:
    """One open-loop run of a scenario spec ({stages|rate+duration_s, arrival, warmup_s, step_warmup_s}).

    The summary's `cpu` says how busy the machine was, and how much of that was other people's
    work (`foreign_cores`): the cores are shared, so a noisy run can be recognised and repeated.
    """
    stages = stages_of(spec)
    times = openloop.arrival_times(stages, spec.get("arrival", "poisson"), seed=seed)
    requests = requests_for(city, endpoints, min(len(times), 20000))
    meter, sampler = ForeignLoad(server_pid), CpuSampler(server_pid)
    meter.start()
    records = openloop.run(url, times, requests, retry=retry, background=[*background, sampler], clock=clock,
                           timeout_s=timeout_s)
    cpu = meter.stop()
    windows = step_windows(stages, float(spec.get("warmup_s", 0)), float(spec.get("step_warmup_s", 0)))
    total = sum(s.duration_s for s in stages)
    excluded = np.zeros(len(records), dtype=bool)
    for window in windows:
        excluded |= (records.scheduled >= window["start"]) & (records.scheduled < window["end"])
    # The offered rate of what is judged: the schedule's rate averaged over the judged time.
    judged_s = total - sum(min(w["end"], total) - w["start"] for w in windows)
    constant = len({s.rate for s in stages}) == 1
    offered = stages[0].rate if constant else (float((~excluded).sum()) / judged_s if judged_s > 0 else None)
    summary = summarize(records, offered_rate=offered, window=(0.0, total), mask=~excluded, seconds=judged_s)
    summary["judged_seconds"] = round(judged_s, 3)
    summary["cpu"] = cpu
    gate = check(summary, slo, target_rate) if slo is not None else None
    return RunResult(records, stages, summary, windows, gate, sampler.samples)


def sweep(url: str, rates: Sequence[float], duration_s: float, warmup_s: float, city: City, endpoints: list[str],
          slo: SLO, *, stop_after_failures: int = 2, refine: int = 2, pause_s: float = 2.0,
          arrival: str = "poisson", seed: int = 0, log=print, server_pid: int | None = None,
          max_foreign_cores: float = 0.3, noisy_retries: int = 3, noisy_wait_s: float = 20.0,
          min_rate: float = 5.0) -> dict[str, Any]:
    """Open-loop runs at increasing rates; the highest rate that meets the SLO is the capacity.

    After the ascending pass, `refine` bisection steps between the last pass and the first fail;
    when even the lowest rate fails, the rate is halved (down to `min_rate`) until one passes.
    A point that fails while other work took more than `max_foreign_cores` of the shared
    machine is measured again (up to `noisy_retries` times, after a pause). A server we did not
    start (no `server_pid`) counts as other work, so its points are not measured again.
    """
    points: list[dict[str, Any]] = []
    noisy_retries = noisy_retries if server_pid is not None else 0

    def measure(rate: float) -> bool:
        spec = {"rate": rate, "duration_s": duration_s + warmup_s, "warmup_s": warmup_s, "arrival": arrival}
        for attempt in range(noisy_retries + 1):
            result = run_open(url, spec, city, endpoints, slo=slo, target_rate=rate, seed=seed + len(points),
                              server_pid=server_pid)
            foreign = result.summary["cpu"]["foreign_cores"]
            if result.gate.passed or foreign <= max_foreign_cores or attempt == noisy_retries:
                break
            log(f"  {rate:8.1f} req/s: failed with {foreign:.2f} cores of other work on the machine; "
                f"measuring again in {noisy_wait_s:g} s")
            time.sleep(noisy_wait_s)
        s = result.summary
        point = {"offered_rate": rate, "achieved_rate": s["achieved_rate"], "p50_ms": s["p50_ms"],
                 "p95_ms": s["p95_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"], "errors": s["errors"],
                 "error_rate": s["error_rate"], "requests": s["requests"],
                 "generator_lag_p99_ms": s["generator_lag_p99_ms"], "passed": result.gate.passed,
                 "reasons": result.gate.reasons, "cpu": s["cpu"], "attempts": attempt + 1,
                 "endpoints": {name: {"p50_ms": e["p50_ms"], "p99_ms": e["p99_ms"], "errors": e["errors"]}
                               for name, e in s["endpoints"].items()}}
        points.append(point)
        log(f"  {rate:8.1f} req/s: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, answered {s['achieved_rate']}/s, "
            f"errors {s['errors']}, cores busy {s['cpu']['busy_cores']} (other work {s['cpu']['foreign_cores']}) "
            f"-> {'PASS' if result.gate.passed else 'FAIL'}")
        time.sleep(pause_s)
        return result.gate.passed

    best, failures = None, 0
    for rate in sorted(rates):
        if measure(rate):
            best, failures = rate, 0
        else:
            failures += 1
            if failures >= stop_after_failures:
                break
    failing_above = [p["offered_rate"] for p in points if not p["passed"] and (best is None or p["offered_rate"] > best)]
    low, high = best, (min(failing_above) if failing_above else None)
    while low is None and high is not None and high / 2 >= min_rate:  # even the lowest rate failed: halve it
        if measure(round(high / 2, 1)):
            low = round(high / 2, 1)
        else:
            high = round(high / 2, 1)
    for _ in range(refine if (low is not None and high is not None) else 0):
        mid = round((low + high) / 2, 1)
        if mid in (low, high):
            break
        if measure(mid):
            low = mid
        else:
            high = mid
    return {"capacity_rate": low, "first_failing_rate": high, "points": sorted(points, key=lambda p: p["offered_rate"])}
