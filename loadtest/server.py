"""Start and stop the servers a load run talks to, as child processes in their own process group.

Every server is started by us, in a new session (process group), and stopped by signalling
that group only: nothing here kills by name, and `ray stop` is never used.

    with ServiceProcess.courier(port=8123) as svc:     # serving.launch, waits for COURIER READY
        print(svc.url, svc.gcs_address())
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from serving.launch import READY_LINE, free_port
from serving.paths import PROJECT_ROOT


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


class ServiceProcess:
    """A server child process: started in its own session, ready when a line or a port says so."""

    def __init__(self, argv: Sequence[str], *, url: str, ready_line: str | None = None,
                 ready_port: int | None = None, env: Mapping[str, str] | None = None,
                 timeout_s: float = 240, log_path: Path | None = None, name: str = "server"):
        self.argv, self.url, self.ready_line, self.ready_port = list(argv), url, ready_line, ready_port
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.timeout_s, self.log_path, self.name = timeout_s, log_path, name
        self.proc: subprocess.Popen | None = None
        self.dashboard_url: str | None = None  # Courier's Ray dashboard (serving.rollout), when it has one
        self.lines: deque[str] = deque(maxlen=400)  # the tail of its output, for error messages
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    # -- constructors for the servers Courier's runs use --------------------------------------
    @classmethod
    def courier(cls, port: int | None = None, *, metrics_port: int | None = None,
                sets: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None,
                config: Path | None = None, log_path: Path | None = None, timeout_s: float = 240,
                ray_defaults: bool = False, slots: Mapping[str, object] | None = None) -> ServiceProcess:
        """Courier's Ray Serve app through `serving.launch` (ready at its COURIER READY line).

        `ray_defaults` leaves out Courier's Ray settings (serving/ray_env.yaml); `slots` sets model
        slots (`{"eta.version": "3"}`); the Ray dashboard gets a free port (`dashboard_url`).
        """
        port = port or free_port()
        metrics_port = metrics_port or free_port(avoid={port})
        dashboard_port = free_port(avoid={port, metrics_port})
        argv = [sys.executable, "-m", "serving.launch", "--port", str(port),
                "--metrics-port", str(metrics_port), "--dashboard-port", str(dashboard_port)]
        if config is not None:
            argv += ["--config", str(config)]
        if ray_defaults:
            argv.append("--ray-defaults")
        for key, value in (sets or {}).items():
            argv += ["--set", f"{key}={json.dumps(value)}"]  # JSON is YAML: nested settings survive
        for key, value in (slots or {}).items():
            argv += ["--slot", f"{key}={json.dumps(value)}"]
        service = cls(argv, url=f"http://127.0.0.1:{port}", ready_line=READY_LINE, env=env,
                      timeout_s=timeout_s, log_path=log_path, name="courier")
        service.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        return service

    @classmethod
    def python_module(cls, module: str, args: Sequence[str], port: int, *, env: Mapping[str, str] | None = None,
                      log_path: Path | None = None, timeout_s: float = 120, name: str | None = None) -> ServiceProcess:
        """`python -m module args...`, ready when it accepts connections on port."""
        return cls([sys.executable, "-m", module, *args], url=f"http://127.0.0.1:{port}", ready_port=port,
                   env=env, timeout_s=timeout_s, log_path=log_path, name=name or module)

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> Self:
        log = open(self.log_path, "w") if self.log_path else None  # noqa: SIM115 (closed by the reader)
        self.proc = subprocess.Popen(self.argv, cwd=PROJECT_ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(log,), daemon=True, name=f"{self.name}-log")
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _read(self, log) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if log:
                    log.write(line)
                    log.flush()
                if self.ready_line and line.startswith(self.ready_line):
                    self._ready.set()
        finally:
            if log:
                log.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                   + "\n".join(list(self.lines)[-40:]))
            if self.ready_line and self._ready.wait(0.2):
                return
            if self.ready_port is not None:
                with contextlib.suppress(TimeoutError):
                    wait_for_port("127.0.0.1", self.ready_port, 0.2)
                    return
        raise TimeoutError(f"{self.name} not ready after {self.timeout_s:.0f} s:\n" + "\n".join(list(self.lines)[-40:]))

    def stop(self, timeout_s: float = 60) -> None:
        """SIGINT the process group (the launcher stops Ray), then SIGKILL what is left of it."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the child's pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Ray workers and helpers started by the launcher share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    @staticmethod
    def start_with_retries(factory, attempts: int = 3) -> ServiceProcess:
        """Start factory() (a fresh ServiceProcess, on fresh free ports); again if a port was taken meanwhile."""
        for attempt in range(attempts):
            svc = factory()
            try:
                return svc.start()
            except RuntimeError as exc:
                text = str(exc).lower()
                if attempt + 1 == attempts or not ("bind" in text or "address already in use" in text):
                    raise
        raise AssertionError("unreachable")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- Ray -------------------------------------------------------------------------------
    def gcs_address(self) -> str:
        """The GCS address of the Ray cluster this launcher started (found in its process tree)."""
        return gcs_address_of(self.pid)


def descendants(pid: int) -> list[int]:
    """All descendant pids of a process, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return []


def gcs_address_of(launcher_pid: int, timeout_s: float = 30) -> str:
    """`ip:port` of the GCS of the Ray cluster started under `launcher_pid` (by ray.init in serving.launch).

    The GCS picks its port at start-up; the raylet it started next is told that address on its
    command line (`--gcs-address=ip:port`), so we read it there.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in descendants(launcher_pid):
            argv = cmdline(pid)
            if argv and argv[0].endswith("raylet"):
                address = next((a.split("=", 1)[1] for a in argv if a.startswith("--gcs-address=")), None)
                if address:
                    return address
        time.sleep(0.5)
    raise RuntimeError(f"no raylet (and so no GCS address) under pid {launcher_pid}")
