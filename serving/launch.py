"""Run the serve config on this machine: Ray started in-process, stopped on Ctrl-C.

    python -m serving.launch [--port 8000] [--metrics-port 8080] [--dashboard-port 8265]
                             [--set online_store=redis] [--slot eta.version=3]

It does what `serve run serving/serve_config.yaml` does, plus the overrides, a fixed
Prometheus port and Courier's Ray process settings (serving/ray_env.yaml), and it stops every
Ray process it started when it exits. Registry aliases in the models' slots (`champion`) are
pinned to artifact versions once, here, so every replica serves exactly the same version; the
Ray dashboard (on 127.0.0.1 only) takes the in-place changes of `serving.rollout`.

It starts a Ray of its own, whatever cluster Ray's address file names (`--address` or RAY_ADDRESS
join one instead). Ctrl-C (SIGINT or SIGTERM) lets in-flight requests finish and stops in a few
seconds; a second Ctrl-C stops at once. A reaper process (serving/reaper.py) kills whatever the
launcher started if the launcher itself dies without cleaning up (SIGKILL), so no HAProxy or Ray
process keeps the serving or metrics port.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, MutableMapping
from pathlib import Path
from typing import Any, Self

import yaml

from serving.config import SERVE_CONFIG, apply_ray_env, load_serve_config, validate, with_overrides
from serving.paths import PROJECT_ROOT
from serving.rollout import RolloutError, parse_slot_sets, with_slot
from serving.shutdown import drain_front_door, exit_now, stop_serve, stop_timeout_s

READY_LINE = "COURIER READY"
LOCAL = "local"  # ray.init address: start a Ray of our own


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs for the application args; values are YAML (numbers, null, true...)."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes key=value, got {pair!r}")
        args[key] = yaml.safe_load(value)
    return args


def isolate_haproxy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Give this instance's HAProxy its own files and ports, so several can run on one machine.

    Ray's defaults (/tmp/haproxy-serve, stats port 8404, fallback proxy port 8500...) are fixed,
    so a second local instance (a test's own server, a benchmark) would fail to start. Values
    already in the environment are kept.
    """
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return
    if environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "").endswith("haproxy_admission.py"):
        from serving.haproxy_admission import QueueLimits, real_haproxy

        environ.setdefault("COURIER_HAPROXY_BINARY", real_haproxy(environ))  # the wrapper's python3 may lack the wheel
        try:
            QueueLimits.from_env(environ)  # here, not in the wrapper: there a bad value only shows as a dead proxy
        except ValueError as exc:
            raise SystemExit(f"serving.launch: {exc}") from None
    run_dir = Path(tempfile.mkdtemp(prefix="courier-haproxy-"))
    files = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
             "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}
    for key, name in files.items():
        environ.setdefault(key, str(run_dir / name) if name else str(run_dir))
    for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
        environ.setdefault(key, str(free_port()))


def free_port(avoid: Collection[int] = ()) -> int:
    """A TCP port nothing listens on right now, and none of `avoid` (ports picked but not bound yet:
    the kernel may hand the same free port out twice in a row, seen in CI)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def wait_until_running(app_names: list[str], timeout_s: float, stop: threading.Event | None = None) -> bool:
    """Block until every application is RUNNING (True) or `stop` is set (False); fail with the controller's
    message otherwise."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return False
        apps = serve.status().applications
        states = {name: apps[name].status if name in apps else "NOT_STARTED" for name in app_names}
        failed = {n: apps[n].message for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"deployment failed: {failed}")
        if all(state == "RUNNING" for state in states.values()):
            return True
        time.sleep(0.5)
    raise TimeoutError(f"applications not RUNNING after {timeout_s:.0f} s: {states}")


def pin_models(config: dict[str, Any], app: str = "courier") -> dict[str, Any]:
    """The config with every model slot's alias or registry number replaced by an artifact version."""
    from models.registry import Registry
    from serving.variants import pin

    application = next(a for a in config["applications"] if a["name"] == app)
    args = application.get("args") or {}
    artifacts = PROJECT_ROOT / (args.get("artifacts") or "artifacts")
    return pin(config, Registry(args.get("registry"), artifacts))


def ray_address(flag: str | None, environ: MutableMapping[str, str] = os.environ) -> str:
    """The Ray cluster to serve on: `--address`, else RAY_ADDRESS, else "local" (a Ray of our own).

    Never ray.init()'s default: that joins the cluster named in Ray's address file, which any
    earlier `ray start --head` on this machine leaves behind, and hangs when that cluster is gone
    ("Failed to get cluster ID from GCS server")."""
    return flag or environ.get("RAY_ADDRESS") or LOCAL


def run(config: dict[str, Any], metrics_port: int, num_cpus: int | None, timeout_s: float,
        dashboard_port: int = 8265, address: str = LOCAL) -> None:
    """Start Ray (our own, unless `address` names a cluster to join) and Serve, deploy the config, print READY,
    and serve until SIGINT/SIGTERM; then drain Serve (a second signal skips the drain) and stop Ray."""
    import ray
    from ray.serve._private import api as serve_api  # the same calls `serve run` makes

    schema = validate(config)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():  # the second Ctrl-C: stop now, in-flight requests or not
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if address == LOCAL:
        # The dashboard takes REST deploys (serving.rollout, like KubeRay); it runs jobs too, so loopback only.
        ray.init(address=LOCAL, namespace="serve", include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port, num_cpus=num_cpus, _metrics_export_port=metrics_port,
                 log_to_driver=True)
    else:  # a cluster someone else runs: its own dashboard, metrics and CPUs
        ray.init(address=address, namespace="serve", log_to_driver=True)
    try:
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location)
        client.deploy_apps(schema, _blocking=False)
        if wait_until_running([app.name for app in schema.applications], timeout_s, stop):
            http = schema.http_options
            where = (f"metrics http://127.0.0.1:{metrics_port}/metrics dashboard http://127.0.0.1:{dashboard_port}"
                     if address == LOCAL else f"on the Ray cluster at {address}")
            print(f"{READY_LINE} http://{http.host}:{http.port} {where}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        started = time.monotonic()
        limit = stop_timeout_s(schema)
        print(f"stopping Ray Serve (in-flight requests finish; at most {limit:.0f} s, Ctrl-C again to skip) ...",
              flush=True)
        try:
            if address == LOCAL:
                left = drain_front_door(schema.http_options.request_timeout_s or limit)
                print(f"HTTP drained in {time.monotonic() - started:.1f} s"
                      f"{f' ({left} HAProxy still relaying: cut)' if left else ''}", flush=True)
            stop_serve(limit)
            print(f"Serve drained in {time.monotonic() - started:.1f} s", flush=True)
        finally:
            ray.shutdown()
            print(f"stopped in {time.monotonic() - started:.1f} s", flush=True)


class BackgroundServer:
    """`python -m serving.launch` in the background, stopped (with its Ray) on exit.

    Used by `make demo`, the integration tests and the load tests: a context manager that
    returns once the app is RUNNING and stops Serve and Ray on exit.
    """

    def __init__(self, port: int, metrics_port: int, log: Path, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 240, dashboard_port: int | None = None):
        self.port, self.metrics_port, self.log_path = port, metrics_port, log
        self.dashboard_port = dashboard_port or free_port(avoid={port, metrics_port})
        self.extra, self.env, self.timeout_s = extra or [], env, timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.launch", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--dashboard-port", str(self.dashboard_port), *self.extra],
            cwd=PROJECT_ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                raise RuntimeError(f"serving exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            if READY_LINE in self.output():
                return self
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"serving not ready after {self.timeout_s:.0f} s:\n{self.output()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The Ray dashboard of this server (REST deploys: serving.rollout)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def output(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # the launcher shuts Serve and Ray down cleanly
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # only the group we started
                self.process.wait()
        self.log.close()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (`make serve`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=SERVE_CONFIG, help="serve config YAML")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus port of Ray's metrics agent")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port (REST deploys)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an app arg")
    parser.add_argument("--slot", action="append", default=[], metavar="MODEL.FIELD=VALUE",
                        help="override a model slot (eta.version=3, ranker.challenger=challenger, eta.shadow=0.5)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the app to be RUNNING")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    parser.add_argument("--ray-defaults", action="store_true",
                        help="leave out serving/ray_env.yaml: Ray's own defaults (benchmark variant (a))")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (host:port) instead of starting one (default: RAY_ADDRESS, "
                             "else a Ray of our own, whatever cluster Ray's address file names)")
    args = parser.parse_args(argv)
    config = with_overrides(load_serve_config(args.config), port=args.port, args=parse_sets(args.set))
    try:
        from serving.variants import slot_holders

        for model, changes in parse_slot_sets(args.slot, slot_holders(config)).items():
            config = with_slot(config, model, **changes)
        config = pin_models(config)
    except (RolloutError, LookupError, ValueError) as exc:
        raise SystemExit(f"serving.launch: {exc}") from None
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False))
        return
    if "ray" in sys.modules:  # Ray read its settings when it was imported: too late to apply ray_env.yaml
        raise SystemExit("serving.launch: Ray was imported before the Ray settings were applied")
    ray_env = {} if args.ray_defaults else apply_ray_env()
    isolate_haproxy()
    print(f"Ray settings (serving/ray_env.yaml): {ray_env or 'none, Ray defaults'}", flush=True)
    address = ray_address(args.address)
    if address == LOCAL:
        from serving import reaper

        reaper.start()  # whatever ends this process, nothing it started keeps the ports
    try:
        run(config, args.metrics_port, args.num_cpus, args.timeout, args.dashboard_port, address)
    except (RuntimeError, TimeoutError) as exc:
        print(f"serving failed to start: {exc}", file=sys.stderr)
        exit_now(1)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping: Ray is already shut down
        exit_now(130)
    exit_now(0)



if __name__ == "__main__":
    main()
