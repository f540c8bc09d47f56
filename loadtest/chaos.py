"""The chaos drill: constant open-loop load while replicas, the proxy and the online store fail.

The drill is written against two small interfaces so the same scenario runs here and on a
cluster:

* `Killer`: lists and kills serving targets (a replica of a deployment, the HTTP proxy) and
  says how many replicas each deployment has. `LocalRayKiller` kills replica / proxy
  processes under the `serving.launch` we started (SIGKILL by PID); `KubernetesKiller`
  deletes pods chosen by label through the Kubernetes API.
* `StoreOutage`: takes the online store away and brings it back. `LocalRedisOutage` stops and
  restarts a redis-server we started; `KubernetesStoreOutage` scales the Redis workload to 0
  and back.

The client retries once on connection errors and 503s with a backoff (what Ray Serve asks of
clients). Results: success rate, first-attempt failures, p99 overall and outside the stated
recovery window after each fault, time until each deployment's replica count is back, and
degraded (fallback) answers while the store is down.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.openloop import Clock, Records, RetryPolicy
from loadtest.report import latency_stats

# -- targets and killers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Something a fault can hit: a replica of a deployment, or the HTTP proxy."""

    kind: str  # "replica" | "proxy" | "node"
    ident: str  # a PID locally, a pod name on Kubernetes
    deployment: str | None = None


class Killer(abc.ABC):
    """Lists and kills serving targets; reports replica counts per deployment."""

    @abc.abstractmethod
    def targets(self, kind: str, deployment: str | None = None) -> list[Target]:
        """Live targets of a kind (replicas of `deployment`, or proxies)."""

    @abc.abstractmethod
    def kill(self, target: Target) -> None:
        """Kill it abruptly (no graceful drain): SIGKILL, or delete the pod with no grace period."""

    @abc.abstractmethod
    def replica_counts(self) -> dict[str, int]:
        """Running replicas per deployment, now."""

    def replica_timeline(self, clock: Clock) -> list[dict[str, Any]] | None:
        """[{"t", "counts"}] over the run, if the backend can reconstruct it afterwards (else None)."""
        return None

    def pick(self, kind: str, deployment: str | None, rng: random.Random) -> Target:
        candidates = self.targets(kind, deployment)
        if not candidates:
            what = f"{kind} of {deployment}" if deployment else kind
            raise RuntimeError(f"no live {what} to kill")
        return rng.choice(sorted(candidates, key=lambda t: t.ident))


class LocalRayKiller(Killer):
    """Kills processes of the local Ray Serve instance started by our `serving.launch`."""

    def __init__(self, launcher_pid: int, app: str = "courier"):
        from loadtest.ray_local import LocalRay

        self.ray = LocalRay(launcher_pid, app)

    def targets(self, kind: str, deployment: str | None = None) -> list[Target]:
        if kind == "replica":
            if deployment is None:
                raise ValueError("a replica target needs a deployment")
            return [Target("replica", str(pid), deployment) for pid in self.ray.replica_pids(deployment)]
        if kind == "proxy":
            return [Target("proxy", str(pid)) for pid in self.ray.proxy_pids()]
        if kind == "node":
            raise ValueError("`kill: node` needs more than one Ray node: run the drill with --kubernetes")
        raise ValueError(f"unknown target kind {kind!r}")

    def kill(self, target: Target) -> None:
        pid = int(target.ident)
        if pid not in {p for p, _ in self.ray.processes()}:  # only ever a process under our launcher
            raise RuntimeError(f"pid {pid} is not under the launcher we started")
        os.kill(pid, signal.SIGKILL)

    def replica_counts(self) -> dict[str, int]:
        return self.ray.replica_counts()

    def replica_timeline(self, clock: Clock) -> list[dict[str, Any]]:
        from loadtest.ray_local import replica_timeline

        return [{"t": round(t - clock.wall0, 3), "counts": counts}
                for t, counts in replica_timeline(self.ray.replica_events(), self.ray.app)]


class KubernetesKiller(Killer):
    """Deletes pods through the Kubernetes API, chosen by label selector.

    On KubeRay, Serve replicas live inside Ray worker pods, so "kill a replica of X" deletes a
    Running pod matching `selectors[X]` (e.g. the worker group that hosts X), "kill the
    proxy" a pod matching `selectors["proxy"]` and "kill a node" one matching `selectors["node"]`
    (a Ray worker pod: its replicas and its proxy); `selectors["*"]` covers deployments without
    their own. Replica counts are Ready pods per named selector. `core_api` is a
    `kubernetes.client.CoreV1Api` (or anything with the same two methods).
    """

    def __init__(self, core_api: Any, namespace: str, selectors: dict[str, str], grace_period_s: int = 0):
        self.api, self.namespace, self.selectors, self.grace_period_s = core_api, namespace, selectors, grace_period_s

    @classmethod
    def from_kubeconfig(cls, namespace: str, selectors: dict[str, str]) -> KubernetesKiller:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.CoreV1Api(), namespace, selectors)

    def _selector(self, kind: str, deployment: str | None) -> str:
        """The deployment's own selector, else the "*" one (replicas only), else KeyError."""
        key = kind if kind in ("proxy", "node") else deployment
        if key in self.selectors:
            return self.selectors[key]
        if kind == "replica" and "*" in self.selectors:
            return self.selectors["*"]
        raise KeyError(f"no label selector for {key!r}; have {sorted(self.selectors)}")

    def _pods(self, selector: str) -> list[Any]:
        return list(self.api.list_namespaced_pod(self.namespace, label_selector=selector).items)

    @staticmethod
    def _is_live(pod: Any) -> bool:
        """Running, not being deleted."""
        return pod.status.phase == "Running" and pod.metadata.deletion_timestamp is None

    @staticmethod
    def _is_ready(pod: Any) -> bool:
        conditions = pod.status.conditions or []
        return KubernetesKiller._is_live(pod) and any(c.type == "Ready" and c.status == "True" for c in conditions)

    def targets(self, kind: str, deployment: str | None = None) -> list[Target]:
        if kind not in ("replica", "proxy", "node"):
            raise ValueError(f"unknown target kind {kind!r}")
        return [Target(kind, pod.metadata.name, deployment) for pod in self._pods(self._selector(kind, deployment))
                if self._is_live(pod)]

    def kill(self, target: Target) -> None:
        self.api.delete_namespaced_pod(target.ident, self.namespace, grace_period_seconds=self.grace_period_s)

    def replica_counts(self) -> dict[str, int]:
        return {name: sum(self._is_ready(p) for p in self._pods(selector))
                for name, selector in self.selectors.items() if name not in ("proxy", "*")}


# -- the online store --------------------------------------------------------------------------


class StoreOutage(abc.ABC):
    @abc.abstractmethod
    def stop(self) -> None:
        """Make the online store unavailable."""

    @abc.abstractmethod
    def start(self) -> None:
        """Bring it back (with its data)."""


class RedisServer:
    """A private redis-server on a free port, its data kept in a dump file so a restart keeps it."""

    def __init__(self, port: int, workdir: Path, binary: str = "redis-server"):
        self.port, self.workdir, self.binary = port, Path(workdir), binary
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20) -> None:
        from loadtest.server import wait_for_port

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--dbfilename", "dump.rdb", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout_s)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:  # ready once the dump is loaded
            try:
                client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def snapshot(self) -> None:
        """Write the dump file now (SAVE), so a restart comes back with this data."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        client.save()
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # abrupt, like a crashed store; no save points are configured anyway
            self.proc.wait(10)
        self.proc = None


class LocalRedisOutage(StoreOutage):
    def __init__(self, server: RedisServer):
        self.server = server

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


class KubernetesStoreOutage(StoreOutage):
    """Scale the Redis Deployment/StatefulSet to 0 replicas and back. `apps_api`: AppsV1Api."""

    def __init__(self, apps_api: Any, namespace: str, name: str, kind: str = "statefulset", replicas: int = 1):
        self.api, self.namespace, self.name, self.kind, self.replicas = apps_api, namespace, name, kind, replicas

    def _scale(self, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        if self.kind == "statefulset":
            self.api.patch_namespaced_stateful_set_scale(self.name, self.namespace, body)
        else:
            self.api.patch_namespaced_deployment_scale(self.name, self.namespace, body)

    def stop(self) -> None:
        self._scale(0)

    def start(self) -> None:
        self._scale(self.replicas)


def prepare_redis_store(server: RedisServer, data_dir: Path, offline_dir: Path) -> Path:
    """Apply Courier's feature repository into a private data dir and materialize it into `server`.

    The registry goes to <data_dir>/feast (not the project's), the offline data is linked from
    `offline_dir`; the service is then started with online_store=redis, redis=<server>,
    data_dir=<data_dir>. Returns data_dir.
    """
    from feature_repo.store import apply, materialize, open_store, simulation_window

    data_dir = Path(data_dir)
    (data_dir / "feast").mkdir(parents=True, exist_ok=True)
    link = data_dir / "offline"
    if not link.exists():
        link.symlink_to(Path(offline_dir).resolve(), target_is_directory=True)
    store = open_store("redis", data_dir=data_dir, redis=server.address)
    apply(store, data_dir=data_dir)
    first, end = simulation_window(data_dir)
    from datetime import timedelta

    materialize(store, end, start=first - timedelta(days=2))
    server.snapshot()
    return data_dir


# -- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    at_s: float
    action: str  # "kill_replica" | "kill_proxy" | "kill_node" | "store_down"
    deployment: str | None = None
    duration_s: float = 0.0  # store_down only

    @property
    def label(self) -> str:
        if self.action == "kill_replica":
            return f"kill {self.deployment}"
        if self.action == "store_down":
            return f"store down {self.duration_s:g}s"
        return "kill node" if self.action == "kill_node" else "kill proxy"

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> Fault:
        if "kill" in raw:
            kind = raw["kill"]
            if kind in ("proxy", "node"):
                return cls(float(raw["at_s"]), f"kill_{kind}")
            return cls(float(raw["at_s"]), "kill_replica", deployment=str(kind))
        if "store_down_s" in raw:
            return cls(float(raw["at_s"]), "store_down", duration_s=float(raw["store_down_s"]))
        raise ValueError(f"a fault needs `kill: <deployment>|proxy|node` or `store_down_s`, got {raw}")


@dataclass
class FaultRecord:
    fault: Fault
    t: float  # when it actually happened (run clock)
    target: str | None = None
    counts_before: dict[str, int] = field(default_factory=dict)
    end_t: float | None = None  # store_down: when the store was back
    error: str | None = None


def fault_runner(faults: Sequence[Fault], killer: Killer, outage: StoreOutage | None, log: list[FaultRecord],
                 seed: int = 0) -> Callable[[Clock], Any]:
    """A background job for `openloop.drive`: performs the faults at their times (blocking work in a thread)."""
    rng = random.Random(seed)

    async def run(clock: Clock) -> None:
        for fault in sorted(faults, key=lambda f: f.at_s):
            delay = fault.at_s - clock.now()
            if delay > 0:
                await asyncio.sleep(delay)
            record = FaultRecord(fault, clock.now())
            log.append(record)
            try:
                record.counts_before = await asyncio.to_thread(killer.replica_counts)
                if fault.action == "store_down":
                    if outage is None:
                        raise RuntimeError("no online-store outage is configured for this drill")
                    record.t = clock.now()
                    await asyncio.to_thread(outage.stop)
                    await asyncio.sleep(fault.duration_s)
                    await asyncio.to_thread(outage.start)
                    record.end_t = clock.now()
                else:
                    kind = {"kill_proxy": "proxy", "kill_node": "node"}.get(fault.action, "replica")
                    target = await asyncio.to_thread(killer.pick, kind, fault.deployment, rng)
                    record.t = clock.now()
                    await asyncio.to_thread(killer.kill, target)
                    record.target = target.ident
            except Exception as exc:  # noqa: BLE001 (a fault that could not be done is reported; the drill goes on)
                record.error = f"{exc.__class__.__name__}: {exc}"

    return run


class ReplicaSampler:
    """A background job sampling `killer.replica_counts()` (for backends with no timeline)."""

    def __init__(self, killer: Killer, every_s: float = 0.5):
        self.killer, self.every_s = killer, every_s
        self.samples: list[dict[str, Any]] = []

    async def __call__(self, clock: Clock) -> None:
        while True:
            with contextlib.suppress(Exception):
                counts = await asyncio.to_thread(self.killer.replica_counts)
                self.samples.append({"t": round(clock.now(), 3), "counts": counts})
            await asyncio.sleep(self.every_s)


# -- analysis ---------------------------------------------------------------------------------


def recovery_windows(faults: Sequence[FaultRecord], window_s: float) -> list[dict[str, Any]]:
    """[start, end) after each fault in which the SLO is not judged (store outages: down..up + window)."""
    windows = []
    for record in faults:
        end = (record.end_t if record.end_t is not None else record.t) + window_s
        windows.append({"start": round(record.t, 3), "end": round(end, 3), "label": record.fault.label})
    return windows


def in_windows(times: np.ndarray, windows: Sequence[dict[str, Any]]) -> np.ndarray:
    mask = np.zeros(len(times), dtype=bool)
    for window in windows:
        mask |= (times >= window["start"]) & (times < window["end"])
    return mask


def time_until_back(timeline: Sequence[dict[str, Any]], deployment: str, t_fault: float,
                    wanted: int) -> float | None:
    """Seconds from the fault until `deployment` has `wanted` running replicas again.

    The timeline is [{"t", "counts"}] in time order; the count must first drop below `wanted`
    after the fault (else the kill was not seen, None), then reach it again.
    """
    dropped_at = None
    for sample in timeline:
        if sample["t"] < t_fault - 1e-9:
            continue
        count = sample["counts"].get(deployment, 0)
        if dropped_at is None:
            if count < wanted:
                dropped_at = sample["t"]
        elif count >= wanted:
            return round(sample["t"] - t_fault, 3)
    return None


def first_success_after(records: Records, t: float) -> float | None:
    """Seconds from t until the first request sent at or after t was answered OK on its first try."""
    sent_after = (records.started >= t) & (records.first_status >= 200) & (records.first_status < 300)
    if not sent_after.any():
        return None
    return round(float(records.finished[sent_after].min() - t), 3)


def analyze(records: Records, faults: Sequence[FaultRecord], timeline: Sequence[dict[str, Any]],
            window_s: float, slo_p99_ms: float) -> dict[str, Any]:
    """The drill's verdict: successes, p99 in and out of the recovery windows, recovery times."""
    windows = recovery_windows(faults, window_s)
    inside = in_windows(records.scheduled, windows)
    ok = records.ok
    first_ok = (records.first_status >= 200) & (records.first_status < 300)
    outside = latency_stats(records.latency_ms[~inside])
    per_fault = []
    for record in faults:
        entry: dict[str, Any] = {"t": round(record.t, 3), "fault": record.fault.label, "target": record.target,
                                 "error": record.error}
        sel = (records.scheduled >= record.t) & (records.scheduled < (record.end_t or record.t) + window_s)
        entry["requests_in_window"] = int(sel.sum())
        entry["failed_in_window"] = int((~ok & sel).sum())
        entry["first_attempt_failures_in_window"] = int((~first_ok & sel).sum())
        entry["p99_in_window_ms"] = latency_stats(records.latency_ms[sel])["p99_ms"]
        if record.fault.action == "kill_replica":
            wanted = record.counts_before.get(record.fault.deployment, 0)
            entry["replicas_before"] = wanted
            entry["replicas_back_after_s"] = time_until_back(timeline, record.fault.deployment, record.t, wanted)
        elif record.fault.action == "kill_proxy":
            entry["first_success_after_s"] = first_success_after(records, record.t)
        elif record.fault.action == "kill_node":  # "node" counts the Ready pods of selectors["node"]
            entry["nodes_before"] = record.counts_before.get("node", 0)
            entry["nodes_back_after_s"] = time_until_back(timeline, "node", record.t, entry["nodes_before"])
            entry["first_success_after_s"] = first_success_after(records, record.t)
        else:
            during = (records.scheduled >= record.t) & (records.scheduled < (record.end_t or record.t))
            entry["store_down_s"] = round((record.end_t or record.t) - record.t, 3)
            entry["requests_while_down"] = int(during.sum())
            entry["degraded_answers_while_down"] = int(records.degraded[during].sum())
            entry["ok_while_down"] = int(ok[during].sum())
        per_fault.append(entry)
    failures = int((~ok).sum())
    p99_outside = outside["p99_ms"]
    return {
        "requests": len(records),
        "succeeded": int(ok.sum()),
        "failed": failures,
        "success_rate": round(float(ok.mean()), 6) if len(records) else None,
        "first_attempt_failures": int((~first_ok).sum()),
        "retried": int((records.attempts > 1).sum()),
        "degraded_answers": int(records.degraded.sum()),
        "p99_ms": latency_stats(records.latency_ms)["p99_ms"],
        "p99_outside_recovery_ms": p99_outside,
        "p99_inside_recovery_ms": latency_stats(records.latency_ms[inside])["p99_ms"],
        "recovery_window_s": window_s,
        "faults": per_fault,
        "windows": windows,
        "passed": failures == 0 and p99_outside is not None and p99_outside <= slo_p99_ms
                  and not any(r.error for r in faults),
    }


def retry_policy(config: dict[str, Any]) -> RetryPolicy:
    retry = config.get("retry", {})
    return RetryPolicy(retries=int(retry.get("retries", 1)), backoff_s=float(retry.get("backoff_s", 0.5)),
                       on_status=tuple(retry.get("on_status", [503])),
                       on_connection_error=bool(retry.get("on_connection_error", True)))


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
