"""`make rollout-drill`: a model rollout and its rollback under load, with no request lost.

KubeRay's end-to-end bar for a RayService upgrade is Locust's `num_failures == 0` through it. Here:
Courier starts (serving.launch, the shipped serve config, the project's registry), an open-loop
Poisson load at the target rate runs with no retries (p99 from the raw latencies, every failure
counted) while Locust users run beside it, and meanwhile `serving.rollout` switches a model to
another version (default: the registry's `challenger`) and later rolls it back, both through the
Ray dashboard's REST API as KubeRay does. Passed when neither generator saw a failed request
and the p99 stayed under the SLO; the report goes to reports/loadtest/rollout.json (+ .png).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.config import load_config, resolve_rate
from loadtest.openloop import Clock
from loadtest.report import REPORTS, latency_stats, write_run_report
from loadtest.run import run_open
from loadtest.server import ServiceProcess
from loadtest.slo import SLO
from loadtest.traffic import city_from_config
from serving.paths import PROJECT_ROOT


def log(message: str) -> None:
    print(f"[rollout-drill {time.strftime('%H:%M:%S')}] {message}", flush=True)


def changer(rollouts: Any, model: str, to_version: str, at_s: float, back_after_s: float,
            events: list[dict[str, Any]]):
    """A background job for the open-loop driver: roll out at `at_s`, roll back `back_after_s` later."""

    async def run(clock: Clock) -> None:
        await asyncio.sleep(max(0.0, at_s - clock.now()))
        for action, call in (("rollout", lambda: rollouts.rollout(model, version=to_version)),
                             ("rollback", lambda: rollouts.rollback(model))):
            started = clock.now()
            try:
                slot = await asyncio.to_thread(call)
                events.append({"t": round(started, 3), "done_t": round(clock.now(), 3), "label": action,
                               "version": slot["version"]})
            except Exception as exc:  # noqa: BLE001 (reported; the load goes on)
                events.append({"t": round(started, 3), "label": action, "error": f"{exc.__class__.__name__}: {exc}"})
            if action == "rollout":
                await asyncio.sleep(max(0.0, at_s + back_after_s - clock.now()))

    return run


def locust_failures(stats_csv: Path) -> dict[str, int]:
    """Requests and failures of Locust's Aggregated row."""
    with stats_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("Name") == "Aggregated":
                return {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"])}
    raise RuntimeError(f"no Aggregated row in {stats_csv}")


def run_drill(model: str, to_version: str, duration_s: float, at_s: float, back_after_s: float,
              locust_users: int, rate: float | None = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start Courier, load it, roll out and back; returns the verdict (also in reports/loadtest/rollout.json)."""
    from models.registry import Registry, default_artifacts
    from serving.rollout import HISTORY, Dashboard, Rollouts

    config = config or load_config()
    slo = SLO.from_config(config)
    rate = rate or resolve_rate(config["chaos"]["rate"], float(config["target_rate"]))
    registry = Registry(artifacts=default_artifacts())
    target = registry.resolve(model, to_version)  # fails early, with the registered versions, when unknown
    champion = registry.resolve(model, "champion")
    if target.version == champion.version:
        raise SystemExit(f"{model}@{to_version} is the champion ({champion.version}): nothing to roll out. "
                         f"Register another version first (`make retrain MODEL={model}`)")
    workdir = Path(tempfile.mkdtemp(prefix="courier-rollout-"))
    (REPORTS / "loadtest").mkdir(parents=True, exist_ok=True)
    log(f"{model}: champion {champion.number} ({champion.version}) -> {target.number} ({target.version}) at "
        f"{at_s:g} s, back {back_after_s:g} s later; open loop {rate:g} req/s for {duration_s:g} s + "
        f"{locust_users} Locust users")
    with ServiceProcess.courier(log_path=REPORTS / "loadtest" / "rollout.serving.log") as service:
        rollouts = Rollouts(Dashboard(service.dashboard_url), registry, workdir / HISTORY, service.url, log=log)
        prefix = workdir / "locust"
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "--host", service.url,
             "-u", str(locust_users), "-r", str(locust_users), "-t", f"{int(duration_s)}s", "--csv", str(prefix),
             "--only-summary"],
            cwd=PROJECT_ROOT, env={**os.environ, "COURIER_LOCUST_NAME": "rollout-locust",
                                   "COURIER_LOCUST_TIME_SCALE": "0.25"},
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        events: list[dict[str, Any]] = []
        spec = {"rate": rate, "duration_s": duration_s, "arrival": "poisson", "warmup_s": 0}
        city = city_from_config(config["traffic"])
        result = run_open(service.url, spec, city, config["traffic"]["endpoints"],
                          background=[changer(rollouts, model, target.version, at_s, back_after_s, events)],
                          server_pid=service.pid)
        locust.wait(timeout=duration_s + 60)
        swarm = locust_failures(Path(f"{prefix}_stats.csv"))
    records = result.records
    verdict: dict[str, Any] = {"model": model, "from": champion.version, "to": target.version, "rate": rate,
                               "duration_s": duration_s, "events": events, "open_loop": {
                                   "requests": len(records), "failed": int((~records.ok).sum()),
                                   **latency_stats(records.latency_ms)}, "locust": swarm}
    for event in events:
        done = event.get("done_t", event["t"]) + 5
        inside = (records.scheduled >= event["t"]) & (records.scheduled < done)
        event["requests"] = int(inside.sum())
        event["failed"] = int((~records.ok & inside).sum())
        event["p99_ms"] = latency_stats(records.latency_ms[inside])["p99_ms"]
    verdict["passed"] = (verdict["open_loop"]["failed"] == 0 and swarm["failures"] == 0
                         and all("error" not in e for e in events) and len(events) == 2
                         and (verdict["open_loop"]["p99_ms"] or 0) <= slo.p99_ms)
    write_run_report("rollout", result.summary, records, events=[{"t": e["t"], "label": e["label"]} for e in events],
                     slo={**slo.as_dict(), "target_rate": None, "gated": False}, extra={"rollout": verdict},
                     cpu=result.cpu or ())
    return verdict


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m loadtest.rollout_drill [--model eta] [--to challenger]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eta", choices=["eta", "ranker", "retrieval"])
    parser.add_argument("--to", default="challenger", help="the version to roll out (alias, number or artifact version)")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of load")
    parser.add_argument("--at", type=float, default=20.0, help="seconds into the load when the rollout starts")
    parser.add_argument("--back-after", type=float, default=30.0, help="seconds from the rollout to the rollback")
    parser.add_argument("--locust-users", type=int, default=10)
    parser.add_argument("--rate", type=float, default=None, help="open-loop req/s (default: the chaos drill's)")
    args = parser.parse_args(argv)
    verdict = run_drill(args.model, args.to, args.duration, args.at, args.back_after, args.locust_users, args.rate)
    ol, swarm = verdict["open_loop"], verdict["locust"]
    log(f"open loop: {ol['requests']} requests, {ol['failed']} failed, p50 {ol['p50_ms']} ms, p99 {ol['p99_ms']} ms; "
        f"Locust: {swarm['requests']} requests, num_failures {swarm['failures']}")
    for event in verdict["events"]:
        log(f"  {event['t']:6.1f}s {event['label']}: {event}")
    log(f"report reports/loadtest/rollout.json; drill {'PASSED' if verdict['passed'] else 'FAILED'}")
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
