"""Graceful overload: open-loop /v1/feed (or /v1/eta) at 1x, 2x and 5x the measured capacity (`make overload`).

    python -m loadtest.overload                          # starts Courier, measures its capacity, then the runs
    python -m loadtest.overload --url http://127.0.0.1:8000 --capacity 400 --multiples 1 2 5

1. Capacity: closed loop, `--connections` clients (below the Ingress replicas' admission slots, so
   nothing is refused), answers per second over `--capacity-seconds`.
2. For each multiple: Poisson arrivals at multiple x capacity for `--seconds` (the first `--warmup`
   seconds are not judged), latency from the scheduled send (loadtest/openloop.py).

Per run: goodput (answers per second, and as a share of the capacity), refusals (503/429) and their
latency, the admitted answers' p50/p99 against the SLO (loadtest/config.yaml), anything else (timeouts,
408, connection errors), the generator's own CPU and lag: it shares the cores with the server, so a
generator that falls behind its schedule would understate the offered load. The table (markdown) goes
to stdout and, with the raw summaries, to reports/loadtest/overload.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import numpy as np
import orjson

from loadtest import openloop
from loadtest.config import load_config
from loadtest.cpu import ForeignLoad
from loadtest.report import REPORTS, machine, write_json
from loadtest.slo import SLO
from loadtest.traffic import Request, city_from_config
from serving.auth import client_headers

REFUSED = (503, 429)


def log(message: str) -> None:
    print(f"[overload {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _closed_loop(url: str, requests: list[Request], connections: int, seconds: float) -> dict[str, Any]:
    """`connections` clients, each sending its next request when the last is answered."""
    statuses: list[int] = []
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, headers=client_headers()) as session:  # COURIER_API_KEY
        async def client(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                request = requests[i % len(requests)]
                i += connections
                started = time.monotonic()
                try:
                    async with session.post(url + request.path, data=request.body,
                                            headers={"content-type": "application/json"},
                                            timeout=aiohttp.ClientTimeout(total=10)) as response:
                        await response.read()
                        statuses.append(response.status)
                except (TimeoutError, aiohttp.ClientError):
                    statuses.append(-1)
                latencies.append(time.monotonic() - started)

        await asyncio.gather(*(client(k) for k in range(connections)))
    status = np.array(statuses)
    ok = status == 200
    return {"connections": connections, "seconds": seconds, "answered_per_s": round(float(ok.sum()) / seconds, 1),
            "refused": int(np.isin(status, REFUSED).sum()), "other": int((~ok & ~np.isin(status, REFUSED)).sum()),
            "p50_ms": round(float(np.percentile(np.array(latencies)[ok], 50)) * 1000, 1) if ok.any() else None}


def capacity(url: str, requests: list[Request], connections: int, seconds: float) -> dict[str, Any]:
    """Closed-loop throughput: what the server answers when it is never idle nor flooded."""
    cpu0, wall0 = _cpu_s(), time.monotonic()
    result = asyncio.run(_closed_loop(url, requests, connections, seconds))
    result["generator_cores"] = round((_cpu_s() - cpu0) / (time.monotonic() - wall0), 2)
    return result


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def open_run(url: str, requests: list[Request], rate: float, seconds: float, warmup_s: float, capacity_rps: float,
             slo_ms: float, seed: int = 0, server_pid: int | None = None) -> dict[str, Any]:
    """Open loop at `rate`: goodput, refusals and latencies of what was scheduled after the warm-up."""
    times = openloop.arrival_times([openloop.Stage(seconds, rate)], "poisson", seed=seed)
    meter = ForeignLoad(server_pid)  # other people's work on the shared cores, recorded with each run
    meter.start()
    cpu0, wall0 = _cpu_s(), time.monotonic()
    records = openloop.run(url, times, requests, timeout_s=10.0, max_connections=8192)
    generator_cores = (_cpu_s() - cpu0) / (time.monotonic() - wall0)
    machine_cores = meter.stop()
    judged = records.scheduled >= warmup_s
    judged_s = seconds - warmup_s
    status, latency = records.status[judged], records.latency_ms[judged]
    ok = status == 200
    refused = np.isin(status, REFUSED)
    other = ~ok & ~refused
    lag = (records.started - records.scheduled)[judged] * 1000
    good = ok & (latency <= slo_ms) & ~records.degraded[judged]
    others: dict[str, int] = {}
    for code, count in zip(*np.unique(status[other], return_counts=True)):
        others[{openloop.TIMEOUT: "timeout", openloop.CONNECTION_ERROR: "connection error"}.get(int(code), str(code))] \
            = int(count)
    return {
        "multiple": round(rate / capacity_rps, 2), "offered_per_s": round(rate, 1),
        "sent_per_s": round(float(judged.sum()) / judged_s, 1),
        "answered_per_s": round(float(ok.sum()) / judged_s, 1),
        "goodput_per_s": round(float(good.sum()) / judged_s, 1),  # answered, undegraded, within the SLO
        "goodput_of_capacity": round(float(good.sum()) / judged_s / capacity_rps, 3),
        "refused_per_s": round(float(refused.sum()) / judged_s, 1),
        "refused_share": round(float(refused.mean()), 3) if len(status) else 0.0,
        "refusal_p50_ms": _pct(latency[refused], 50), "refusal_p99_ms": _pct(latency[refused], 99),
        "admitted_p50_ms": _pct(latency[ok], 50), "admitted_p99_ms": _pct(latency[ok], 99),
        "degraded": int(records.degraded[judged].sum()), "other": others,
        "generator_cores": round(generator_cores, 2), "generator_lag_p99_ms": _pct(lag, 99),
        "foreign_cores": machine_cores["foreign_cores"], "busy_cores": machine_cores["busy_cores"],
    }


def table(runs: list[dict[str, Any]], slo_ms: float) -> str:
    """The markdown table of docs/benchmarks.md "Overload"."""
    header = ("| offered | req/s | goodput req/s (of capacity) | refused (share) | refusal p50 / p99 ms "
              f"| admitted p50 / p99 ms (SLO {slo_ms:g}) | other | generator cores / lag p99 ms | other work (cores) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        other = ", ".join(f"{k}: {v}" for k, v in r["other"].items()) or "0"
        lines.append(f"| {r['multiple']:g}x | {r['offered_per_s']:.0f} | {r['goodput_per_s']:.0f} "
                     f"({r['goodput_of_capacity']:.0%}) | {r['refused_per_s']:.0f}/s ({r['refused_share']:.0%}) "
                     f"| {r['refusal_p50_ms']} / {r['refusal_p99_ms']} | {r['admitted_p50_ms']} / {r['admitted_p99_ms']} "
                     f"| {other} | {r['generator_cores']} / {r['generator_lag_p99_ms']} | {r['foreign_cores']} |")
    return "\n".join(lines)


def overload_requests(config: dict[str, Any], endpoint: str, seed: int = 0, n: int = 20000) -> list[Request]:
    """The city's requests to one endpoint; feeds are asked for at the last noon (UTC), when kitchens are open,
    so that the work per feed, hence the capacity, does not depend on the hour the benchmark runs."""
    city = city_from_config({**config["traffic"], "endpoints": [endpoint]}, seed=seed)
    requests = city.request_stream(n, [endpoint])
    if endpoint != "feed":
        return requests
    noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    noon -= timedelta(days=1) if noon > datetime.now(UTC) else timedelta(0)
    at = noon.isoformat()
    return [replace(r, body=orjson.dumps({**orjson.loads(r.body), "request_time": at})) for r in requests]


def main(argv: list[str] | None = None) -> int:
    from loadtest.__main__ import (
        courier,  # starts Courier (shipped config) unless --url; waits for a quiet machine
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running Courier (default: start one)")
    parser.add_argument("--capacity", type=float, default=None, help="req/s; default: measure it (closed loop)")
    parser.add_argument("--connections", type=int, default=2,
                        help="closed-loop clients of the capacity run: the slots HAProxy admits (2 Ingress replicas x 1)")
    parser.add_argument("--capacity-seconds", type=float, default=15)
    parser.add_argument("--multiples", type=float, nargs="+", default=[1, 2, 5])
    parser.add_argument("--seconds", type=float, default=25, help="length of each open-loop run")
    parser.add_argument("--warmup", type=float, default=5, help="first seconds of each run, not judged")
    parser.add_argument("--endpoint", choices=["feed", "eta"], default="feed",
                        help="feed: the heavy route, where the server and not this Python generator is the limit "
                             "on 2 cores; eta: ~10x lighter, its 2x and 5x outrun the generator itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="seconds to wait for a quiet machine first (default: loadtest/config.yaml quiet.max_wait_s)")
    args = parser.parse_args(argv)
    config = load_config()
    if args.quiet_wait is not None:
        config["quiet"] = {**(config.get("quiet") or {}), "max_wait_s": args.quiet_wait}
    slo = SLO.from_config(config)
    requests = overload_requests(config, args.endpoint, args.seed)
    with courier(config, args.url, "overload") as (url, svc):
        log(f"warm-up against {url}")
        capacity(url, requests, args.connections, 5)
        measured = None
        if args.capacity is None:
            measured = capacity(url, requests, args.connections, args.capacity_seconds)
            log(f"capacity (closed loop): {measured}")
        cap = args.capacity or measured["answered_per_s"]
        runs = []
        for multiple in args.multiples:
            run = open_run(url, requests, multiple * cap, args.seconds, args.warmup, cap, slo.p99_ms, args.seed,
                           svc.pid if svc else None)
            log(f"{multiple:g}x: {run}")
            runs.append(run)
            time.sleep(3)  # the replicas' queues drain between runs
    command = "make overload" + (f" (python -m loadtest.overload {' '.join(argv)})" if argv else "")
    text = (f"Capacity {cap:.0f} req/s ({'closed loop, ' + str(args.connections) + ' connections' if measured else 'given'}); "
            f"{args.seconds:g} s per run, the first {args.warmup:g} s not judged; `{command}`\n\n{table(runs, slo.p99_ms)}\n")
    print(text)
    out = REPORTS / "loadtest"
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.md").write_text(text)
    write_json(out / "overload.json", {"capacity": measured or {"answered_per_s": cap, "given": True}, "runs": runs,
                                       "slo_ms": slo.p99_ms, "machine": machine(), "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
