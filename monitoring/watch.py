"""The watched live city of the drills: the monitor, Prometheus with Courier's rules, and the city itself."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Watched:
    """What `watch_city` started (all stopped by the ExitStack it was given)."""

    monitor: Any  # monitoring.monitor.Monitor
    prometheus: Any  # monitoring.prometheus.PrometheusServer
    city: Any  # city.live.City


def watch_city(stack: ExitStack, *, serving_url: str, metrics_port: int, redis_address: str, private: Path,
               data_dir: Path, speed: float, workdir: Path, seed: int = 0,
               serve_config: Path | None = None) -> Watched:
    """Against a running Courier (on the Redis online store of `private`): the monitor, Prometheus scraping it
    and Courier's metrics with the repository's rules, and the live city at `speed`; stopped by `stack`."""
    from city.live import City
    from city.world import World
    from feature_repo.store import open_store
    from loadtest.server import free_port
    from monitoring.monitor import Monitor
    from monitoring.prometheus import PrometheusServer

    monitor = Monitor.build(data_dir=private, redis_address=redis_address, time_scale=speed, online_store="redis",
                            serve_config=serve_config)
    monitor_port = free_port()
    monitor.start(monitor_port)
    stack.callback(monitor.stop)
    prometheus = PrometheusServer(serving_metrics=f"127.0.0.1:{metrics_port}", monitor=f"127.0.0.1:{monitor_port}",
                                  port=free_port(), run_dir=workdir / "prometheus")
    stack.enter_context(prometheus)
    prometheus.wait_ready()
    city = City(World.load(data_dir, speed=speed, seed=seed), serving_url, redis=redis_address,
                store=open_store("redis", data_dir=private, redis=redis_address), out=None)
    thread = city.start()
    stack.callback(thread.join, 30)
    stack.callback(city.stop)
    return Watched(monitor, prometheus, city)
