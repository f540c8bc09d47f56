"""Clean stop, immediate restart, a start that ignores stale Ray clusters, readiness that means it (#13, 6 and 8).

The integration tests run the real launcher (`python -m serving.launch`) on free ports, started under a
Ray temp dir of their own whose address file names a Ray head that is gone (what `ray start --head`
leaves behind once that cluster is stopped). Faults are real: model replicas are paused with SIGSTOP,
the launcher gets SIGINT as from a terminal's Ctrl-C, or SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from chart_support import render_scenario, rendered_objects

from serving import reaper
from serving.launch import LOCAL, READY_LINE, BackgroundServer, ray_address
from serving.paths import PROJECT_ROOT
from serving.readiness import not_ready, not_ready_reason

STOP_BUDGET_S = 10  # "within a few seconds", with room for 2 shared cores under a full test suite
ETA_BODY = json.dumps({"user_id": 1, "restaurant_id": 1, "delivery_lat": 52.37, "delivery_lon": 4.9}).encode()


# --- the pieces, without a server -------------------------------------------------------------------------

def test_the_launcher_starts_its_own_ray_unless_told_to_join_one():
    assert ray_address(None, {}) == LOCAL
    assert ray_address(None, {"RAY_ADDRESS": "10.0.0.5:6380"}) == "10.0.0.5:6380"
    assert ray_address("10.0.0.6:6380", {"RAY_ADDRESS": "10.0.0.5:6380"}) == "10.0.0.6:6380"
    assert ray_address(None, {"RAY_ADDRESS": ""}) == LOCAL


def test_the_serve_config_stops_in_seconds_and_raises_no_warning():
    """Every deployment drains in-flight requests and stops within a few seconds; Ray's FutureWarning
    (look_back_period_s not above metrics_interval_s) is gone."""
    import ray.serve.schema  # noqa: F401 (its import-time DeprecationWarnings are Ray's, not the config's)

    from serving.config import load_serve_config, validate

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", UserWarning)
        schema = validate(load_serve_config())
    for app in schema.applications:
        for deployment in app.deployments:
            assert deployment.graceful_shutdown_wait_loop_s <= 1, deployment.name
            assert deployment.graceful_shutdown_timeout_s <= 10, deployment.name
    from serving.config import load_ray_env

    # Ray Serve keeps a stopping ingress replica reachable this long (30 s by default): Ctrl-C waited for it.
    assert float(load_ray_env()["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 5


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat[stat.rfind(")"):][:4]  # a zombie has let go of everything


def _wait(condition, timeout_s: float, step_s: float = 0.1) -> float | None:
    """Seconds until condition() held, or None after timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(step_s)
    return None


# A stand-in for the launcher's tree: launcher -> helper -> listener (in a process group of its own, as Ray's
# HAProxy manager starts HAProxy). argv: port, role, this script (each level starts the next with it).
SQUATTER = """
import socket, subprocess, sys, time
port, role, script = sys.argv[1], sys.argv[2], sys.argv[3]
if role == "launcher":
    from serving import reaper
    reaper.start()
    subprocess.Popen([sys.executable, "-c", script, port, "helper", script])
elif role == "helper":
    subprocess.Popen([sys.executable, "-c", script, port, "listener", script], start_new_session=True)
else:
    sock = socket.socket()
    sock.bind(("127.0.0.1", int(port)))
    sock.listen()
time.sleep(600)
"""


def test_the_reaper_frees_the_port_when_the_launcher_is_sigkilled():
    """A listener two levels below a SIGKILLed launcher, in a process group of its own, is gone in about a second:
    nothing is left answering on the port, and the port can be bound again."""
    from serving.launch import free_port

    port = free_port()
    launcher = subprocess.Popen([sys.executable, "-c", SQUATTER, str(port), "launcher", SQUATTER], cwd=PROJECT_ROOT,
                                start_new_session=True)
    try:
        assert _wait(lambda: _listening(port), 30) is not None, "the stand-in listener never started"
        time.sleep(1.0)  # the reaper has seen the whole tree
        below = [pid for pid, _ in reaper.tree({launcher.pid}, reaper.process_table())]
        assert len(below) >= 3, below  # the helper, the listener and the reaper itself
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        freed = _wait(lambda: not _listening(port), 5)
        assert freed is not None, f"port {port} still answered 5 s after the launcher was SIGKILLed"
        assert _wait(lambda: not any(_alive(pid) for pid in below), 5) is not None, \
            [pid for pid in below if _alive(pid)]
        with socket.socket() as sock:  # a restart could bind it now
            sock.bind(("127.0.0.1", port))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)


def test_the_reaper_spares_a_process_whose_pid_was_reused():
    """A process is known by pid and start time: a remembered pid now held by another process is not killed."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        table = reaper.process_table()
        start = table[sleeper.pid][1]
        assert reaper.kill_tree({(sleeper.pid, start + 1)}, exclude=os.getpid()) == []
        assert sleeper.poll() is None
        assert reaper.kill_tree({(sleeper.pid, start)}, exclude=os.getpid()) == [sleeper.pid]
        assert sleeper.wait(5) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            sleeper.kill()


def test_readiness_waits_a_bounded_time_and_asks_every_model_at_once():
    async def answers() -> dict:
        return {"name": "m"}

    async def hangs() -> None:
        await asyncio.sleep(3600)

    async def fails() -> None:
        raise ConnectionError("replica gone")

    async def check() -> None:
        assert await not_ready_reason("a", answers, 0.3) is None
        assert "within 0.3 s" in await not_ready_reason("b", hangs, 0.3)
        assert "ConnectionError: replica gone" in await not_ready_reason("c", fails, 0.3)
        calls = {"a": answers, "b": hangs, "c": hangs, "d": fails}
        started = time.monotonic()
        reasons = await not_ready(calls, lambda name: calls[name](), 0.3)
        assert time.monotonic() - started < 0.9  # concurrent: one bounded wait, not three
        assert sorted(reasons) == ["b", "c", "d"]

    asyncio.run(check())


# --- the chart: a stopping Ray pod drains before Kubernetes kills it ---------------------------------------

def _ray_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    service = next(o for o in objects if o["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def test_every_ray_pod_waits_for_its_endpoints_then_drains_within_its_grace_period():
    from serving.config import load_serve_config, validate

    longest = max(d.graceful_shutdown_timeout_s for app in validate(load_serve_config()).applications
                  for d in app.deployments)
    for name, spec in _ray_pods(rendered_objects("defaults")):
        ray = spec["containers"][0]
        sleep = ray["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[:2] == ["/bin/sh", "-c"] and sleep[2].startswith("sleep "), name
        pre_stop = int(sleep[2].split()[1])
        drain = int({e["name"]: e.get("value") for e in ray["env"]}["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        grace = spec["terminationGracePeriodSeconds"]
        assert pre_stop >= 1 and drain >= longest, (name, pre_stop, drain, longest)
        assert grace > pre_stop + drain, (name, grace, pre_stop, drain)


@pytest.mark.parametrize(("termination", "message"), [
    ({"preStopSeconds": 5, "drainSeconds": 40, "gracePeriodSeconds": 45}, "must be more than preStopSeconds"),
    ({"preStopSeconds": 5, "drainSeconds": 5, "gracePeriodSeconds": 30}, "shorter than the graceful_shutdown_timeout_s"),
])
def test_a_stop_budget_that_does_not_add_up_is_refused(termination, message):
    _, stderr, code = render_scenario("defaults", (f"ray.termination={json.dumps(termination)}",))
    assert code != 0 and message in stderr, stderr


# --- the real launcher ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stale_ray_tmpdir() -> Iterator[dict]:
    """A Ray temp dir whose address file names a Ray head that is gone: `ray start --head` on a free port
    (never 6379), then its processes (all in one session of our own) are killed."""
    from serving.launch import free_port

    tmp = Path(tempfile.mkdtemp(prefix="h4ray", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port(avoid={6379})
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                             "--num-cpus=0", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out, _ = head.communicate(timeout=180)
    address_file = tmp / "ray" / "ray_current_cluster"
    try:
        assert head.returncode == 0 and address_file.exists(), out[-2000:]
        session = head.pid  # start_new_session: every process `ray start` left running is in this session
        members = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                   if _session_of(pid) == session]
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert _wait(lambda: not any(_alive(pid) for pid in members), 10) is not None
        address = address_file.read_text().strip()
        assert not _listening(int(address.rsplit(":", 1)[1])), f"the stale head {address} still listens"
        yield {"RAY_TMPDIR": str(tmp), "address": address}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _session_of(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[3])
    return None


@pytest.fixture(scope="module")
def app_overrides(city_dir, feature_store, eta_trained, retrieval_trained, ranker_trained) -> list[str]:
    from tests.conftest import serve_overrides

    return ["--num-cpus", "2", *serve_overrides(city_dir, eta_trained, retrieval_trained, ranker_trained,
                                                prediction_log=None)]


@pytest.fixture(scope="module")
def ports() -> tuple[int, int, int]:
    from tests.conftest import distinct_ports

    return tuple(distinct_ports(3))


@pytest.fixture(scope="module")
def server(tmp_path_factory, stale_ray_tmpdir, app_overrides, ports) -> Iterator[BackgroundServer]:
    """The launcher, started where a plain ray.init() would join the dead head (and hang)."""
    port, metrics, dashboard = ports
    log = tmp_path_factory.mktemp("operations") / "serve.log"
    env = {"RAY_TMPDIR": stale_ray_tmpdir["RAY_TMPDIR"], "RAY_ADDRESS": ""}
    with BackgroundServer(port, metrics, log, extra=app_overrides, env=env, dashboard_port=dashboard) as running:
        yield running


def _get(url: str, timeout_s: float = 10) -> tuple[int, dict, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read()), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), time.monotonic() - started


def _replicas(launcher: int, deployment: str) -> list[int]:
    """The pids of a deployment's replica processes under the launcher."""
    found = []
    for pid, _ in reaper.tree({launcher}, reaper.process_table()):
        with contextlib.suppress(OSError):
            if f"ServeReplica:courier:{deployment}" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                found.append(pid)
    return found


@pytest.mark.integration
def test_a_stale_ray_address_does_not_hang_the_start(server, stale_ray_tmpdir):
    """The address file named a dead head; the launcher started a Ray of its own and serves."""
    assert READY_LINE in server.output()
    assert stale_ray_tmpdir["address"] not in server.output()
    status, body, _ = _get(f"{server.url}/v2/health/ready")
    assert (status, body) == (200, {"ready": True})


@pytest.mark.integration
def test_readiness_is_false_while_a_model_cannot_answer_and_true_after(server):
    """Both EtaModel replicas paused (SIGSTOP): the server and the eta model are not ready, within the bounded
    wait; the other models stay ready; resumed (SIGCONT), ready again."""
    eta = _replicas(server.process.pid, "EtaModel")
    assert len(eta) == 2, eta
    try:
        for pid in eta:
            os.kill(pid, signal.SIGSTOP)
        status, body, took = _get(f"{server.url}/v2/health/ready")
        assert (status, body) == (503, {"ready": False}) and took < 3, (status, body, took)
        status, body, took = _get(f"{server.url}/v2/models/eta/ready")
        assert (status, body["ready"]) == (503, False) and took < 3, (status, body, took)
        assert _get(f"{server.url}/v2/models/ranker/ready")[:2] == (200, {"name": "ranker", "ready": True})
    finally:
        for pid in eta:
            os.kill(pid, signal.SIGCONT)
    back = _wait(lambda: _get(f"{server.url}/v2/health/ready")[0] == 200, 30, 0.5)
    assert back is not None, "still not ready 30 s after the replicas resumed"
    assert _get(f"{server.url}/v2/models/eta/ready")[:2] == (200, {"name": "eta", "ready": True})


def _flood(url: str, stop: threading.Event, results: list) -> None:
    """Send /v1/eta back to back; record (sent at, status or error name)."""
    while not stop.is_set():
        sent = time.monotonic()
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/eta", ETA_BODY), timeout=15) as response:
                results.append((sent, response.status))
        except urllib.error.HTTPError as exc:
            results.append((sent, exc.code))
        except OSError as exc:
            results.append((sent, exc.__class__.__name__))
            time.sleep(0.01)


@pytest.mark.integration
def test_ctrl_c_stops_in_seconds_answering_every_request_in_flight(server, ports):
    """SIGINT to the launcher's process group (a terminal's Ctrl-C): it exits within STOP_BUDGET_S, every
    request sent before the signal is answered, and nothing listens on the serving or metrics port."""
    launcher = server.process
    tree = [pid for pid, _ in reaper.tree({launcher.pid}, reaper.process_table())]
    results: list = []
    stop = threading.Event()
    clients = [threading.Thread(target=_flood, args=(server.url, stop, results), daemon=True) for _ in range(3)]
    for client in clients:
        client.start()
    assert _wait(lambda: sum(1 for _, status in results if status == 200) >= 20, 30) is not None, results[-5:]
    signalled = time.monotonic()
    os.killpg(launcher.pid, signal.SIGINT)
    try:
        launcher.wait(STOP_BUDGET_S * 3)
    finally:
        stop.set()
        for client in clients:
            client.join(20)
    stopped = time.monotonic() - signalled
    before = [status for sent, status in results if sent < signalled]
    # Every request sent before the signal is answered: 200, or admission's 503 when these clients outrun two busy
    # cores; never a cut connection (HAProxy killed mid-request) nor a 500/502/504.
    assert before and set(before) <= {200, 503} and before.count(200) >= 20, {s: before.count(s) for s in set(before)}
    assert launcher.returncode == 0, server.output()[-3000:]
    assert stopped < STOP_BUDGET_S, f"the launcher took {stopped:.1f} s to stop:\n{server.output()[-3000:]}"
    port, metrics, _ = ports
    assert _wait(lambda: not _listening(port) and not _listening(metrics), 3) is not None
    assert _wait(lambda: not any(_alive(pid) for pid in tree), 5) is not None, [p for p in tree if _alive(p)]
    print(f"stopped in {stopped:.1f} s; requests sent before the signal: {before.count(200)} x 200, "
          f"{before.count(503)} x 503 (admission)")


@pytest.mark.integration
def test_a_restart_right_after_works_and_a_killed_launcher_leaves_no_squatter(
        server, tmp_path, stale_ray_tmpdir, app_overrides, ports):
    """Right after the Ctrl-C above, the same ports serve again; then SIGKILL of the launcher alone (no chance
    to clean up) frees them within seconds: its reaper kills HAProxy, Ray and the replicas it left behind."""
    port, metrics, dashboard = ports
    env = {"RAY_TMPDIR": stale_ray_tmpdir["RAY_TMPDIR"], "RAY_ADDRESS": ""}
    again = BackgroundServer(port, metrics, tmp_path / "again.log", extra=app_overrides, env=env,
                             dashboard_port=dashboard)
    with again:
        assert _get(f"{again.url}/v2/health/ready")[:2] == (200, {"ready": True})
        launcher = again.process
        time.sleep(1)  # the reaper remembers the tree twice a second
        below = reaper.tree({launcher.pid}, reaper.process_table())
        tree, haproxy = [pid for pid, _ in below], reaper.named(below, "haproxy")
        assert haproxy, "no HAProxy under the launcher (RAY_SERVE_ENABLE_HA_PROXY is on in serving/ray_env.yaml)"
        killed = time.monotonic()
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        freed = _wait(lambda: not _listening(port) and not _listening(metrics), 10)
        assert freed is not None, f"port {port} or {metrics} still answers 10 s after SIGKILL"
        assert _wait(lambda: not any(_alive(pid) for pid in tree), 10) is not None, [p for p in tree if _alive(p)]
        for taken in (port, metrics):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", taken))  # "cannot bind socket" before
        print(f"SIGKILL: ports free after {freed:.1f} s, whole tree gone after {time.monotonic() - killed:.1f} s")
