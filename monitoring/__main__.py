"""Run the monitor in the foreground: Prometheus metrics on :9108, progress lines, Ctrl-C stops it.

    python -m monitoring [--redis host:port] [--data-dir data] [--port 9108] [--time-scale 1]
                         [--online-store sqlite|redis|none] [--serve-config serving/serve_config.yaml]
                         [--config monitoring/config.yaml]

The artifact root is the serve config's `artifacts` (relative to the project root; default
COURIER_ARTIFACTS, then ./artifacts): a version named in the prediction log is found at
`<artifacts>/<model>/<model_version>/` (its manifest and drift reference); the prediction stream is
the serve config's `prediction_log.stream`. Joined rows go
to `<data-dir>/offline/logged/`, the Feast registry is `<data-dir>/feast`. SIGTERM (Kubernetes)
and Ctrl-C stop it cleanly: the rows joined so far are written first.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

import redis
from pydantic import ValidationError

from monitoring.monitor import CONFIG, Monitor, MonitorSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module doc)."""
    parser = argparse.ArgumentParser(prog="python -m monitoring", description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=None,
                        help="host:port of the Redis holding the streams (default: the serve config's, then "
                             "COURIER_REDIS, then 127.0.0.1:6379); also the online store with --online-store redis")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="holds offline/ (the logged rows go to offline/logged) and feast/")
    parser.add_argument("--port", type=int, default=9108, help="Prometheus metrics port")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="speed S of a drill's compressed clock: world durations are divided by it")
    parser.add_argument("--online-store", choices=["sqlite", "redis", "none"], default="sqlite",
                        help="the online store to probe for freshness (none: no probe)")
    parser.add_argument("--serve-config", type=Path, default=None,
                        help="the serve config naming the served models (default: serving/serve_config.yaml)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the monitor's settings")
    args = parser.parse_args(argv)
    if args.time_scale <= 0:
        parser.error("--time-scale must be > 0 (1 = real time)")
    if not 0 < args.port < 65536:
        parser.error("--port must be 1-65535")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build the monitor, serve its metrics, run until SIGTERM or Ctrl-C."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("feast").setLevel(logging.WARNING)  # a registry refresh line on every probe is noise
    try:
        settings = MonitorSettings.load(args.config)
    except ValidationError as exc:
        raise SystemExit(f"monitor: {args.config} is not valid:\n{exc}") from None
    monitor = Monitor.build(args.data_dir, args.redis, args.time_scale,
                            None if args.online_store == "none" else args.online_store, args.serve_config, settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        monitor.start(args.port)
    except redis.ConnectionError as exc:
        raise SystemExit(f"monitor: cannot reach Redis ({exc}): start it (`make services`) or pass --redis "
                         "host:port") from None
    except OSError as exc:
        raise SystemExit(f"monitor: cannot serve metrics on port {args.port} ({exc}): pass --port") from None
    s = monitor.settings.streams
    models = ", ".join(f"{m}: {len(a.versions())}" for m, a in monitor.artifacts.items())
    print(f"monitor ready: metrics at http://0.0.0.0:{args.port}/metrics; streams {s.predictions} + {s.outcomes} "
          f"(group {s.group}); versions on disk under {monitor.artifact_root} ({models}); time scale {args.time_scale:g}", flush=True)
    try:
        while not stop.wait(0.5):
            if not monitor.alive():
                raise SystemExit("monitor: a worker thread died; see the log above")
    finally:
        monitor.stop()
        print(f"monitor stopped. {monitor.progress().removeprefix('monitor: ')}", flush=True)


if __name__ == "__main__":
    main()
