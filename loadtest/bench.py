"""`make bench`: the same ETA pipeline served five ways, loaded by the same open-loop generator.

    python -m loadtest.bench                       # every variant of loadtest/config.yaml `bench`
    python -m loadtest.bench --variants uvicorn ray_tuned --rates 200 400

Variants (all run Feast online read + ONNX with the same code, on the same data and model):

  ray_default  Courier's Ray Serve app with Ray's defaults: no deployment options (1 replica
               each, max_ongoing_requests 5), the default proxy, none of serving/ray_env.yaml
  ray_tuned    Courier's Ray Serve app as Courier ships it: serving/serve_config.yaml and
               serving/ray_env.yaml (plus loadtest/config.yaml `service` and `bench.ray_tuned`)
  ray_nolog    ray_tuned without the prediction log (app arg `prediction_log: null`): what logging costs
  ray_handle   ray_tuned, but /v1/eta goes Ingress -> EtaModel through a deployment handle
               (app arg `eta_in_ingress: false`, `bench.ray_handle.sets`)
  ray_batched  ray_handle with `@serve.batch` in EtaModel (app arg `eta_batching`)
  kserve       KServe's Python ModelServer (one worker) with a kserve.Model running the pipeline
  uvicorn      a plain single-process ASGI app under uvicorn running the pipeline inline
  inprocess    the pipeline called in a loop, no HTTP: the compute limit of one core

Each HTTP variant gets the same fixed Poisson rates (`bench.rates`) for `bench.duration_s`
seconds each, plus a bisection between its last passing and first failing rate; a rate
"holds" when p99 <= the SLO, errors <= 0.1 % and >= 97 % of it is answered. The in-process
variant measures per-call service times on one core, and its latency at each rate is that of
a single-server queue fed the same Poisson arrivals with those service times (the best any
one-process server could do). Raw results: reports/bench/<variant>.json; summary, table and
plot: reports/bench/summary.json, table.md, bench.png.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loadtest.config import load_config
from loadtest.openloop import Stage, arrival_times
from loadtest.report import REPORTS, latency_stats, machine, plot_bench, write_json
from loadtest.run import sweep
from loadtest.server import ServiceProcess, free_port
from loadtest.slo import SLO
from loadtest.traffic import Request, city_from_config

BENCH = REPORTS / "bench"
VARIANTS = ["ray_default", "ray_tuned", "ray_nolog", "ray_handle", "ray_batched", "kserve", "uvicorn", "inprocess"]
RAY_VARIANTS = ("ray_default", "ray_tuned", "ray_nolog", "ray_handle", "ray_batched")
DESCRIPTIONS = {
    "ray_default": "(a) Courier on Ray Serve, Ray's defaults",
    "ray_tuned": "(b) Courier on Ray Serve, as shipped (tuned)",
    "ray_nolog": "(b0) as shipped, without the prediction log",
    "ray_handle": "(b2) as shipped, but Ingress -> EtaModel handle",
    "ray_batched": "(b3) as (b2), with @serve.batch in EtaModel",
    "kserve": "(c) KServe ModelServer",
    "uvicorn": "(d) uvicorn, single process",
    "inprocess": "(e) in-process, no HTTP",
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- serve configs for the Ray variants ----------------------------------------------------------

def ray_default_config(base: dict[str, Any]) -> dict[str, Any]:
    """The serve config with every deployment option removed: Ray Serve's defaults apply."""
    config = copy.deepcopy(base)
    config["http_options"] = {k: v for k, v in config.get("http_options", {}).items() if k in ("host", "port")}
    for app in config["applications"]:
        app["deployments"] = [{"name": d["name"]} for d in app.get("deployments", [])]
    return config


def fixed_replicas(config: dict[str, Any]) -> dict[str, Any]:
    """Each autoscaled deployment pinned at its min_replicas (at least 1): the data path, not the autoscaler."""
    config = copy.deepcopy(config)
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            scaling = deployment.pop("autoscaling_config", None)
            if scaling is not None:
                deployment["num_replicas"] = max(1, int(scaling.get("min_replicas", 1)))
    return config


def with_deployment_overrides(base: dict[str, Any], overrides: dict[str, dict[str, Any]] | None,
                              http_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The serve config with some deployment options replaced (a recursive merge per deployment).

    An override of None removes that deployment (e.g. the feed's, for an ETA-only run).
    """
    config = copy.deepcopy(base)
    overrides = overrides or {}
    for app in config["applications"]:
        app["deployments"] = [d for d in app.get("deployments", [])
                              if not (d["name"] in overrides and overrides[d["name"]] is None)]
        for deployment in app["deployments"]:
            _merge(deployment, overrides.get(deployment["name"]) or {})
    if http_options:
        config["http_options"].update(http_options)
    return config


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif value is None:
            into.pop(key, None)
        else:
            into[key] = value


# -- variants -----------------------------------------------------------------------------------

ETA_ONLY = {"Retrieval": None, "Ranker": None}  # the feed's deployments, left out of every variant


def start_variant(name: str, config: dict[str, Any]) -> tuple[ServiceProcess, str]:
    """Start one HTTP variant; returns (process, request path for the ETA call)."""
    from serving.config import load_serve_config

    logs = BENCH / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bench = config.get("bench", {})
    if name in RAY_VARIANTS:
        base = with_deployment_overrides(load_serve_config(), ETA_ONLY)
        tuned = bench.get(name, {})
        if name == "ray_default":
            serve_config, env = ray_default_config(base), {}
        else:  # what Courier runs: service.env and service.deployments of loadtest/config.yaml, then bench's own
            shipped = {k: v for k, v in (config.get("service", {}).get("deployments") or {}).items()
                       if k not in ETA_ONLY}
            serve_config = with_deployment_overrides(with_deployment_overrides(base, shipped),
                                                     tuned.get("deployments"), tuned.get("http_options"))
            env = {**(config.get("service", {}).get("env") or {}), **(tuned.get("env") or {})}
        if bench.get("fixed_replicas"):  # a replica starting mid-sweep would take the cores being measured
            serve_config = fixed_replicas(serve_config)
        path = BENCH / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# serve config of the {name} benchmark variant (generated by loadtest.bench)\n"
                        f"# env: {env}\n" + yaml.safe_dump(serve_config, sort_keys=False))
        # ETA only: the feed's deployments (if configured) are left out of every variant.
        return ServiceProcess.start_with_retries(lambda: ServiceProcess.courier(
            env={k: str(v) for k, v in env.items()}, config=path, sets={"feed": None, **(tuned.get("sets") or {})},
            log_path=logs / f"{name}.log", ray_defaults=name == "ray_default")), "/v1/eta"
    if name == "kserve":
        def kserve_server() -> ServiceProcess:
            port = free_port()
            return ServiceProcess.python_module("loadtest.servers.kserve_server", ["--http_port", str(port)], port,
                                                log_path=logs / f"{name}.log", name=name)

        return ServiceProcess.start_with_retries(kserve_server), "/v1/models/eta:predict"
    if name == "uvicorn":
        def uvicorn_server() -> ServiceProcess:
            port = free_port()
            args = ["loadtest.servers.asgi:app", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--no-access-log", "--log-level", "warning", "--loop", "uvloop", "--http", "httptools"]
            return ServiceProcess.python_module("uvicorn", args, port, log_path=logs / f"{name}.log", name=name)

        return ServiceProcess.start_with_retries(uvicorn_server), "/v1/eta"
    raise ValueError(f"unknown variant {name!r}; variants: {VARIANTS}")


def warm_up(url: str, requests: list[Request], n: int = 200) -> None:
    """A few hundred sequential requests: JIT-free Python still has caches, pools and lazy imports."""
    import httpx

    with httpx.Client(timeout=30) as client:
        for request in requests[:n]:
            client.post(url + request.path, content=request.body, headers={"content-type": "application/json"})


def bench_http(name: str, config: dict[str, Any], rates: list[float], duration_s: float, warmup_s: float,
               slo: SLO, seed: int, profile_rate: float | None = None) -> dict[str, Any]:
    city = city_from_config(config["traffic"], seed=seed)
    endpoints = ["eta"]  # the benchmark compares the ETA pipeline only
    quiet = config.get("quiet") or {}
    if quiet.get("max_wait_s", 0) > 0:
        from loadtest.cpu import wait_for_quiet

        wait_for_quiet(float(quiet.get("max_foreign_cores", 0.25)), float(quiet["max_wait_s"]), log=log)
    svc, path = start_variant(name, config)
    try:
        base_requests = city.request_stream(2000, endpoints)
        warm_up(svc.url, [Request(r.endpoint, r.method, path, r.body) for r in base_requests])
        city = _PathCity(city, path)
        result = sweep(svc.url, rates, duration_s, warmup_s, city, endpoints, slo, seed=seed,
                       log=lambda m: log(f"{name}:{m}"), server_pid=svc.pid)
        if profile_rate:  # below what the variant holds, so the numbers are not those of an overload
            cap = result.get("capacity_rate")
            rate = min(profile_rate, 0.8 * cap) if cap else min(profile_rate, 0.5 * min(rates))
            result["cpu_profile"] = cpu_profile(svc, city, endpoints, rate, seed)
            log(f"{name}: CPU ms per request at {rate:g} req/s: {result['cpu_profile']['ms_per_request']}")
    finally:
        svc.stop()
    return result


def cpu_profile(svc: ServiceProcess, city: Any, endpoints: list[str], rate: float, seed: int,
                seconds: float = 12.0) -> dict[str, Any]:
    """Where the CPU goes at a moderate rate: CPU ms per request of each process role (and the generator)."""
    from loadtest.cpu import CpuMeter
    from loadtest.run import run_open

    meter = CpuMeter(svc.pid)
    meter.start()
    result = run_open(svc.url, {"rate": rate, "duration_s": seconds}, city, endpoints, seed=seed + 99)
    used = meter.stop()
    n = max(result.summary["requests"], 1)
    per_request = {role: round(seconds_used / n * 1000, 3) for role, seconds_used in used.items()}
    server = sum(v for k, v in per_request.items() if k != "load generator")
    return {"rate": rate, "requests": n, "ms_per_request": per_request, "server_ms_per_request": round(server, 3),
            "p50_ms": result.summary["p50_ms"], "p99_ms": result.summary["p99_ms"], "cpu": result.summary["cpu"]}


class _PathCity:
    """A City whose requests go to another path (KServe's v1 predict URL)."""

    def __init__(self, city: Any, path: str):
        self.city, self.path = city, path

    def request_stream(self, n: int, endpoints: list[str]) -> list[Request]:
        return [Request(r.endpoint, r.method, self.path, r.body) for r in self.city.request_stream(n, endpoints)]


def queue_latencies(arrivals: np.ndarray, service_s: np.ndarray) -> np.ndarray:
    """Latencies (s) of a FIFO single server: Lindley's recursion over arrivals and service times."""
    service = np.resize(service_s, len(arrivals))
    latency = np.empty(len(arrivals))
    free_at = 0.0
    for i, (arrival, s) in enumerate(zip(arrivals, service)):
        start = max(free_at, arrival)
        free_at = start + s
        latency[i] = free_at - arrival
    return latency


def bench_inprocess(config: dict[str, Any], rates: list[float], duration_s: float, slo: SLO, seed: int,
                    calls: int = 5000) -> dict[str, Any]:
    """Service time per call on one core, and the queueing latency it implies at each rate."""
    import gc

    from loadtest.pipeline import handle_eta, load_pipeline

    city = city_from_config(config["traffic"], seed=seed)
    bodies = [r.body for r in city.request_stream(calls, ["eta"])]
    pipeline = load_pipeline()
    for body in bodies[:300]:
        handle_eta(pipeline, body)
    service = np.empty(len(bodies))
    gc.collect()
    started = time.perf_counter()
    for i, body in enumerate(bodies):
        t = time.perf_counter()
        status, _ = handle_eta(pipeline, body)
        service[i] = time.perf_counter() - t
        if status != 200:
            raise RuntimeError(f"in-process pipeline answered {status}")
    wall = time.perf_counter() - started
    compute_rate = len(bodies) / wall
    points = []
    for rate in sorted(set(rates) | {round(compute_rate * f, 1) for f in (0.5, 0.8, 0.9, 0.95)}):
        arrivals = arrival_times([Stage(duration_s, rate)], "poisson", seed=seed)
        if rate >= compute_rate:  # an overloaded queue grows without bound: not held
            points.append({"offered_rate": rate, "achieved_rate": round(compute_rate, 1), "p50_ms": None,
                           "p99_ms": None, "passed": False, "reasons": ["above the compute limit"]})
            continue
        lat = queue_latencies(arrivals, service) * 1000
        stats = latency_stats(lat)
        points.append({"offered_rate": rate, "achieved_rate": rate, **stats, "errors": 0, "error_rate": 0.0,
                       "passed": bool(stats["p99_ms"] <= slo.p99_ms), "reasons": [], "simulated": True})
    held = [p["offered_rate"] for p in points if p["passed"]]
    return {"capacity_rate": max(held) if held else None, "compute_rate": round(compute_rate, 1),
            "service_time": latency_stats(service * 1000), "calls": len(bodies), "points": points}


def fixed_rate_table(results: dict[str, dict[str, Any]], rates: list[float]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        by_rate = {p["offered_rate"]: p for p in result.get("points", [])}
        out[name] = {str(rate): ({"p50_ms": by_rate[rate].get("p50_ms"), "p99_ms": by_rate[rate].get("p99_ms"),
                                  "passed": by_rate[rate]["passed"]} if rate in by_rate else None) for rate in rates}
    return out


def markdown_table(results: dict[str, dict[str, Any]], fixed_rates: list[float]) -> str:
    def capacity(name: str) -> float | None:
        return results.get(name, {}).get("capacity_rate")

    d, e = capacity("uvicorn"), capacity("inprocess")
    header = ["variant", "highest rate at p99 <= SLO (req/s)", "vs (d) uvicorn", "vs (e) in-process"]
    header += [f"p50 / p99 at {r:g}/s (ms)" for r in fixed_rates]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        cap = result.get("capacity_rate")
        by_rate = {p["offered_rate"]: p for p in result.get("points", [])}
        cells = [DESCRIPTIONS.get(name, name), "none" if cap is None else f"{cap:g}",
                 f"{cap / d:.2f}" if cap and d else "-", f"{cap / e:.2f}" if cap and e else "-"]
        for rate in fixed_rates:
            point = by_rate.get(rate)
            if point is None or point.get("p99_ms") is None:
                cells.append("not run" if point is None else "overloaded")
            else:
                mark = "" if point["passed"] else " (fails)"
                cells.append(f"{point['p50_ms']:.1f} / {point['p99_ms']:.1f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    parser.add_argument("--rates", nargs="+", type=float, default=None)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--table-rates", nargs="+", type=float, default=None,
                        help="fixed rates shown in the table (default: the first three of bench.rates)")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    bench = config["bench"]
    variants = args.variants or bench.get("variants", VARIANTS)
    rates = [float(r) for r in (args.rates or bench["rates"])]
    duration_s = float(args.duration or bench["duration_s"])
    warmup_s = float(bench.get("warmup_s", 3))
    slo = SLO.from_config(config)
    table_rates = args.table_rates or bench.get("table_rates") or rates[:3]
    BENCH.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    for name in variants:
        log(f"{DESCRIPTIONS[name]}: rates {rates}, {duration_s:g} s each")
        started = time.time()
        if name == "inprocess":
            result = bench_inprocess(config, rates, duration_s, slo, args.seed)
            log(f"inprocess: {result['compute_rate']} calls/s on one core, service time {result['service_time']}")
        else:
            result = bench_http(name, config, rates, duration_s, warmup_s, slo, args.seed,
                                profile_rate=bench.get("profile_rate"))
        result.update(variant=name, description=DESCRIPTIONS[name], seconds=round(time.time() - started, 1))
        write_json(BENCH / f"{name}.json", {"machine": machine(), "slo": slo.as_dict(), **result})
        results[name] = result
        log(f"{name}: highest rate held {result['capacity_rate']} req/s")
    summary = {"machine": machine(), "load_avg_before": load_before, "slo": slo.as_dict(), "rates": rates,
               "duration_s": duration_s, "variants": {n: {k: v for k, v in r.items() if k != "points"}
                                                      for n, r in results.items()},
               "fixed_rates": fixed_rate_table(results, table_rates)}
    write_json(BENCH / "summary.json", summary)
    table = markdown_table(results, table_rates)
    (BENCH / "table.md").write_text(table)
    plot_bench(BENCH / "bench.png", {DESCRIPTIONS[n]: r for n, r in results.items()}, slo.p99_ms)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
