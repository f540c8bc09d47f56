"""Where the CPU goes: CPU seconds per process group of a server we started, over a run.

Read from /proc (utime + stime of each process under the server's pid, and of this process,
the load generator), grouped by role: proxy, each deployment's replicas, Ray's own daemons.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from loadtest.server import cmdline, descendants

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def store_pids() -> list[int]:
    """The local redis-server on COURIER_REDIS's port: it holds the prediction log (and the Redis online
    store), so its CPU is the service's, not other work on the machine."""
    import psutil

    address = os.environ.get("COURIER_REDIS", "127.0.0.1:6379").split(",")[0]
    port = int(address.rsplit(":", 1)[1])
    pids = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "redis-server":
            continue
        try:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in proc.connections("tcp")):
                pids.append(proc.pid)
        except psutil.Error:  # gone, or not ours to read
            continue
    return pids


def role(command: str) -> str:
    """A short role name for a process of a Courier server."""
    name = Path(command.split(" ", 1)[0]).name
    if name == "haproxy":
        return "haproxy"
    if command.startswith("ray::"):
        title = command[5:].split(" ", 1)[0].split(".", 1)[0]
        if "ServeReplica:" in title:
            return "replica " + title.split("ServeReplica:", 1)[1].split(":", 1)[-1]
        if "Proxy" in title or "PROXY" in title:
            return "proxy"
        if "Controller" in title or "CONTROLLER" in title:
            return "serve controller"
        return "ray worker/agent"
    if name in ("raylet", "gcs_server") or "ray/" in command:
        return "ray daemons"
    return "server main process"


class CpuMeter:
    """meter = CpuMeter(server_pid); meter.start(); ...run...; meter.stop() -> {role: cpu seconds}."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.stores = store_pids()
        self.before: dict[int, tuple[str, float]] = {}

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        snap: dict[int, tuple[str, float]] = {}
        for pid in [self.server_pid, *descendants(self.server_pid)]:
            seconds = _cpu_seconds(pid)
            if seconds is not None:
                argv = cmdline(pid)
                snap[pid] = (role(" ".join(a for a in argv if a)) if pid != self.server_pid else "server main process",
                             seconds)
        for pid in self.stores:
            snap[pid] = ("redis-server (prediction log)", _cpu_seconds(pid) or 0.0)
        me = os.getpid()
        snap[me] = ("load generator", _cpu_seconds(me) or 0.0)
        return snap

    def start(self) -> None:
        self.before = self._snapshot()

    def stop(self) -> dict[str, float]:
        after = self._snapshot()
        used: dict[str, float] = defaultdict(float)
        for pid, (name, seconds) in after.items():
            used[name] += seconds - self.before.get(pid, (name, 0.0))[1]
        return {name: round(seconds, 3) for name, seconds in sorted(used.items(), key=lambda kv: -kv[1])}


def _system_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def _tree_seconds(root_pid: int | None, stores: list[int] = ()) -> float:
    pids = [os.getpid()] + ([root_pid, *descendants(root_pid), *stores] if root_pid else [])
    return sum(_cpu_seconds(pid) or 0.0 for pid in pids)


class ForeignLoad:
    """How busy the machine was with *other* work during a run (other people's jobs on shared cores).

    foreign = all CPU busy time - CPU of this process (the load generator) and of the server tree.
    Reported in cores; a run with more than a few tenths of a core of foreign load is noisy.
    """

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.stores = store_pids() if server_pid else []
        self._start: tuple[float, float, float] | None = None

    def start(self) -> None:
        import time

        self._start = (time.monotonic(), _system_busy_seconds(), _tree_seconds(self.server_pid, self.stores))

    def stop(self) -> dict[str, float]:
        import time

        assert self._start is not None, "start() first"
        t0, busy0, ours0 = self._start
        wall = max(time.monotonic() - t0, 1e-9)
        busy, ours = _system_busy_seconds() - busy0, _tree_seconds(self.server_pid, self.stores) - ours0
        return {"busy_cores": round(busy / wall, 3), "ours_cores": round(ours / wall, 3),
                "foreign_cores": round(max(busy - ours, 0.0) / wall, 3)}


class CpuSampler:
    """A background job for openloop.drive: every second, cores busy and cores used by other work."""

    def __init__(self, server_pid: int | None = None, every_s: float = 1.0):
        self.server_pid, self.every_s = server_pid, every_s
        self.samples: list[dict[str, float]] = []

    async def __call__(self, clock) -> None:
        import asyncio

        meter = ForeignLoad(self.server_pid)
        meter.start()
        while True:
            await asyncio.sleep(self.every_s)
            sample = meter.stop()
            meter.start()
            self.samples.append({"t": round(clock.now(), 3), **sample})


def wait_for_quiet(max_foreign_cores: float = 0.25, max_wait_s: float = 300, window_s: float = 5.0,
                   server_pid: int | None = None, log=print) -> dict[str, float]:
    """Wait (up to max_wait_s) until other work uses less than max_foreign_cores; returns the last reading.

    The machine is shared: measuring while someone else's job takes a core measures their job.
    """
    import time

    deadline = time.monotonic() + max_wait_s
    while True:
        meter = ForeignLoad(server_pid)
        meter.start()
        time.sleep(window_s)
        reading = meter.stop()
        if reading["foreign_cores"] <= max_foreign_cores or time.monotonic() >= deadline:
            if reading["foreign_cores"] > max_foreign_cores:
                log(f"machine still busy with other work ({reading['foreign_cores']} cores); measuring anyway")
            return reading
        log(f"waiting for a quiet machine: other work uses {reading['foreign_cores']} cores")
