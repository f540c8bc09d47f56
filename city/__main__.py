"""Run the live city against serving: `python -m city --url http://127.0.0.1:8000 --speed 60 --scenario rain`.

Orders call /v1/eta and feed sessions /v1/feed; deliveries and feed orders are written to the Redis
outcomes stream; live features are pushed to the online store every 5 world-minutes. A progress
line every ~10 s; Ctrl-C (or SIGTERM) stops it cleanly, a second Ctrl-C at once.
Switch a running city from elsewhere: `redis-cli set courier:city:scenario rain`, `... courier:city:pushes off`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

SCENARIO_CHOICES = ("normal", "rain", "new-restaurants", "taste-shift")  # = city.world.SCENARIOS (tested)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module doc)."""
    from serving.paths import PROJECT_ROOT

    parser = argparse.ArgumentParser(prog="python -m city", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="serving's base URL")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="time compression S: durations / S, rates x S (time of day stays the wall clock)")
    parser.add_argument("--scenario", choices=SCENARIO_CHOICES, default="normal")
    parser.add_argument("--duration", type=float, default=None, help="wall seconds to run (default: until Ctrl-C)")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("COURIER_DATA_DIR", PROJECT_ROOT / "data")),
                        help="the simulated city (offline/*.parquet, offline/simulation.json) and feast/ registry")
    parser.add_argument("--online-store", choices=("sqlite", "redis", "none"), default="sqlite",
                        help="where live features are pushed (none: do not push)")
    parser.add_argument("--redis", default=os.environ.get("COURIER_REDIS", "127.0.0.1:6379"),
                        help="host:port of Redis: the outcomes stream, the control keys and the redis online store")
    parser.add_argument("--outcomes-stream", default="courier:outcomes", help="Redis stream of outcome records")
    parser.add_argument("--prefix", default="courier", help="prefix of the control keys <prefix>:city:scenario|pushes")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve the city's own counters on this port (/metrics; the chart probes it)")
    args = parser.parse_args(argv)
    if args.speed <= 0:
        parser.error("--speed must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = parse_args(argv)
    # the simulator's restaurant choice shows a progress bar per call, one per tick here: noise in a log.
    # tqdm reads this when it is first imported, which is below (city.world imports the simulator)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="[city] %(levelname)s %(name)s: %(message)s")
    from city.live import City
    from city.world import World

    try:
        world = World.load(args.data_dir, speed=args.speed, seed=args.seed)
        world.set_scenario(args.scenario)
        store = None
        if args.online_store != "none":
            from city.push import open_online_store  # imports Feast (seconds)

            store = open_online_store(args.online_store, args.data_dir, redis=args.redis)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    city = City(world, args.url, redis=args.redis, store=store, outcomes_stream=args.outcomes_stream,
                prefix=args.prefix, concurrency=args.concurrency, out=lambda line: print(line, flush=True))

    def on_signal(signum: int, _frame: object) -> None:
        if city.stopping and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        print(f"[city] {signal.Signals(signum).name}: stopping (Ctrl-C again to abort)", flush=True)
        city.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.metrics_port is not None:
        serve_city_metrics(city, args.metrics_port)
    city.run(args.duration)
    return 0


def serve_city_metrics(city: object, port: int) -> None:
    """/metrics with the city's counters, read at scrape time: requests sent, outcomes, pushes, errors."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class CityCollector:
        def collect(self):
            stats = city.stats()
            for key, value in stats.items():
                if key == "pushes_on" or key == "pending":  # states, not counts
                    yield GaugeMetricFamily(f"courier_city_{key}", f"the live city: {key}", value=float(value))
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    yield CounterMetricFamily(f"courier_city_{key}", f"the live city: {key}", value=value)
            errors = CounterMetricFamily("courier_city_errors", "the live city's failed calls", labels=["kind"])
            for kind, count in (stats.get("errors") or {}).items():
                errors.add_metric([str(kind)], count)
            yield errors
            scenario = GaugeMetricFamily("courier_city_scenario", "the scenario running (1)", labels=["scenario"])
            scenario.add_metric([city.scenario], 1)
            yield scenario

    registry = CollectorRegistry()
    registry.register(CityCollector())
    start_http_server(port, registry=registry)


if __name__ == "__main__":
    sys.exit(main())
