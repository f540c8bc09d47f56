"""A local Prometheus for Courier: scrapes serving and the monitor, evaluates monitoring/rules.

    python -m monitoring.prometheus [--serving-metrics 127.0.0.1:8080] [--monitor 127.0.0.1:9108]
                                    [--port 9090] [--eval-interval 5s]

runs Debian's Prometheus (`apt-get install prometheus`) in the foreground until Ctrl-C or SIGTERM,
with its config and storage in .run/prometheus/. Drills use the same thing from Python:

    with PrometheusServer(serving_metrics="127.0.0.1:8080") as prom:
        prom.wait_ready()
        firing = [a for a in prom.alerts() if a["state"] == "firing"]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "monitoring" / "rules"
DEFAULT_RUN_DIR = ROOT / ".run" / "prometheus"
INSTALL_HINT = "install Debian's prometheus package: sudo apt-get install prometheus"


class PrometheusError(RuntimeError):
    """Prometheus could not start, or its API answered with an error."""


def prometheus_binary() -> str:
    """Path of the prometheus server binary, or an error that says how to install it."""
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
    if not found:
        raise PrometheusError(f"no prometheus binary on PATH: {INSTALL_HINT}")
    return found


def rule_files() -> list[Path]:
    """The repository's rule files (monitoring/rules/*.yaml; their unit tests live in rules/tests/)."""
    return sorted(RULES_DIR.glob("*.yaml"))


def prometheus_config(targets: dict[str, list[str]], rules: list[Path], scrape_interval: str = "5s",
                      eval_interval: str = "5s") -> dict[str, Any]:
    """prometheus.yml as a dict: one scrape job per entry of `targets` (job name -> host:port list)."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": eval_interval,
                   "scrape_timeout": scrape_interval},
        "rule_files": [str(Path(path).resolve()) for path in rules],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                           for job, hosts in targets.items() if hosts],
    }


class PrometheusServer:
    """Prometheus as a child process: config and TSDB in `run_dir`, API on 127.0.0.1:`port`.

    Use as a context manager (stops the child on exit) or call start()/stop().
    """

    def __init__(self, serving_metrics: str | None = "127.0.0.1:8080", monitor: str | None = "127.0.0.1:9108",
                 port: int = 9090, eval_interval: str = "5s", scrape_interval: str = "5s",
                 rules: list[Path] | None = None, run_dir: Path | None = None,
                 extra_targets: dict[str, list[str]] | None = None) -> None:
        """`serving_metrics`/`monitor` are host:port to scrape (None: leave out); `rules` replaces the
        repository's rule files (drills and tests with shorter `for` durations)."""
        self.port = port
        self.run_dir = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
        targets = {"courier-serving": [serving_metrics] if serving_metrics else [],
                   "courier-monitor": [monitor] if monitor else [], **(extra_targets or {})}
        self.config = prometheus_config(targets, rules if rules is not None else rule_files(),
                                        scrape_interval, eval_interval)
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "prometheus.log"

    def start(self) -> Self:
        """Write the config and start Prometheus (returns at once; see wait_ready)."""
        binary = prometheus_binary()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        command = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={self.run_dir / 'data'}",
                   f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
                   "--web.enable-lifecycle"]
        with self.log_path.open("wb") as log:  # this run's log only: errors quote its tail
            # Own process group: a Ctrl-C in the terminal reaches us, and we stop the child in order.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def _log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until /-/ready answers 200; fail with Prometheus's log if it exits or never gets there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited before it was ready; {self.log_path}:\n{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready on {self.url} after {timeout_s:.0f} s; log:\n{self._log_tail()}")

    def _api(self, path: str, params: dict[str, Any] | None = None) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing): labels, annotations, state, activeAt, value."""
        return self._api("alerts")["alerts"]

    def firing(self, alertname: str | None = None) -> list[dict[str, Any]]:
        """Firing alerts, optionally of one name."""
        return [a for a in self.alerts()
                if a["state"] == "firing" and (alertname is None or a["labels"]["alertname"] == alertname)]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: the result vector ([{metric, value: [ts, "v"]}, ...])."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self._api("query", params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 5.0) -> list[dict[str, Any]]:
        """A range query: one entry per series with its [ts, "v"] values."""
        return self._api("query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Prometheus flushes and exits), SIGKILL if it has not gone after `timeout_s`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM ends the run like Ctrl-C, so the child is stopped either way."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """CLI: run Prometheus in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m monitoring.prometheus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving-metrics", default="127.0.0.1:8080",
                        help="host:port of serving's metrics (Ray's agent); '' leaves it out")
    parser.add_argument("--monitor", default="127.0.0.1:9108", help="host:port of the monitor; '' leaves it out")
    parser.add_argument("--port", type=int, default=9090, help="port of Prometheus's UI and API on 127.0.0.1")
    parser.add_argument("--eval-interval", default="5s", help="rule evaluation interval")
    parser.add_argument("--scrape-interval", default="5s", help="scrape interval")
    parser.add_argument("--rules", type=Path, nargs="+", help="rule files instead of monitoring/rules/*.yaml")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="config, storage and log")
    args = parser.parse_args(argv)

    server = PrometheusServer(args.serving_metrics or None, args.monitor or None, args.port, args.eval_interval,
                              args.scrape_interval, args.rules, args.run_dir)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with server:
            server.wait_ready()
            targets = ", ".join(target for job in server.config["scrape_configs"]
                                for static in job["static_configs"] for target in static["targets"])
            print(f"prometheus: {server.url} (alerts: {server.url}/alerts), scraping {targets or 'nothing'}; "
                  f"rules {', '.join(server.config['rule_files'])}; log {server.log_path}; Ctrl-C stops it",
                  flush=True)
            server.process.wait()
            print(f"prometheus exited with {server.process.returncode}; log:\n{server._log_tail()}", file=sys.stderr)
            return 1
    except PrometheusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prometheus: stopped", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
