"""`make chaos`: the drill of loadtest/chaos.py against a local Courier, or a cluster.

Locally it starts a private redis-server (free port), materializes Courier's features into it,
starts Courier on that Redis online store, then runs the configured faults under constant
open-loop load. With `--kubernetes --url <service URL>` the same faults hit pods instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from loadtest.chaos import (
    Fault,
    FaultRecord,
    KubernetesKiller,
    KubernetesStoreOutage,
    LocalRayKiller,
    LocalRedisOutage,
    RedisServer,
    ReplicaSampler,
    analyze,
    fault_runner,
    prepare_redis_store,
    retry_policy,
    temp_dir,
)
from loadtest.config import resolve_rate
from loadtest.openloop import Clock
from loadtest.report import REPORTS, write_run_report
from loadtest.run import run_open
from loadtest.slo import SLO
from loadtest.traffic import OFFLINE, city_from_config


def run_drill(config: dict[str, Any], *, kubernetes: bool = False, url: str | None = None, seed: int = 0,
              log: Callable[[str], None] = print, name: str = "chaos") -> int:
    chaos = config["chaos"]
    slo = SLO.from_config(config)
    rate = resolve_rate(chaos["rate"], float(config["target_rate"]))
    # On a cluster a fault deletes a whole pod, so the cluster has a schedule of its own (config.yaml).
    schedule = chaos["kubernetes"].get("faults", chaos["faults"]) if kubernetes else chaos["faults"]
    faults = [Fault.from_config(raw) for raw in schedule]
    spec = {"rate": rate, "duration_s": float(chaos["duration_s"]), "arrival": "poisson", "warmup_s": 0}
    city = city_from_config(config["traffic"], seed=seed)
    endpoints = config["traffic"]["endpoints"]
    retry = retry_policy(chaos)
    window_s = float(chaos["recovery_window_s"])
    log_records: list[FaultRecord] = []
    clock = Clock()
    load_before = os.getloadavg()

    if kubernetes:
        if not url:
            raise SystemExit("--kubernetes needs --url (the cluster's Courier service URL)")
        from kubernetes import client

        k8s = chaos["kubernetes"]
        killer = KubernetesKiller.from_kubeconfig(k8s["namespace"], k8s["selectors"])
        outage = KubernetesStoreOutage(client.AppsV1Api(), k8s["namespace"], k8s["redis"]["name"],
                                       k8s["redis"].get("kind", "statefulset"))
        sampler = ReplicaSampler(killer)
        result = run_open(url, spec, city, endpoints, retry=retry, clock=clock, seed=seed,
                          background=[fault_runner(faults, killer, outage, log_records, seed), sampler])
        timeline = sampler.samples
        return _finish(name, result, log_records, timeline, window_s, slo, chaos, rate, url, load_before, log)

    from loadtest.__main__ import courier  # the same start/stop as the other commands

    workdir = temp_dir("courier-chaos-")
    from loadtest.server import free_port

    redis = RedisServer(free_port(), workdir / "redis")
    try:
        redis.start()
        log(f"private redis-server on {redis.address}; materializing Courier's features into it ...")
        data_dir = prepare_redis_store(redis, workdir / "data", OFFLINE)
        sets = {"online_store": "redis", "redis": redis.address, "data_dir": str(data_dir)}
        with courier(config, None, name, sets=sets) as (served_url, svc):
            killer = LocalRayKiller(svc.pid)
            outage = LocalRedisOutage(redis)
            log(f"drill: {rate:g} req/s for {spec['duration_s']:g} s, faults: "
                + ", ".join(f"{f.at_s:g}s {f.label}" for f in faults))
            result = run_open(served_url, spec, city, endpoints, retry=retry, clock=clock, seed=seed,
                              background=[fault_runner(faults, killer, outage, log_records, seed)], server_pid=svc.pid)
            timeline = killer.replica_timeline(clock)
        return _finish(name, result, log_records, timeline, window_s, slo, chaos, rate, served_url, load_before, log,
                       service=config.get("service"))
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _finish(name, result, log_records, timeline, window_s, slo, chaos, rate, url, load_before, log,
            service=None) -> int:
    verdict = analyze(result.records, log_records, timeline, window_s, slo.p99_ms)
    events = [{"t": f["t"], "label": f["fault"]} for f in verdict["faults"]]
    extra = {"chaos": verdict, "retry": chaos.get("retry"), "url": url, "load_avg_before": load_before,
             "service": service, "offered_rate": rate}
    paths = write_run_report(name, result.summary, result.records, offered={"t": [0, result.stages[0].duration_s],
                             "rate": [rate, 0]}, replicas=timeline, events=events, windows=verdict["windows"],
                             slo={**slo.as_dict(), "target_rate": None, "gated": False}, extra=extra,
                             out_dir=REPORTS / "loadtest", cpu=result.cpu or ())
    log(f"{name}: {verdict['requests']} requests, {verdict['failed']} failed after one retry "
        f"(success rate {verdict['success_rate']:.4%}), {verdict['first_attempt_failures']} failed a first attempt, "
        f"{verdict['degraded_answers']} degraded answers; p99 {verdict['p99_ms']} ms overall, "
        f"{verdict['p99_outside_recovery_ms']} ms outside the {window_s:g}s recovery windows")
    for fault in verdict["faults"]:
        detail = {k: v for k, v in fault.items() if k not in ("t", "fault")}
        log(f"  {fault['t']:7.2f}s {fault['fault']}: {detail}")
    log(f"report {paths['json']}; drill {'PASSED' if verdict['passed'] else 'FAILED'}")
    return 0 if verdict["passed"] else 1
