"""`make drift-drill`: make a model stale on purpose and watch the monitoring see it.

On a compressed clock (speed S, 60 by default: a world minute per wall second), with everything
real and private to the drill (a redis-server on a free port holding the online store and both
streams, Courier's serve config on it, the monitor, Debian's Prometheus with the repository's
rules, the live city):

  1. healthy:  the city runs as it was simulated; no alert may fire.
  2. rain:     travel times +30 %, which no feature shows; CourierLiveEtaErrorHigh must fire.
  3. no pushes: the city stops pushing live features; CourierFeatureViewStale must fire.

The times from each change to its alert, every alert seen, and the metric timelines go to
reports/monitoring/drill.json; `monitoring.report` draws them (reports/monitoring/drill.png, .html).
Exit code 1 when an alert fired on the healthy city or an expected one did not fire in time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from serving.paths import PROJECT_ROOT

REPORTS = PROJECT_ROOT / "reports" / "monitoring"
# What the report draws: PromQL over the drill, by panel.
TIMELINES = {
    "eta_rmse": "max(model_version:courier_eta_rmse_minutes:5m)",
    "eta_offline_rmse": "max(model_version:courier_eta_offline_rmse_minutes:max)",
    "eta_bias": "max(model_version:courier_eta_bias_minutes:5m)",
    "eta_outcomes_per_s": "sum(model_version:courier_eta_outcomes:rate5m)",
    "prediction_psi": "max by (model) (courier_prediction_psi)",
    "feature_psi": "max by (feature) (courier_feature_psi)",
    "newest_age_s": "view:courier_feature_view_newest_age_seconds:max",
    "freshness_budget_s": "view:courier_feature_view_freshness_budget_seconds:max",
    "conversion": "max(model_version:courier_feed_conversion:ratio5m)",
    "calibration": "max(model_version:courier_feed_calibration:ratio5m)",
}


def log(message: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {message}", flush=True)


LIVE_VIEWS = ("restaurant_load_15m", "area_congestion_15m")  # the views the city pushes


def firing(prometheus: Any) -> dict[str, list[dict]]:
    """Alerts firing now, by name (the labels of each firing instance)."""
    found: dict[str, list[dict]] = {}
    for alert in prometheus.alerts():
        if alert.get("state") == "firing":
            found.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
    return found


def wait_for_alert(prometheus: Any, name: str, within_s: float, every_s: float = 2.0,
                   views: tuple[str, ...] | None = None) -> float | None:
    """Seconds until `name` fires (for one of `views`, when given); None if it did not within `within_s`."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        instances = firing(prometheus).get(name, [])
        if any(views is None or labels.get("view") in views for labels in instances):
            return round(time.monotonic() - started, 1)
        time.sleep(every_s)
    return None


def watch_quiet(prometheus: Any, seconds: float, every_s: float = 5.0, say: Callable[[str], None] = log) -> list[str]:
    """Alerts that fired during `seconds` of a phase that must stay quiet."""
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = firing(prometheus)
        for name in set(now) - seen:
            say(f"alert fired on the healthy city: {name} {now[name]}")
        seen |= set(now)
        time.sleep(every_s)
    return sorted(seen)


def run_drill(data_dir: Path, speed: float = 60.0, healthy_s: float = 150.0, rain_within_s: float = 360.0,
              stale_within_s: float = 180.0, out_dir: Path = REPORTS, seed: int = 0) -> dict[str, Any]:
    """Run the three phases; returns the results (also written to out_dir/drill.json)."""
    from loadtest.chaos import RedisServer, prepare_redis_store
    from loadtest.server import ServiceProcess, free_port
    from monitoring.watch import watch_city
    from serving.config import load_serve_config

    _check_inputs(data_dir, load_serve_config())
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="courier-drill-"))
    result: dict[str, Any] = {"speed": speed, "healthy_s": healthy_s, "phases": {}}
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        redis = RedisServer(free_port(), workdir / "redis")
        redis.start()
        stack.callback(redis.stop)
        log(f"private redis-server on {redis.address}; materializing the features into it ...")
        private = prepare_redis_store(redis, workdir / "data", data_dir / "offline")
        metrics_port = free_port()
        serving = ServiceProcess.start_with_retries(lambda: ServiceProcess.courier(
            metrics_port=metrics_port, log_path=out_dir / "drill.serving.log",
            sets={"online_store": "redis", "redis": redis.address, "data_dir": str(private),
                  "prediction_log": {"redis": redis.address}}))
        stack.callback(serving.stop)
        log(f"Courier on {serving.url}")
        watched = watch_city(stack, serving_url=serving.url, metrics_port=metrics_port, redis_address=redis.address,
                             private=private, data_dir=data_dir, speed=speed, workdir=workdir, seed=seed)
        prometheus, city = watched.prometheus, watched.city
        started = time.time()

        log(f"phase 1, healthy: {healthy_s:g} s of the city as simulated (speed {speed:g}); no alert may fire")
        quiet = watch_quiet(prometheus, healthy_s)
        result["phases"]["healthy"] = {"start": started, "alerts_fired": quiet, "city": city.stats()}

        log("phase 2, rain: travel times +30 %; waiting for CourierLiveEtaErrorHigh")
        rain_at = time.time()
        city.set_scenario("rain")
        fired = wait_for_alert(prometheus, "CourierLiveEtaErrorHigh", rain_within_s)
        log(f"CourierLiveEtaErrorHigh {'fired after ' + str(fired) + ' s' if fired is not None else 'did NOT fire'}")
        result["phases"]["rain"] = {"start": rain_at, "alert": "CourierLiveEtaErrorHigh", "fired_after_s": fired,
                                    "alerts_firing": sorted(firing(prometheus)), "city": city.stats()}

        log(f"phase 3, pushes stop: waiting for CourierFeatureViewStale on {', '.join(LIVE_VIEWS)}")
        stop_at = time.time()
        city.pause_pushes()
        stale = wait_for_alert(prometheus, "CourierFeatureViewStale", stale_within_s, views=LIVE_VIEWS)
        log(f"CourierFeatureViewStale {'fired after ' + str(stale) + ' s' if stale is not None else 'did NOT fire'}")
        result["phases"]["no_pushes"] = {"start": stop_at, "alert": "CourierFeatureViewStale", "fired_after_s": stale,
                                         "alerts_firing": firing(prometheus)}
        ended = time.time()
        result["timelines"] = {name: prometheus.query_range(expr, started - 30, ended, step=5.0)
                               for name, expr in TIMELINES.items()}
        result["window"] = {"start": started, "end": ended}
    result["passed"] = not result["phases"]["healthy"]["alerts_fired"] and \
        result["phases"]["rain"]["fired_after_s"] is not None and result["phases"]["no_pushes"]["fired_after_s"] is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "drill.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def _check_inputs(data_dir: Path, serve_config: dict) -> None:
    """Refuse with what to do when the city or the models are missing."""
    from serving.paths import resolve

    if not (data_dir / "offline" / "simulation.json").exists():
        raise SystemExit(f"no simulated city in {data_dir}/offline: run `make data features train` (or `make demo`)")
    from models.registry import CHAMPION, Registry, RegistryError, default_artifacts

    args = serve_config["applications"][0]["args"]
    registry = Registry(uri=args.get("registry"), artifacts=resolve(args.get("artifacts") or default_artifacts()))
    for model in ("eta", "ranker", "retrieval"):
        try:
            registry.resolve(model, CHAMPION)
        except RegistryError as exc:
            raise SystemExit(f"no {model} champion in the registry ({exc}): run `make train` (or `make demo`)") from None


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m monitoring.drill [--speed 60] [--healthy 150]`."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # the city calls the simulator's batch steps every tick
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=PROJECT_ROOT / "data")
    parser.add_argument("--speed", type=float, default=60.0, help="world seconds per wall second")
    parser.add_argument("--healthy", type=float, default=150.0, help="wall seconds of the healthy phase")
    parser.add_argument("--rain-within", type=float, default=360.0, help="longest wait for the ETA error alert")
    parser.add_argument("--stale-within", type=float, default=180.0, help="longest wait for the freshness alert")
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    result = run_drill(args.data_dir, args.speed, args.healthy, args.rain_within, args.stale_within, args.out)
    from monitoring.report import render

    paths = render(result, args.out / "drill")
    healthy = result["phases"]["healthy"]["alerts_fired"]
    log(f"healthy phase: {'no alert' if not healthy else 'ALERTS: ' + ', '.join(healthy)}; "
        f"ETA error alert after {result['phases']['rain']['fired_after_s']} s of rain; "
        f"freshness alert after {result['phases']['no_pushes']['fired_after_s']} s without pushes")
    log(f"report: {paths['png']}, {paths['html']}; drill {'PASSED' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
