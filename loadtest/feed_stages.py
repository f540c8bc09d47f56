"""Where a feed request's time goes: its per-stage timings, one request at a time.

    python -m loadtest.feed_stages --url http://127.0.0.1:8000 [--requests 300] [--rate 5]

Sends feeds for real simulated sessions (`include_timings: true`) at a gentle fixed pace and
prints p50 / p90 / p99 of the client's latency and of every stage the response reports
(retrieval, Feast reads, ranking, blending). A latency *under load* is `python -m loadtest run`.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import httpx
import numpy as np

from loadtest.traffic import City


def probe(url: str, requests: int, rate: float, city: City | None = None,
          request_time: str | None = None) -> dict[str, list[float]]:
    """Latency (ms) per stage name, plus `client` (end to end), over `requests` feeds.

    `request_time` (ISO 8601; default now) is when the feeds are asked for: at night every kitchen is
    closed and a feed has no candidates to rank."""
    when = {"request_time": request_time} if request_time else {}
    city = city or City(seed=0)
    stages: dict[str, list[float]] = defaultdict(list)
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(requests):
            session = city.session()
            started = time.perf_counter()
            response = http.post("/v1/feed", json={"user_id": session.user_id, "user_lat": session.lat,
                                                   "user_lon": session.lon, "include_timings": True, **when})
            stages["client"].append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            for name, ms in response.json()["timings_ms"].items():
                stages[name].append(ms)
            time.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))
    return stages


def main() -> None:
    """Print the Markdown table of docs/benchmarks.md ("The feed")."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running Courier (make serve)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=5.0, help="feeds per second, one at a time")
    parser.add_argument("--request-time", default=None, help="ISO 8601 time of the feeds (default now; "
                        "kitchens are closed at night)")
    args = parser.parse_args()
    stages = probe(args.url, args.requests, args.rate, request_time=args.request_time)
    print(f"{args.requests} feeds at {args.rate:g}/s against {args.url}\n")
    print("| stage | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|")
    for name, values in stages.items():
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        print(f"| {name} | {p50:.1f} | {p90:.1f} | {p99:.1f} |")


if __name__ == "__main__":
    main()
