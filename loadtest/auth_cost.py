"""What API-key authentication costs /v1/eta: the same requests, at the same moments, with and without it.

    python -m loadtest.auth_cost [--requests 3000] [--concurrency 1 8] [--warmup 300]

Two ETA-only Courier apps run side by side (serving/serve_config.yaml, fixed replicas, the project's
artifacts and Feast store): one with `auth.enabled`, one without. Each closed-loop worker sends the same
request to both in turn (auth first on even requests, second on odd ones), so both arms see the same machine
noise; the difference of their latency percentiles is auth's cost end to end. The check alone is also timed
in-process (serving.auth.Authenticator.check, µs per request). Writes reports/auth_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loadtest.bench import ETA_ONLY, fixed_replicas, with_deployment_overrides
from loadtest.config import load_config
from loadtest.report import REPORTS, machine
from loadtest.server import ServiceProcess
from loadtest.traffic import city_from_config
from serving.auth import ApiKey, AuthArgs, Authenticator, new_key


def check_cost_us(n: int = 50_000) -> float:
    """µs per Authenticator.check of a valid key on /v1/eta, rate limit included (a bucket that never empties)."""
    key, entry = new_key("bench", ["public"])
    others = [new_key(f"other{i}", ["public", "internal"])[1] for i in range(4)]  # a realistic handful of keys
    auth = Authenticator(AuthArgs(enabled=True, rate_per_s=1e9, burst=10**9),
                         [ApiKey.model_validate(e) for e in [*others, entry]], export_metrics=False)
    header = f"Bearer {key}"
    for _ in range(2000):
        auth.check("/v1/eta", header)
    start = time.perf_counter()
    for _ in range(n):
        auth.check("/v1/eta", header)
    return (time.perf_counter() - start) / n * 1e6


def _serve_config(folder: Path) -> Path:
    from serving.config import load_serve_config

    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(fixed_replicas(with_deployment_overrides(load_serve_config(), ETA_ONLY)),
                                   sort_keys=False))
    return path


async def _paired(urls: dict[str, str], bodies: list[bytes], concurrency: int, headers: dict[str, dict[str, str]],
                  warmup: int) -> tuple[dict[str, list[float]], dict[str, dict[str, int]]]:
    """Latencies (ms) of the 200 answers per arm, and the count of every other status per arm."""
    import httpx

    took: dict[str, list[float]] = {arm: [] for arm in urls}
    errors: dict[str, dict[str, int]] = {arm: {} for arm in urls}
    clients = {arm: httpx.AsyncClient(base_url=url, timeout=30, headers={"content-type": "application/json",
                                                                          **headers[arm]})
               for arm, url in urls.items()}
    arms = list(urls)

    async def worker(w: int) -> None:
        for i in range(w, len(bodies), concurrency):
            order = arms if i % 2 == 0 else arms[::-1]  # neither arm always goes first
            for arm in order:
                started = time.perf_counter()
                response = await clients[arm].post("/v1/eta", content=bodies[i])
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200:  # e.g. 503 from admission control on a loaded machine
                    errors[arm][str(response.status_code)] = errors[arm].get(str(response.status_code), 0) + 1
                elif i >= warmup:
                    took[arm].append(elapsed)

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        for client in clients.values():
            await client.aclose()
    if any(status == "401" for codes in errors.values() for status in codes):
        raise RuntimeError(f"the key was refused: {errors}")
    return took, errors


def _start(factory: Callable[[], ServiceProcess], attempts: int = 3) -> ServiceProcess:
    """factory().start(), again on failure: on a loaded machine Ray's own start can time out."""
    for attempt in range(attempts):
        try:
            return factory().start()
        except (RuntimeError, TimeoutError) as exc:
            if attempt + 1 == attempts:
                raise
            print(f"start failed ({str(exc).splitlines()[0][:200]}), retrying", flush=True)
    raise AssertionError("unreachable")


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {"n": int(array.size), "mean_ms": round(float(array.mean()), 3),
            **{f"p{q}_ms": round(float(np.percentile(array, q)), 3) for q in (50, 90, 99)}}


def run(n_requests: int, concurrencies: list[int], warmup: int, seed: int = 7, sequential: bool = False
        ) -> dict[str, Any]:
    """Start both apps, run every concurrency, stop them; the report as a dict. `sequential`: one app at a time
    (off, then on), for a machine where two cannot start side by side; the arms then see different noise."""
    folder = REPORTS / "auth_cost"
    folder.mkdir(parents=True, exist_ok=True)
    config = _serve_config(folder)
    key, entry = new_key("bench", ["public"], rate_per_s=0)  # no rate limit: it would refuse the load itself
    keys = folder / "keys.yaml"
    keys.write_text(yaml.safe_dump([entry]))
    common = {"feed": None, "prediction_log": None}
    city = city_from_config(load_config()["traffic"], seed=seed)
    bodies = [r.body for r in city.request_stream(n_requests + warmup, ["eta"])]
    report: dict[str, Any] = {"command": "python -m loadtest.auth_cost " + f"--requests {n_requests} --concurrency "
                              + " ".join(map(str, concurrencies)) + f" --warmup {warmup}"
                              + (" --sequential" if sequential else ""),
                              "machine": machine(),
                              "check_us": round(check_cost_us(), 2), "runs": []}
    print(f"Authenticator.check: {report['check_us']} µs per request", flush=True)
    settings = {"auth_off": {"enabled": False}, "auth_on": {"enabled": True, "keys_file": str(keys)}}
    headers = {"auth_off": {}, "auth_on": {"Authorization": f"Bearer {key}"}}
    groups = [[arm] for arm in settings] if sequential else [list(settings)]
    rows: dict[int, dict[str, Any]] = {c: {"concurrency": c, "not_200": {}} for c in concurrencies}
    try:
        for group in groups:
            started: list[ServiceProcess] = []
            try:
                for arm in group:
                    started.append(_start(lambda arm=arm: ServiceProcess.courier(
                        config=config, log_path=folder / f"{arm}.log", timeout_s=600,
                        sets={**common, "auth": settings[arm]})))
                urls = {arm: server.url for arm, server in zip(group, started, strict=True)}
                for concurrency in concurrencies:
                    took, errors = asyncio.run(_paired(urls, bodies, concurrency, headers, warmup))
                    rows[concurrency].update({arm: _stats(values) for arm, values in took.items()})
                    rows[concurrency]["not_200"].update(errors)
            finally:
                for server in started:
                    server.stop()
        for row in rows.values():
            row["delta_ms"] = {k: round(row["auth_on"][k] - row["auth_off"][k], 3)
                               for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")}
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        (REPORTS / "auth_cost.json").write_text(json.dumps(report, indent=2))  # what was measured, even on failure
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per arm and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="closed-loop workers")
    parser.add_argument("--warmup", type=int, default=300, help="requests left out at the start of each run")
    parser.add_argument("--sequential", action="store_true", help="one app at a time (where two cannot start)")
    args = parser.parse_args(argv)
    report = run(args.requests, args.concurrency, args.warmup, sequential=args.sequential)
    print(f"auth check {report['check_us']} µs; end to end:", flush=True)
    for row in report["runs"]:
        print(f"  concurrency {row['concurrency']}: p50 {row['auth_off']['p50_ms']} -> {row['auth_on']['p50_ms']} ms, "
              f"p99 {row['auth_off']['p99_ms']} -> {row['auth_on']['p99_ms']} ms (delta {row['delta_ms']})")


if __name__ == "__main__":
    main()
