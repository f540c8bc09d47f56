"""`make monitor`: the monitor and a real Prometheus with Courier's alert rules, on this machine.

    python -m monitoring.local [--time-scale 60]

Runs the monitor (stream joins, online metrics, drift, freshness; /metrics on :9108) against
`make serve`'s prediction log and the live city's outcomes (`make world`), and Debian's
Prometheus on :9090 scraping it and serving's metrics (:8080) with monitoring/rules/. Both stop
on Ctrl-C. Alerts: http://127.0.0.1:9090/alerts; plots: `make monitor-report`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from serving.paths import PROJECT_ROOT


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=PROJECT_ROOT / "data")
    parser.add_argument("--redis", default=None, help="host:port of the streams' Redis (default COURIER_REDIS)")
    parser.add_argument("--online-store", default="sqlite", choices=["sqlite", "redis", "none"])
    parser.add_argument("--time-scale", type=float, default=1.0, help="the city's --speed, if compressed")
    parser.add_argument("--serving-metrics", default="127.0.0.1:8080")
    parser.add_argument("--monitor-port", type=int, default=9108)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    args = parser.parse_args(argv)

    from monitoring.monitor import Monitor
    from monitoring.prometheus import PrometheusServer

    monitor = Monitor.build(args.data_dir, args.redis, args.time_scale,
                            None if args.online_store == "none" else args.online_store)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    monitor.start(args.monitor_port, "127.0.0.1")
    try:
        with PrometheusServer(serving_metrics=args.serving_metrics, monitor=f"127.0.0.1:{args.monitor_port}",
                              port=args.prometheus_port) as prometheus:
            prometheus.wait_ready()
            print(f"monitor on http://127.0.0.1:{args.monitor_port}/metrics; Prometheus on {prometheus.url} "
                  f"(alerts: {prometheus.url}/alerts); Ctrl-C stops both", flush=True)
            while not stop.wait(1.0):
                if not monitor.alive():
                    raise SystemExit("monitor: a worker thread died; see the log above")
    finally:
        monitor.stop()
    print("monitor and Prometheus stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
