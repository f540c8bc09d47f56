"""The chaos drill's logic: fault plan, killers, recovery analysis, the retrying client, the store outage.

Real processes where it matters: a supervised server is SIGKILLed under open-loop load and the
drill must see the first attempts fail, the retries succeed and the replica come back; a real
redis-server is stopped and restarted with its data. The Kubernetes killer cannot run here, so
its pod selection is tested against a fake API object.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from loadtest import openloop
from loadtest.chaos import (
    Fault,
    FaultRecord,
    Killer,
    KubernetesKiller,
    KubernetesStoreOutage,
    LocalRayKiller,
    LocalRedisOutage,
    RedisServer,
    Target,
    analyze,
    fault_runner,
    first_success_after,
    in_windows,
    recovery_windows,
    retry_policy,
    time_until_back,
)
from loadtest.config import load_config
from loadtest.openloop import Clock, RetryPolicy, Stage, arrival_times
from loadtest.ray_local import LocalRay, parse_controller_log, replica_timeline
from loadtest.records import CONNECTION_ERROR, Records
from loadtest.report import summarize, write_run_report
from loadtest.server import free_port, wait_for_port
from loadtest.traffic import Request
from serving.paths import PROJECT_ROOT

CONTROLLER_LOG = """\
INFO 2026-11-28 11:21:20,565 controller 20972 -- Starting Replica(id='iad4luaq', deployment='EtaModel', app='courier').
INFO 2026-11-28 11:21:20,569 controller 20972 -- Starting Replica(id='tizbtqfw', deployment='Ingress', app='courier').
INFO 2026-11-28 11:21:24,260 controller 20972 -- Replica(id='tizbtqfw', deployment='Ingress', app='courier') started successfully on node 'n1' after 3.7s (PID: 21177). Replica constructor, reconfigure method, and initial health check took 0.0s.
INFO 2026-11-28 11:21:30,786 controller 20972 -- Replica(id='iad4luaq', deployment='EtaModel', app='courier') started successfully on node 'n1' after 10.2s (PID: {eta_pid}). Replica constructor, reconfigure method, and initial health check took 0.5s.
DEBUG 2026-11-28 11:21:30,900 controller 20972 -- something unrelated
WARNING 2026-11-28 11:21:30,994 controller 20972 -- Actor for Replica(id='iad4luaq', deployment='EtaModel', app='courier') crashed, marking it unhealthy immediately.
INFO 2026-11-28 11:21:30,995 controller 20972 -- Stopping Replica(id='iad4luaq', deployment='EtaModel', app='courier') (currently ReplicaState.RUNNING).
INFO 2026-11-28 11:21:30,996 controller 20972 -- Replica(id='iad4luaq', deployment='EtaModel', app='courier') is stopped.
INFO 2026-11-28 11:21:30,996 controller 20972 -- Starting Replica(id='tx7ld49b', deployment='EtaModel', app='courier').
INFO 2026-11-28 11:21:38,928 controller 20972 -- Replica(id='tx7ld49b', deployment='EtaModel', app='courier') started successfully on node 'n1' after 7.9s (PID: {new_pid}). Replica constructor, reconfigure method, and initial health check took 0.5s.
INFO 2026-11-28 11:21:39,000 controller 20972 -- Replica(id='zzz', deployment='Other', app='elsewhere') started successfully on node 'n1' after 1s (PID: 1).
"""


# -- the plan -------------------------------------------------------------------------------------

def test_the_shipped_plan_kills_each_deployment_several_times_the_proxy_once_and_the_store():
    faults = [Fault.from_config(raw) for raw in load_config()["chaos"]["faults"]]
    kills = [f.deployment for f in faults if f.action == "kill_replica"]
    assert kills.count("EtaModel") >= 2 and kills.count("Ingress") >= 2
    assert [f.action for f in faults].count("kill_proxy") == 1
    assert any(f.action == "store_down" and f.duration_s > 0 for f in faults)
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
    with pytest.raises(ValueError):
        Fault.from_config({"at_s": 1, "explode": True})
    policy = retry_policy(load_config()["chaos"])
    assert policy.retries == 1 and policy.on_connection_error and 503 in policy.on_status


def test_the_cluster_plan_kills_whole_workers_and_a_node_kill_is_analysed_as_one():
    """On Kubernetes a fault deletes a pod, a whole Ray worker: the cluster has its own plan of node kills;
    a node kill reports when the worker pods were all back and when requests succeeded again. Locally
    there is one node, so `kill: node` is refused with what to do."""
    plan = [Fault.from_config(raw) for raw in load_config()["chaos"]["kubernetes"]["faults"]]
    assert {f.action for f in plan} >= {"kill_node"} and Fault.from_config({"at_s": 1, "kill": "node"}).label == "kill node"
    records = synthetic_records()
    node = FaultRecord(Fault(10, "kill_node"), t=10.2, target="worker-1", counts_before={"node": 2})
    timeline = [{"t": 0, "counts": {"node": 2}}, {"t": 10.4, "counts": {"node": 1}}, {"t": 41.0, "counts": {"node": 2}}]
    entry = analyze(records, [node], timeline, window_s=5, slo_p99_ms=100)["faults"][0]
    assert entry["nodes_before"] == 2 and entry["nodes_back_after_s"] == pytest.approx(30.8)
    assert entry["first_success_after_s"] is not None and "store_down_s" not in entry
    with pytest.raises(ValueError, match="--kubernetes"):
        LocalRayKiller.__new__(LocalRayKiller).targets("node")


def test_retry_policy_retries_once_on_connection_errors_and_503_only():
    policy = RetryPolicy(retries=1, backoff_s=0.2)
    assert policy.should_retry(CONNECTION_ERROR, 1) and policy.should_retry(503, 1)
    assert not policy.should_retry(503, 2)  # once
    assert not policy.should_retry(500, 1) and not policy.should_retry(408, 1) and not policy.should_retry(200, 1)
    assert policy.delay(1) == 0.2 and policy.delay(2) == 0.4


# -- recovery analysis ------------------------------------------------------------------------------

def test_recovery_windows_and_time_until_the_replica_count_is_back():
    kill = FaultRecord(Fault(10, "kill_replica", "EtaModel"), t=10.2, counts_before={"EtaModel": 2})
    outage = FaultRecord(Fault(30, "store_down", duration_s=5), t=30.0, end_t=35.1)
    windows = recovery_windows([kill, outage], 8)
    assert windows == [{"start": 10.2, "end": 18.2, "label": "kill EtaModel"},
                       {"start": 30.0, "end": 43.1, "label": "store down 5s"}]
    assert in_windows(np.array([5, 10.2, 18.19, 18.2, 40]), windows).tolist() == [False, True, True, False, True]
    timeline = [{"t": 0, "counts": {"EtaModel": 2}}, {"t": 10.5, "counts": {"EtaModel": 1}},
                {"t": 17.0, "counts": {"EtaModel": 2}}]
    assert time_until_back(timeline, "EtaModel", 10.2, 2) == pytest.approx(6.8)
    assert time_until_back(timeline[:2], "EtaModel", 10.2, 2) is None  # never back
    assert time_until_back(timeline, "EtaModel", 18.0, 2) is None  # the kill was never seen


def synthetic_records() -> Records:
    rows = []
    for i in range(1000):
        t = i * 0.05  # 20 req/s for 50 s
        first, status, attempts, latency = 200, 200, 1, 0.01
        if 10.2 <= t < 10.6:  # in flight on the killed replica: retried, slower
            first, attempts, latency = CONNECTION_ERROR, 2, 0.3
        if 30 <= t < 35:
            latency = 0.02
        rows.append((0, t, t, t + latency, status, first, attempts, 30 <= t < 35))
    return Records.from_rows(["eta"], rows)


def test_analysis_reports_success_rate_recovery_p99_and_degraded_answers():
    records = synthetic_records()
    faults = [FaultRecord(Fault(10, "kill_replica", "EtaModel"), t=10.2, target="123", counts_before={"EtaModel": 2}),
              FaultRecord(Fault(30, "store_down", duration_s=5), t=30.0, end_t=35.0),
              FaultRecord(Fault(40, "kill_proxy"), t=40.0, target="99")]
    timeline = [{"t": 0, "counts": {"EtaModel": 2}}, {"t": 10.3, "counts": {"EtaModel": 1}},
                {"t": 16.3, "counts": {"EtaModel": 2}}]
    verdict = analyze(records, faults, timeline, window_s=5, slo_p99_ms=100)
    assert verdict["failed"] == 0 and verdict["success_rate"] == 1.0 and verdict["passed"]
    assert verdict["first_attempt_failures"] == 8 and verdict["retried"] == 8
    assert verdict["p99_inside_recovery_ms"] >= 299 and verdict["p99_outside_recovery_ms"] <= 20.001
    kill, store, proxy = verdict["faults"]
    assert kill["replicas_back_after_s"] == pytest.approx(6.1) and kill["first_attempt_failures_in_window"] == 8
    assert store["degraded_answers_while_down"] == 100 and store["requests_while_down"] == 100
    assert proxy["first_success_after_s"] == pytest.approx(0.01)
    assert first_success_after(records, 1000.0) is None
    failing = Records.from_rows(["eta"], [(0, 1.0, 1.0, 1.01, 503, 503, 2, False)])
    assert not analyze(failing, [], [], 5, 100)["passed"]


# -- a drill on real processes: a supervised server is killed under load -----------------------

class SupervisedKiller(Killer):
    """A Killer for loadtest/servers/supervisor.py: one replica of deployment 'stub'."""

    def __init__(self, events: Path):
        self.events = events

    def _lines(self) -> list[tuple[float, str, int]]:
        out = []
        for line in self.events.read_text().splitlines():
            stamp, what, pid = line.split()
            out.append((float(stamp), what, int(pid)))
        return out

    def _ready_pids(self) -> list[int]:
        ready: set[int] = set()
        for _, what, pid in self._lines():
            if what == "ready":
                ready.add(pid)
            elif what == "died":
                ready.discard(pid)
        return sorted(ready)

    def targets(self, kind, deployment=None):
        return [Target(kind, str(pid), deployment) for pid in self._ready_pids()]

    def kill(self, target):
        os.kill(int(target.ident), signal.SIGKILL)

    def replica_counts(self):
        return {"stub": len(self._ready_pids())}

    def replica_timeline(self, clock):
        ready: set[int] = set()
        timeline = []
        for stamp, what, pid in self._lines():
            if what == "ready":
                ready.add(pid)
            elif what == "died":
                ready.discard(pid)
            timeline.append({"t": round(stamp - clock.wall0, 3), "counts": {"stub": len(ready)}})
        return timeline


@pytest.fixture
def supervised(tmp_path):
    port = free_port()
    events = tmp_path / "events.log"
    events.touch()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.servers.supervisor", "--events", str(events), "--ready-port", str(port),
         "--restart-delay", "0.1", "--", sys.executable, "-m", "uvicorn", "loadtest.servers.stub:app",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=PROJECT_ROOT, env={**os.environ, "COURIER_STUB_DELAY_MS": "20"}, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 30)
        deadline = time.monotonic() + 10
        while "ready" not in events.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", SupervisedKiller(events)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def drill(url: str, killer: Killer, retry: RetryPolicy) -> tuple[Records, list[FaultRecord], dict]:
    faults = [Fault(1.0, "kill_replica", "stub")]
    log: list[FaultRecord] = []
    clock = Clock()
    times = arrival_times([Stage(4.0, 50)], "constant")
    records = openloop.run(url, times, [Request("eta", "POST", "/v1/eta", b"{}")], retry=retry, clock=clock,
                           background=[fault_runner(faults, killer, None, log)], timeout_s=5)
    timeline = killer.replica_timeline(clock)
    # the window covers a restart (< 3 s, asserted below) plus the 1 s retry backoff, even on a busy machine
    return records, log, analyze(records, log, timeline, window_s=3.0, slo_p99_ms=1000)


def test_drill_on_real_processes_retrying_client_loses_nothing(supervised, tmp_path):
    url, killer = supervised
    records, log, verdict = drill(url, killer, RetryPolicy(retries=1, backoff_s=1.0))
    assert log[0].error is None and log[0].target is not None and log[0].counts_before == {"stub": 1}
    assert verdict["first_attempt_failures"] >= 1, verdict  # the kill was felt ...
    assert verdict["failed"] == 0 and verdict["success_rate"] == 1.0, verdict  # ... and the retry hid it
    back = verdict["faults"][0]["replicas_back_after_s"]
    assert back is not None and 0 < back < 3.0, verdict
    assert verdict["passed"]
    paths = write_run_report("drill", summarize(records), records, out_dir=tmp_path, replicas=killer.replica_timeline(
        Clock()), events=[{"t": f["t"], "label": f["fault"]} for f in verdict["faults"]], windows=verdict["windows"],
        extra={"chaos": verdict})
    assert json.loads(paths["json"].read_text())["chaos"]["failed"] == 0 and paths["png"].exists()


def test_drill_on_real_processes_without_retries_counts_the_failures(supervised):
    url, killer = supervised
    records, log, verdict = drill(url, killer, openloop.NO_RETRY)
    assert verdict["failed"] >= 1 and not verdict["passed"]
    failed_at = records.scheduled[~records.ok]
    assert failed_at.min() >= log[0].t - 0.2 and failed_at.max() <= log[0].t + 2.0  # in flight at the kill, or after


def test_a_fault_that_cannot_be_done_is_reported_not_fatal():
    class Empty(Killer):
        def targets(self, kind, deployment=None):
            return []

        def kill(self, target):
            raise AssertionError("nothing to kill")

        def replica_counts(self):
            return {}

    log: list[FaultRecord] = []
    job = fault_runner([Fault(0.0, "kill_replica", "EtaModel"), Fault(0.0, "store_down", duration_s=0.1)],
                       Empty(), None, log)
    import asyncio

    asyncio.run(job(Clock()))
    assert "no live replica of EtaModel" in log[0].error and "no online-store outage" in log[1].error


# -- the local Ray killer ----------------------------------------------------------------------------

def test_controller_log_gives_replica_counts_and_pids():
    events = parse_controller_log(CONTROLLER_LOG.format(eta_pid=111, new_pid=222))
    assert [e.kind for e in events if e.deployment == "EtaModel"] == [
        "starting", "started", "crashed", "stopping", "stopped", "starting", "started"]
    timeline = replica_timeline(events, "courier")
    counts = [c for _, c in timeline]
    assert counts[-1] == {"EtaModel": 1, "Ingress": 1}
    assert {"EtaModel": 0, "Ingress": 1} in counts  # the crash was seen
    assert "Other" not in counts[-1]


def test_local_ray_killer_kills_only_replicas_under_its_launcher(tmp_path):
    launcher = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        ray = LocalRay(launcher.pid)
        while len(ray.processes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        children = sorted(pid for pid, _ in ray.processes())
        assert len(children) == 2
        logs = tmp_path / "logs" / "serve"
        logs.mkdir(parents=True)
        (logs / "controller_1.log").write_text(CONTROLLER_LOG.format(eta_pid=children[0], new_pid=children[1]))
        killer = LocalRayKiller(launcher.pid)
        killer.ray._session_dir = tmp_path
        assert killer.replica_counts() == {"EtaModel": 1, "Ingress": 1}
        assert [t.ident for t in killer.targets("replica", "EtaModel")] == [str(children[1])]  # the live one
        assert killer.targets("replica", "Ingress") == []  # PID 21177 is not under our launcher
        import random

        target = killer.pick("replica", "EtaModel", random.Random(0))
        killer.kill(target)
        deadline = time.monotonic() + 5
        while children[1] in {pid for pid, _ in ray.processes()} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children[1] not in {pid for pid, _ in ray.processes()}
        with pytest.raises(RuntimeError, match="not under the launcher"):
            killer.kill(Target("replica", str(os.getpid()), "EtaModel"))
        with pytest.raises(RuntimeError, match="no live replica"):
            killer.pick("replica", "Ingress", random.Random(0))
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


# -- the Kubernetes killer, against a fake API ---------------------------------------------------------

def pod(name, phase="Running", ready=True, deleting=False, labels=None):
    conditions = [SimpleNamespace(type="Ready", status="True" if ready else "False")]
    return SimpleNamespace(metadata=SimpleNamespace(name=name, deletion_timestamp="now" if deleting else None,
                                                    labels=labels or {}),
                           status=SimpleNamespace(phase=phase, conditions=conditions))


class FakeCoreApi:
    def __init__(self, pods_by_selector):
        self.pods_by_selector, self.deleted, self.selectors_seen = pods_by_selector, [], []

    def list_namespaced_pod(self, namespace, label_selector):
        self.selectors_seen.append((namespace, label_selector))
        return SimpleNamespace(items=self.pods_by_selector.get(label_selector, []))

    def delete_namespaced_pod(self, name, namespace, grace_period_seconds=None):
        self.deleted.append((name, namespace, grace_period_seconds))


def test_kubernetes_killer_picks_running_pods_by_label_and_deletes_without_grace():
    workers = "app.kubernetes.io/instance=courier,ray.io/node-type=worker"
    head = "app.kubernetes.io/instance=courier,ray.io/node-type=head"
    api = FakeCoreApi({
        workers: [pod("w-1"), pod("w-2", deleting=True), pod("w-3", phase="Pending"), pod("w-4", ready=False)],
        head: [pod("head-0")],
    })
    killer = KubernetesKiller(api, "courier", {"EtaModel": workers, "Ingress": workers, "proxy": head})
    assert [t.ident for t in killer.targets("replica", "EtaModel")] == ["w-1", "w-4"]  # live: running, not deleting
    assert [t.ident for t in killer.targets("proxy")] == ["head-0"]
    import random

    picks = {killer.pick("replica", "Ingress", random.Random(seed)).ident for seed in range(20)}
    assert picks == {"w-1", "w-4"}
    killer.kill(killer.pick("proxy", None, random.Random(0)))
    assert api.deleted == [("head-0", "courier", 0)]
    assert killer.replica_counts() == {"EtaModel": 1, "Ingress": 1}  # Ready pods only
    assert all(ns == "courier" for ns, _ in api.selectors_seen)
    with pytest.raises(KeyError):
        killer.targets("replica", "Feed")
    fallback = KubernetesKiller(api, "courier", {"*": workers, "proxy": head, "node": workers})
    assert [t.ident for t in fallback.targets("replica", "Ranker")] == ["w-1", "w-4"]
    assert [t.ident for t in fallback.targets("node")] == ["w-1", "w-4"]
    assert fallback.replica_counts() == {"node": 1}  # Ready worker pods
    with pytest.raises(KeyError):
        KubernetesKiller(api, "courier", {"*": workers}).targets("proxy")
    empty = KubernetesKiller(FakeCoreApi({}), "courier", {"EtaModel": workers})
    with pytest.raises(RuntimeError):
        empty.pick("replica", "EtaModel", random.Random(0))


def test_kubernetes_store_outage_scales_redis_to_zero_and_back():
    calls = []
    apps = SimpleNamespace(
        patch_namespaced_stateful_set_scale=lambda name, ns, body: calls.append(("sts", name, ns, body)),
        patch_namespaced_deployment_scale=lambda name, ns, body: calls.append(("deploy", name, ns, body)))
    outage = KubernetesStoreOutage(apps, "courier", "courier-redis")
    outage.stop()
    outage.start()
    assert calls == [("sts", "courier-redis", "courier", {"spec": {"replicas": 0}}),
                     ("sts", "courier-redis", "courier", {"spec": {"replicas": 1}})]


# -- the online store outage, on a real redis-server ---------------------------------------------------

def test_local_redis_outage_stops_and_restarts_with_the_data(tmp_path):
    import redis

    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    try:
        client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
        client.set("feature", "42")
        server.snapshot()
        outage = LocalRedisOutage(server)
        outage.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            client.get("feature")
        outage.start()
        assert client.get("feature") == b"42"
    finally:
        server.stop()
