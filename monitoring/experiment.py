"""`make experiment`: the whole loop on a compressed clock, from drift to a promoted model.

Everything is real and private to the run (a redis-server on a free port for the online store and
the streams, a copy of the registry and of the champions' artifacts, Courier, the monitor,
Debian's Prometheus with the repository's rules, the live city):

  1. healthy:  the city as simulated, the champions serving;
  2. drift:    rain (+30 % travel time, which no feature shows) until CourierLiveEtaErrorHigh fires;
  3. retrain:  the alert triggers `models.retrain` for the ETA model on recent data, the live
               city's joined outcomes included; the gate decides whether it becomes the challenger;
  4. shadow:   every /v1/eta is also answered by the challenger (logged, never returned);
  5. canary:   a share of users, sticky by user id, is answered by the challenger (the others'
               requests stay shadowed), while a probe load measures failures and p99 per arm;
  6. decision: the outcome analysis (monitoring/analysis.py) promotes, rolls back or goes on;
  7. a deliberately bad model (shuffled labels) is retrained: the gate must refuse it.

The results go to reports/experiments/experiment.json, the plots to experiment.png/.html.
Exit code 1 when the story did not end as it must (no alert, a good challenger not promoted, a
bad one let through).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from serving.paths import PROJECT_ROOT

REPORTS = PROJECT_ROOT / "reports" / "experiments"
MODELS = ("eta", "ranker", "retrieval")


def log(message: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {message}", flush=True)


def private_offline(data_dir: Path, workdir: Path) -> Path:
    """A data dir whose offline/ links every simulated table but keeps its own `logged/` (this run's outcomes)."""
    private = workdir / "data"
    offline = private / "offline"
    offline.mkdir(parents=True)
    for entry in (data_dir / "offline").iterdir():
        if entry.name != "logged":
            (offline / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return private


def private_registry(artifacts: Path, workdir: Path) -> tuple[Path, str]:
    """A copy of the registry and of every registered model's artifacts: the run may promote without touching yours."""
    from models.registry import Registry

    source = Registry(artifacts=artifacts)
    root = workdir / "artifacts"
    root.mkdir(parents=True)
    for model in MODELS:
        if not any("champion" in v.aliases for v in source.versions(model)):
            raise SystemExit(f"no champion of {model} in {source.uri}: run `make train` (or `make demo`) first")
        for version in source.versions(model):
            shutil.copytree(version.path, root / model / version.version)
    database = Path(source.uri.removeprefix("sqlite:///"))
    if not source.uri.startswith("sqlite:///") or not database.exists():
        raise SystemExit(f"the experiment copies a SQLite registry; {source.uri} is not one")
    shutil.copy2(database, root / "registry.db")
    return root, f"sqlite:///{root / 'registry.db'}"


class GuardProbe:
    """A light open-loop /v1/eta load with user ids during the canary: failed requests and p99 per arm.

    The arm of a request is computable from its user id (serving.variants.in_canary), answered or
    not, so a challenger that fails requests is charged with them; the analysis' guard rails read these.
    """

    def __init__(self, url: str, bodies: list[dict[str, Any]], share: float, salt: str, rate: float = 10.0):
        self.url, self.bodies, self.share, self.salt, self.rate = url, bodies, share, salt, rate
        self.samples: list[tuple[bool, bool, float]] = []  # (challenger arm, ok, latency ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="guard-probe")

    def start(self) -> GuardProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        asyncio.run(self._drive())

    async def _drive(self) -> None:
        """Poisson arrivals, each request its own task: a slow answer never delays the next send."""
        from serving.variants import in_canary

        rng = random.Random(7)
        started = time.monotonic()
        next_at = 0.0
        tasks: set[asyncio.Task] = set()
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:

            async def one(body: dict[str, Any], scheduled: float) -> None:
                arm = in_canary(body["user_id"], self.share, self.salt)
                try:
                    ok = (await client.post("/v1/eta", json=body)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.samples.append((arm, ok, (time.monotonic() - started - scheduled) * 1000))

            while not self._stop.is_set():
                next_at += rng.expovariate(self.rate)
                await asyncio.sleep(max(0.0, next_at - (time.monotonic() - started)))
                task = asyncio.create_task(one(rng.choice(self.bodies), next_at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> dict[str, float]:
        """The guard-rail figures of monitoring.analysis.GuardRails."""
        self._stop.set()
        self._thread.join(10)
        figures: dict[str, float] = {}
        for arm, name in ((False, "champion"), (True, "challenger")):
            mine = [(ok, ms) for a, ok, ms in self.samples if a == arm]
            latencies = sorted(ms for ok, ms in mine if ok)
            figures[f"{name}_error_rate"] = sum(not ok for ok, _ in mine) / max(len(mine), 1)
            figures[f"{name}_p99_ms"] = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("inf")
        return figures


def probe_bodies(data_dir: Path, n: int = 2000) -> list[dict[str, Any]]:
    """/v1/eta bodies of simulated orders (restaurants that exist, drop-offs in the city), with their user ids."""
    import pandas as pd

    orders = pd.read_parquet(data_dir / "offline" / "orders.parquet",
                             columns=["restaurant_id", "delivery_lat", "delivery_lon", "user_id"]).tail(n)
    return [{"restaurant_id": int(o.restaurant_id), "delivery_lat": float(o.delivery_lat),
             "delivery_lon": float(o.delivery_lon), "user_id": int(o.user_id)} for o in orders.itertuples()]


def private_serve_config(workdir: Path, **args: Any) -> Path:
    """The shipped serve config with this run's app args (its artifacts, registry, store), as a file."""
    import yaml

    from serving.config import load_serve_config, with_overrides

    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(with_overrides(load_serve_config(), args=args), sort_keys=False))
    return path


def retrain(model: str, data_dir: Path, artifacts: Path, registry_uri: str, log_path: Path,
            shuffle_labels: bool = False, days: float | None = None) -> dict[str, Any]:
    """`python -m models.retrain` as the alert's receiver runs it; its exit code and JSON summary."""
    argv = [sys.executable, "-m", "models.retrain", "--model", model, "--data-dir", str(data_dir),
            "--artifacts", str(artifacts)]
    if shuffle_labels:
        argv.append("--shuffle-labels")
    if days is not None:
        argv += ["--days", str(days)]
    started = time.monotonic()
    with log_path.open("w") as out:
        code = subprocess.run(argv, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, "COURIER_REGISTRY": registry_uri}).returncode
    text = log_path.read_text()
    summary = _last_json(text)
    return {"exit_code": code, "seconds": round(time.monotonic() - started, 1), "summary": summary,
            "tail": text.splitlines()[-8:]}


def _last_json(text: str) -> dict[str, Any] | None:
    """The last JSON object a command printed (its summary), if any."""
    end = text.rfind("}")
    while end != -1:
        start = text.rfind("{", 0, end)
        while start != -1:
            try:
                return json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                start = text.rfind("{", 0, start)
        end = text.rfind("}", 0, end)
    return None


def run_experiment(data_dir: Path, speed: float, healthy_s: float, drift_within_s: float, shadow_s: float,
                   canary_s: float, canary_share: float, out_dir: Path = REPORTS, seed: int = 0,
                   min_samples: int = 150, keep: bool = False) -> dict[str, Any]:
    """Run the story; returns the results (also written to out_dir/experiment.json)."""
    from loadtest.chaos import RedisServer, prepare_redis_store
    from loadtest.server import ServiceProcess, free_port
    from models.registry import Registry, default_artifacts
    from monitoring.analysis import DecisionRule, analyse
    from monitoring.drill import firing, wait_for_alert
    from monitoring.retrain_hook import RetrainHook
    from monitoring.watch import watch_city
    from serving.rollout import HISTORY, Dashboard, Rollouts, served_versions

    if not (data_dir / "offline" / "simulation.json").exists():
        raise SystemExit(f"no simulated city in {data_dir}/offline: run `make data features train` (or `make demo`)")
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="courier-experiment-"))
    result: dict[str, Any] = {"speed": speed, "phases": {}, "started": time.time(), "workdir": str(workdir)}
    # The compressed story judges at 150 outcomes per arm (DecisionRule's default is 400): at speed 240 the
    # city delivers ~1.5 orders a wall second, and rain makes the two versions differ by far more than 2 %.
    # p99 per arm comes from ~20 req/s for the canary's minutes on 2 cores that the city at 240x keeps busy: its
    # tail is queueing, measured between 57 and 200 ms for either arm, so the margin is 25 ms + half the champion's.
    rule = DecisionRule(min_samples=min_samples, max_p99_increase_ms=25.0, max_p99_increase_ratio=0.5)
    analyses: list[Any] = []
    with ExitStack() as stack:
        if not keep:
            stack.callback(shutil.rmtree, workdir, True)
        artifacts, registry_uri = private_registry(default_artifacts(), workdir)
        registry = Registry(registry_uri, artifacts)
        champion = registry.resolve("eta", "champion")
        result["champion"] = {"number": champion.number, "version": champion.version}
        redis = RedisServer(free_port(), workdir / "redis")
        redis.start()
        stack.callback(redis.stop)
        log(f"private redis-server on {redis.address}; materializing the features into it ...")
        private = prepare_redis_store(redis, private_offline(data_dir, workdir), data_dir / "offline")
        metrics_port = free_port()
        serve_config = private_serve_config(
            workdir, online_store="redis", redis=redis.address, data_dir=str(private), artifacts=str(artifacts),
            registry=registry_uri, prediction_log={"redis": redis.address, "stream": "courier:predictions",
                                                   "maxlen": 50000})
        serving = ServiceProcess.start_with_retries(lambda: ServiceProcess.courier(
            metrics_port=metrics_port, log_path=out_dir / "experiment.serving.log", config=serve_config))
        stack.callback(serving.stop)
        rollouts = Rollouts(Dashboard(serving.dashboard_url), registry, workdir / HISTORY, serving.url, log=log)
        log(f"Courier on {serving.url}, ETA champion {champion.number} ({champion.version})")
        watched = watch_city(stack, serving_url=serving.url, metrics_port=metrics_port, redis_address=redis.address,
                             private=private, data_dir=data_dir, speed=speed, workdir=workdir, seed=seed,
                             serve_config=serve_config)
        prometheus, city = watched.prometheus, watched.city
        logged = private / "offline" / "logged"

        def phase(name: str, **fields: Any) -> dict[str, Any]:
            entry = {"start": time.time(), **fields}
            result["phases"][name] = entry
            return entry

        log(f"1 healthy: {healthy_s:g} s of the city as simulated (speed {speed:g})")
        phase("healthy")
        time.sleep(healthy_s)

        log("2 drift: rain (+30 % travel time); waiting for CourierLiveEtaErrorHigh")
        drift = phase("drift", scenario="rain")
        city.set_scenario("rain")
        drift["alert_after_s"] = wait_for_alert(prometheus, "CourierLiveEtaErrorHigh", drift_within_s)
        drift["alerts_firing"] = sorted(firing(prometheus))
        log(f"CourierLiveEtaErrorHigh {'fired after ' + str(drift['alert_after_s']) + ' s' if drift['alert_after_s'] is not None else 'did NOT fire'}")

        log("3 retrain: the alert goes to the retrain hook (as Alertmanager's webhook would send it), which retrains "
            "the ETA model on recent data and the city's outcomes")
        hook = RetrainHook([sys.executable, "-m", "models.retrain", "--model", "{model}", "--data-dir", str(private),
                            "--artifacts", str(artifacts)], log_dir=out_dir / "retrain",
                           env={"COURIER_REGISTRY": registry_uri})
        alerts = [{"status": "firing", "labels": {"alertname": name}} for name in drift["alerts_firing"]]
        started_retrain = time.monotonic()
        hooked = hook.handle({"alerts": alerts})
        hook.wait_idle(900)
        run = next((r for r in hook.runs if r.model == "eta"), None)
        text = Path(run.log).read_text() if run else ""
        trained = {"hook": hooked, "exit_code": run.exit_code if run else None,
                   "seconds": round(time.monotonic() - started_retrain, 1), "summary": _last_json(text),
                   "tail": text.splitlines()[-8:]}
        phase("retrain", **trained)
        log(f"retrain exited {trained['exit_code']} in {trained['seconds']} s: {trained['summary']}")
        if trained["exit_code"] == 0:
            challenger = registry.resolve("eta", "challenger")
            result["challenger"] = {"number": challenger.number, "version": challenger.version}

            log(f"4 shadow: every /v1/eta also answered by {challenger.version}, for {shadow_s:g} s")
            shadow = phase("shadow")
            rollouts.rollout("eta", challenger="challenger", shadow=1.0)
            time.sleep(shadow_s)
            shadowed = analyse(logged, since=shadow["start"], model="eta", rule=rule, until=time.time())
            shadow["analysis"] = shadowed.to_json()
            log(f"shadow analysis:\n{shadowed.table()}")

            log(f"5 canary: {canary_share:.0%} of users answered by the challenger, for {canary_s:g} s; a probe "
                "load measures failed requests and p99 per arm (the guard rails)")
            canary = phase("canary", share=canary_share)
            # the champion's arm stays shadowed: its requests keep adding pairs to the paired comparison
            rollouts.rollout("eta", canary=canary_share)
            probe = GuardProbe(serving.url, probe_bodies(data_dir), canary_share,
                               f"eta:{challenger.version}", rate=20.0).start()
            time.sleep(canary_s)
            canary["guard"] = probe.stop()
            log(f"guard rails: {canary['guard']}")
            # the decision weighs all the evidence since the shadow began: the paired shadow comparison and the canary
            analysis = analyse(logged, since=shadow["start"], model="eta", rule=rule, guard=canary["guard"])
            analyses.append(analysis)
            canary["analysis"] = analysis.to_json()
            log(f"canary analysis:\n{analysis.table()}")
            action = analysis.decision.action
            log(f"6 decision: {action} ({'; '.join(analysis.decision.reasons)})")
            decision = phase("decision", action=action, reasons=list(analysis.decision.reasons))
            if action == "promote":
                rollouts.promote("eta")
            elif action == "rollback":
                rollouts.rollback("eta")
            decision["served_after"] = sorted(served_versions(serving.url, "eta"))
        log("7 a deliberately bad model: retrained on shuffled labels; the gate must refuse it")
        bad = retrain("eta", private, artifacts, registry_uri, out_dir / "experiment.bad.log", shuffle_labels=True)
        phase("bad_model", **bad)
        log(f"bad model: retrain exited {bad['exit_code']} ({'refused by the gate' if bad['exit_code'] else 'LET THROUGH'})")
        result["city"] = city.stats()
        result["ended"] = time.time()
        result["rows_dir"] = str(logged)
        result["window"] = {"start": result["started"], "end": result["ended"]}
        result["registry"] = [{"number": v.number, "version": v.version, "aliases": list(v.aliases)}
                              for v in registry.versions("eta")]
        from monitoring.experiment_report import render

        events = [{"ts": p["start"], "label": name} for name, p in result["phases"].items()]
        if analyses:
            result["report"] = {k: str(v) for k, v in render("experiment", logged, analyses, events, out_dir).items()}
    result["passed"] = (result["phases"]["drift"]["alert_after_s"] is not None
                        and result["phases"]["retrain"]["exit_code"] == 0
                        and result["phases"].get("decision", {}).get("action") == "promote"
                        and result["phases"]["bad_model"]["exit_code"] != 0)
    (out_dir / "experiment.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m monitoring.experiment [--speed 240]`."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the city calls the simulator's batch steps every tick
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=PROJECT_ROOT / "data")
    parser.add_argument("--speed", type=float, default=240.0, help="world seconds per wall second")
    parser.add_argument("--healthy", type=float, default=30.0, help="wall seconds of the healthy phase")
    parser.add_argument("--drift-within", type=float, default=480.0, help="longest wait for the ETA error alert")
    parser.add_argument("--shadow", type=float, default=120.0, help="wall seconds of the shadow phase")
    parser.add_argument("--canary", type=float, default=150.0, help="wall seconds of the canary phase")
    parser.add_argument("--canary-share", type=float, default=0.5, help="share of users in the canary")
    parser.add_argument("--min-samples", type=int, default=150, help="outcomes per arm before the analysis judges")
    parser.add_argument("--out", type=Path, default=REPORTS)
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (registry, artifacts, joined rows)")
    args = parser.parse_args(argv)
    result = run_experiment(args.data_dir, args.speed, args.healthy, args.drift_within, args.shadow, args.canary,
                            args.canary_share, args.out, min_samples=args.min_samples, keep=args.keep)
    log(f"report: {result.get('report')}; experiment {'PASSED' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
