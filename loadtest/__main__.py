"""Courier's load tool.

    python -m loadtest run steady            # the SLO gate at the target rate (exit 1 on failure)
    python -m loadtest run step              # autoscaling: replicas up under load and down after
    python -m loadtest run smoke --url http://127.0.0.1:8000
    python -m loadtest capacity              # sweep: the highest rate meeting the SLO
    python -m loadtest chaos                 # kill replicas / proxy, take the online store away
    python -m loadtest calibrate             # in-flight requests per deployment vs rate (autoscaling)
    python -m loadtest gate reports/loadtest/steady.json

Without --url each command starts Courier itself (serving.launch, with `service` settings of
loadtest/config.yaml) on free ports and stops it afterwards. Reports go to reports/loadtest/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtest.config import load_config, scenario
from loadtest.report import REPORTS, machine, write_json, write_run_report
from loadtest.run import offered_series, run_open, sweep
from loadtest.server import ServiceProcess
from loadtest.slo import SLO
from loadtest.traffic import city_from_config

LOG_DIR = REPORTS / "loadtest" / "logs"


def log(message: str) -> None:
    print(f"[loadtest {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def courier(config: dict[str, Any], url: str | None, name: str, sets: dict[str, Any] | None = None
            ) -> Iterator[tuple[str, ServiceProcess | None]]:
    """The URL to load: the given one, or a Courier we start now (and stop afterwards)."""
    quiet = config.get("quiet") or {}
    if quiet.get("max_wait_s", 0) > 0:
        from loadtest.cpu import wait_for_quiet

        wait_for_quiet(float(quiet.get("max_foreign_cores", 0.25)), float(quiet["max_wait_s"]), log=log)
    if url:
        yield url, None
        return
    service = config.get("service", {})
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    serve_config = Path(service["config"]) if service.get("config") else None
    if service.get("deployments"):  # an experiment: deployment options changed from the shipped config
        serve_config = overridden_serve_config(name, serve_config, service["deployments"])
        log(f"serve config with deployment overrides {service['deployments']}: {serve_config}")
    log_path = LOG_DIR / f"{name}.server.log"
    log(f"starting Courier (log: {log_path}) ...")
    svc = ServiceProcess.start_with_retries(lambda: ServiceProcess.courier(
        env={k: str(v) for k, v in (service.get("env") or {}).items()},
        sets={**(service.get("sets") or {}), **(sets or {})}, config=serve_config, log_path=log_path))
    try:
        log(f"Courier ready at {svc.url}")
        yield svc.url, svc
    finally:
        svc.stop()
    log("Courier stopped")


def overridden_serve_config(name: str, base: Path | None, deployments: dict[str, Any]) -> Path:
    """Write the serve config with some deployment options replaced, for an experiment's record."""
    import yaml

    from loadtest.bench import with_deployment_overrides
    from serving.config import SERVE_CONFIG, load_serve_config

    config = with_deployment_overrides(load_serve_config(base or SERVE_CONFIG), deployments)
    path = REPORTS / "loadtest" / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {base or SERVE_CONFIG} with loadtest config service.deployments overrides\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def _replicas(svc: ServiceProcess | None, wall0: float) -> list[dict[str, Any]]:
    if svc is None:
        return []
    from loadtest.ray_local import LocalRay, replica_timeline

    try:
        ray = LocalRay(svc.pid)
        return [{"t": round(t - wall0, 3), "counts": counts} for t, counts in replica_timeline(ray.replica_events(), ray.app)]
    except (OSError, RuntimeError, ValueError) as exc:  # replica counts are a bonus of runs that started the server
        log(f"no replica timeline: {exc}")
        return []


def cmd_run(args: argparse.Namespace, config: dict[str, Any]) -> int:
    spec = scenario(config, args.scenario)
    slo = SLO.from_config(config)
    endpoints = spec.get("endpoints") or config["traffic"]["endpoints"]  # a scenario may load fewer endpoints
    city = city_from_config(config["traffic"], seed=args.seed)
    gate = bool(spec.get("gate", False)) and not args.no_gate
    target = float(config["target_rate"]) if gate and args.scenario == "steady" else None
    name = args.name or args.scenario
    load_before = os.getloadavg()
    code = 0
    with courier(config, args.url, name) as (url, svc):
        log(f"scenario {name}: {spec['stages']} ({spec.get('arrival', 'poisson')} arrivals) -> {url}")
        quiet = config.get("quiet") or {}
        retries = int(quiet.get("noisy_retries", 0)) if svc else 0  # a server of --url counts as other work
        for attempt in range(retries + 1):
            result = run_open(url, spec, city, endpoints, slo=slo if gate else None, target_rate=target,
                              seed=args.seed, server_pid=svc.pid if svc else None)
            foreign = result.summary["cpu"]["foreign_cores"]
            if (result.gate is None or result.gate.passed or foreign <= float(quiet.get("max_foreign_cores", 0.25))
                    or attempt == retries):
                break
            from loadtest.cpu import wait_for_quiet

            log(f"{name} failed while other work used {foreign} cores of the machine: waiting for quiet, then again")
            wait_for_quiet(float(quiet.get("max_foreign_cores", 0.25)), float(quiet.get("max_wait_s", 300)),
                           server_pid=svc.pid if svc else None, log=log)
        result.summary["attempts"] = attempt + 1
        replicas = _replicas(svc, result.records.wall_start)
        _report(name, spec, result, replicas, slo, gate, target, endpoints, url, load_before,
                None if args.url else config.get("service"))
        if result.gate is not None:
            log("SLO gate: " + ("PASS" if result.gate.passed else "FAIL: " + "; ".join(result.gate.reasons)))
            code = 0 if result.gate.passed else 1
        if args.locust_users:
            code |= run_locust(url, args.locust_users, args.locust_seconds, gate=gate)
    return code


def _report(name, spec, result, replicas, slo, gate, target, endpoints, url, load_before, service) -> None:
    events, at = [], 0.0
    for i, stage in enumerate(result.stages[1:]):
        at += result.stages[i].duration_s
        events.append({"t": round(at, 3), "label": f"{stage.rate:g} req/s"})
    slo_info = {**slo.as_dict(), "target_rate": target, "gated": gate}
    extra = {"scenario": spec, "endpoints_in_mix": endpoints, "url": url, "load_avg_before": load_before,
             "gate": result.gate.as_dict() if result.gate else None, "service": service}
    paths = write_run_report(name, result.summary, result.records, offered=offered_series(result.stages),
                             replicas=replicas, events=events, windows=result.windows, slo=slo_info, extra=extra,
                             cpu=result.cpu or ())
    s = result.summary
    log(f"{name}: offered {s['offered_rate']} req/s, answered {s['achieved_rate']}/s, p50 {s['p50_ms']} ms, "
        f"p99 {s['p99_ms']} ms, max {s['max_ms']} ms, errors {s['errors']} ({s['error_rate']:.4%}); "
        f"cores busy {s['cpu']['busy_cores']}, of which other work {s['cpu']['foreign_cores']}; report {paths['json']}")
    if replicas:
        peak: dict[str, int] = {}
        for sample in replicas:
            for dep, n in sample["counts"].items():
                peak[dep] = max(peak.get(dep, 0), n)
        log(f"replicas: peak {peak}, at end {replicas[-1]['counts']}")


def run_locust(url: str, users: int, seconds: float, *, gate: bool, name: str = "locust",
               time_scale: float = 1.0) -> int:
    """Locust headless (closed loop, think times) against url; its report comes from loadtest/report.py."""
    import subprocess

    spawn_rate = max(1, users // 10)
    env = {**os.environ, "COURIER_LOCUST_NAME": name, "COURIER_LOCUST_GATE": "1" if gate else "0",
           "COURIER_LOCUST_TIME_SCALE": str(time_scale), "COURIER_LOCUST_WARMUP_S": str(users / spawn_rate + 10)}
    argv = [sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")), "--host", url,
            "--headless", "-u", str(users), "-r", str(spawn_rate), "-t", f"{int(seconds)}s",
            "--only-summary", "--loglevel", "WARNING"]
    log(f"locust: {users} users (closed loop, think times) for {seconds:g} s -> {url}")
    return subprocess.run(argv, env=env, check=False).returncode


def cmd_capacity(args: argparse.Namespace, config: dict[str, Any]) -> int:
    spec = scenario(config, "capacity")
    slo = SLO.from_config(config)
    city = city_from_config(config["traffic"], seed=args.seed)
    load_before = os.getloadavg()
    with courier(config, args.url, "capacity") as (url, svc):
        log(f"capacity sweep {spec['rates']} req/s, {spec['duration_s']} s each -> {url}")
        result = sweep(url, spec["rates"], spec["duration_s"], spec["warmup_s"], city, config["traffic"]["endpoints"],
                       slo, arrival=spec.get("arrival", "poisson"), seed=args.seed, log=log,
                       server_pid=svc.pid if svc else None)
    payload = {"name": "capacity", "machine": machine(), "load_avg_before": load_before, "slo": slo.as_dict(),
               "service": None if args.url else config.get("service"), "scenario": spec, **result}
    path = write_json(REPORTS / "loadtest" / "capacity.json", payload)
    log(f"capacity: {result['capacity_rate']} req/s (first failing {result['first_failing_rate']}); report {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace, config: dict[str, Any]) -> int:
    from loadtest.calibrate import calibrate

    n = args.replicas
    one = {"autoscaling_config": {"min_replicas": n, "max_replicas": n, "initial_replicas": n}}
    deployments = {name: one for name in args.deployments}
    config = {**config, "service": {**config.get("service", {}),
                                    "deployments": {**deployments, **(config.get("service", {}).get("deployments") or {})}}}
    city = city_from_config(config["traffic"], seed=args.seed)
    load_before = os.getloadavg()
    with courier(config, None, "calibration") as (url, svc):
        metrics_url = next(a for a in svc.argv if a.isdigit() and svc.argv[svc.argv.index(a) - 1] == "--metrics-port")
        rows = calibrate(url, f"http://127.0.0.1:{metrics_url}/metrics", args.rates, args.duration, city,
                         config["traffic"]["endpoints"], log=log, server_pid=svc.pid)
    payload = {"name": "calibration", "machine": machine(), "load_avg_before": load_before,
               "pinned": deployments, "service": config.get("service"), "rows": rows}
    path = write_json(REPORTS / "loadtest" / f"calibration-{n}.json", payload)
    log(f"report {path}")
    return 0


def cmd_chaos(args: argparse.Namespace, config: dict[str, Any]) -> int:
    from loadtest.chaos_drill import run_drill

    return run_drill(config, kubernetes=args.kubernetes, url=args.url, seed=args.seed, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="config file (default loadtest/config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="one open-loop scenario")
    run_p.add_argument("scenario")
    run_p.add_argument("--name", help="report name (default: the scenario's)")
    run_p.add_argument("--no-gate", action="store_true", help="report only, exit 0")
    run_p.add_argument("--locust-users", type=int, default=0, help="then run Locust headless with this many users")
    run_p.add_argument("--locust-seconds", type=float, default=60)
    cap = sub.add_parser("capacity", help="rate sweep: the highest rate meeting the SLO")
    chaos = sub.add_parser("chaos", help="the chaos drill")
    chaos.add_argument("--kubernetes", action="store_true", help="kill pods through the Kubernetes API")
    cal = sub.add_parser("calibrate", help="ongoing requests per deployment vs rate, replicas pinned")
    cal.add_argument("--rates", nargs="+", type=float, default=[25, 50, 100, 150, 200, 250])
    cal.add_argument("--duration", type=float, default=24)
    cal.add_argument("--deployments", nargs="+", default=["Ingress", "EtaModel"])
    cal.add_argument("--replicas", type=int, default=1, help="replicas each deployment is pinned to")
    cal.add_argument("--seed", type=int, default=0)
    gate = sub.add_parser("gate", help="gate report files on the SLO")
    gate.add_argument("reports", nargs="+")
    for p in (run_p, cap, chaos):
        p.add_argument("--url", help="load this server instead of starting Courier")
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "gate":
        from loadtest.slo import main as gate_main

        return gate_main(args.reports)
    config = load_config(args.config)
    commands = {"run": cmd_run, "capacity": cmd_capacity, "chaos": cmd_chaos, "calibrate": cmd_calibrate}
    return commands[args.command](args, config)


if __name__ == "__main__":
    sys.exit(main())
