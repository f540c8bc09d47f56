"""What a local Ray Serve instance is doing, read from outside Ray: processes and the controller log.

`serving.launch` starts Ray in-process; everything Ray starts (GCS, raylet, the Serve
controller, proxies, replicas, HAProxy) is a descendant of that launcher, which *we* started.
So we find replicas and proxies in the launcher's process tree (never by name across the
machine), and we read replica life cycles from the Serve controller's log, which records
every replica start (with its PID), crash and stop with a millisecond timestamp.

Connecting a second Ray driver (`ray.init(address=...)` + `serve.status()`) would be the
other way, but the local cluster requires Ray's auth token for that, and a load tool has no
business handling credentials.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from loadtest.server import cmdline, descendants

REPLICA_TITLE = "ray::ServeReplica:"  # + "<app>:<deployment>" (+ ".<method>" while it runs a task)
NAMED_REPLICA_TITLE = "ray::SERVE_REPLICA::"  # "<app>#<deployment>#<id>:ServeReplica:..." while constructing
PROXY_TITLES = ("ray::ProxyActor", "ray::SERVE_PROXY_ACTOR")
HAPROXY_BINARY = "haproxy"

_STAMP = re.compile(r"^(?P<level>[A-Z]+) (?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_REPLICA = r"Replica\(id='(?P<id>[^']+)', deployment='(?P<deployment>[^']+)', app='(?P<app>[^']+)'\)"
_PATTERNS = [
    ("started", re.compile(_REPLICA + r" started successfully.*\(PID: (?P<pid>\d+)\)")),
    ("crashed", re.compile(r"Actor for " + _REPLICA + r" crashed")),
    ("stopping", re.compile(r"Stopping " + _REPLICA)),
    ("stopped", re.compile(_REPLICA + r" is stopped")),
    ("starting", re.compile(r"Starting " + _REPLICA)),
]


@dataclass(frozen=True)
class ReplicaEvent:
    t: float  # unix time (from the log's local timestamp)
    kind: str  # starting | started | crashed | stopping | stopped
    replica_id: str
    deployment: str
    app: str
    pid: int | None = None


def parse_controller_log(text: str) -> list[ReplicaEvent]:
    """Replica life-cycle events of a Serve controller log, in order."""
    events: list[ReplicaEvent] = []
    for line in text.splitlines():
        stamp = _STAMP.match(line)
        if not stamp:
            continue
        for kind, pattern in _PATTERNS:
            match = pattern.search(line)
            if match:
                when = datetime.strptime(stamp["stamp"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                pid = match.groupdict().get("pid")
                events.append(ReplicaEvent(when, kind, match["id"], match["deployment"], match["app"],
                                           int(pid) if pid else None))
                break
    return events


def replica_timeline(events: list[ReplicaEvent], app: str | None = None) -> list[tuple[float, dict[str, int]]]:
    """(unix time, {deployment: running replicas}) after every change; running = started, not yet stopping."""
    running: dict[str, set[str]] = {}
    timeline: list[tuple[float, dict[str, int]]] = []
    for event in events:
        if app is not None and event.app != app:
            continue
        members = running.setdefault(event.deployment, set())
        before = len(members)
        if event.kind == "started":
            members.add(event.replica_id)
        elif event.kind in ("crashed", "stopping", "stopped"):
            members.discard(event.replica_id)
        if len(members) != before or not timeline:
            timeline.append((event.t, {dep: len(ids) for dep, ids in running.items()}))
    return timeline


def _start_time(pid: int) -> int:
    """Clock ticks after boot at which the process started (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[19])


class LocalRay:
    """The Ray processes under one `serving.launch` process (that we started)."""

    def __init__(self, launcher_pid: int, app: str = "courier"):
        self.launcher_pid = launcher_pid
        self.app = app
        self._session_dir: Path | None = None

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process under the launcher."""
        out = []
        for pid in descendants(self.launcher_pid):
            argv = cmdline(pid)
            if argv:
                out.append((pid, " ".join(a for a in argv if a)))
        return out

    def session_dir(self, timeout_s: float = 30) -> Path:
        """The Ray session folder of this cluster (from the GCS server's command line)."""
        deadline = time.monotonic() + timeout_s
        while self._session_dir is None and time.monotonic() < deadline:
            for pid in descendants(self.launcher_pid):
                argv = cmdline(pid)
                if argv and argv[0].endswith("gcs_server"):
                    found = next((a.split("=", 1)[1] for a in argv if a.startswith("--session-dir=")), None)
                    if found:
                        self._session_dir = Path(found)
                        break
            else:
                time.sleep(0.2)
        if self._session_dir is None:
            raise RuntimeError(f"no Ray session under pid {self.launcher_pid}")
        return self._session_dir

    def controller_log(self) -> str:
        logs = sorted((self.session_dir() / "logs" / "serve").glob("controller_[0-9]*.log"))
        return "".join(path.read_text(errors="replace") for path in logs)

    def replica_events(self) -> list[ReplicaEvent]:
        return [e for e in parse_controller_log(self.controller_log()) if e.app == self.app]

    def replica_counts(self) -> dict[str, int]:
        """Running replicas per deployment now (from the controller log)."""
        timeline = replica_timeline(self.replica_events(), self.app)
        return dict(timeline[-1][1]) if timeline else {}

    def replica_pids(self, deployment: str) -> list[int]:
        """PIDs of this deployment's running replicas (log says started, and the process is alive)."""
        alive = {pid for pid, _ in self.processes()}
        running: dict[str, int] = {}
        for event in self.replica_events():
            if event.deployment != deployment:
                continue
            if event.kind == "started" and event.pid:
                running[event.replica_id] = event.pid
            elif event.kind in ("crashed", "stopping", "stopped"):
                running.pop(event.replica_id, None)
        return sorted(pid for pid in running.values() if pid in alive)

    def proxy_pids(self) -> list[int]:
        """The HTTP data path: the current HAProxy when HAProxy is on, else the Serve proxy actors.

        HAProxy reloads start a new process and let the old one drain, so only the newest one is
        the proxy; without HAProxy each node's ProxyActor is (the fallback proxy is not).
        """
        processes = self.processes()
        haproxy = [pid for pid, cmd in processes if Path(cmd.split(" ", 1)[0]).name == HAPROXY_BINARY]
        if haproxy:
            return [max(haproxy, key=_start_time)]
        return sorted(pid for pid, cmd in processes if cmd.startswith(PROXY_TITLES) and "fallback" not in cmd)
