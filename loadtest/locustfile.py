"""Closed-loop load with Locust: people using the app, with think times.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000                 # web UI on :8089
    locust -f loadtest/locustfile.py --host ... --headless -u 50 -r 10 -t 60s    # headless

Each simulated user repeats sessions from the simulated city (loadtest/traffic.py): one feed
(when `feed` is in `traffic.endpoints` of loadtest/config.yaml), then a few ETA checks of
restaurants in reach, with think times between requests and a pause between sessions.

Every request's latency is kept raw (an event hook), and when Locust stops, the run is
reported through loadtest/report.py like every other run: reports/loadtest/<name>.json + .png
(name: COURIER_LOCUST_NAME, default "locust"), leaving out the first COURIER_LOCUST_WARMUP_S
seconds (users still spawning). With COURIER_LOCUST_GATE=1 the SLO gate's p99 and error-rate
checks decide Locust's exit code (closed-loop runs have no target rate).
"""

from __future__ import annotations

import os
import random
import threading
import time

import gevent
from locust import FastHttpUser, between, events, task

from loadtest.config import load_config
from loadtest.records import CONNECTION_ERROR, Records
from loadtest.report import summarize, write_run_report
from loadtest.slo import SLO, check
from loadtest.traffic import City, city_from_config, session_requests
from serving.auth import client_headers

CONFIG = load_config(os.environ.get("COURIER_LOADTEST_CONFIG") or None)
TRAFFIC = CONFIG["traffic"]
THINK = tuple(TRAFFIC.get("think_time_s", [2, 8]))
AUTH = client_headers()  # COURIER_API_KEY (the chart's internal key), if set
PAUSE = tuple(TRAFFIC.get("session_pause_s", [5, 20]))
SCALE = float(os.environ.get("COURIER_LOCUST_TIME_SCALE", "1"))  # < 1 shortens think times (smoke tests)

_rows: list[tuple] = []
_endpoints: list[str] = []
_lock = threading.Lock()
_t0 = [time.monotonic(), time.time()]
_city: list[City] = []


def _index(endpoint: str) -> int:
    with _lock:
        if endpoint not in _endpoints:
            _endpoints.append(endpoint)
        return _endpoints.index(endpoint)


@events.test_start.add_listener
def _on_start(environment, **kwargs) -> None:
    _rows.clear()
    _t0[:] = [time.monotonic(), time.time()]
    if not _city:
        _city.append(city_from_config(TRAFFIC, seed=int(os.environ.get("COURIER_LOCUST_SEED", "0"))))


@events.request.add_listener
def _on_request(request_type, name, response_time, response_length, response=None, exception=None, **kwargs) -> None:
    """Keep every request's raw latency (ms) and outcome."""
    finished = time.monotonic() - _t0[0]
    started = finished - (response_time or 0.0) / 1000.0
    status = getattr(response, "status_code", None) or 0
    if exception is not None and not status:
        status = CONNECTION_ERROR
    elif exception is not None and 200 <= status < 300:
        status = 599  # marked failed by the user code although HTTP said OK
    degraded = bool(response is not None and b'"degraded":true' in (getattr(response, "content", b"") or b""))
    _rows.append((_index(name), started, started, finished, status, status, 1, degraded))


@events.quitting.add_listener
def _on_quit(environment, **kwargs) -> None:
    """Write the report from the raw latencies, and gate the exit code when asked."""
    if not _rows:
        return
    records = Records.from_rows(list(_endpoints), list(_rows), wall_start=_t0[1])
    duration = float(records.finished.max()) if len(records) else 0.0
    warmup = min(float(os.environ.get("COURIER_LOCUST_WARMUP_S", "0")), duration / 2)  # users still spawning
    summary = summarize(records, window=(warmup, duration + 1e-9))
    slo = SLO.from_config(CONFIG)
    gate = check(summary, slo, None)
    name = os.environ.get("COURIER_LOCUST_NAME", "locust")
    users = environment.parsed_options.num_users if environment.parsed_options else None
    windows = [{"start": 0.0, "end": warmup, "label": "spawning users"}] if warmup else []
    paths = write_run_report(name, summary, records, windows=windows,
                             slo={**slo.as_dict(), "target_rate": None,
                                  "gated": os.environ.get("COURIER_LOCUST_GATE") == "1"},
                             extra={"closed_loop": True, "users": users, "think_time_s": THINK,
                                    "session_pause_s": PAUSE, "time_scale": SCALE, "gate": gate.as_dict(),
                                    "endpoints_in_mix": TRAFFIC["endpoints"], "host": environment.host})
    print(f"[locust] {summary['requests']} requests, {summary['achieved_rate']} ok/s, p50 {summary['p50_ms']} ms, "
          f"p99 {summary['p99_ms']} ms, errors {summary['errors']}; report {paths['json']}", flush=True)
    if os.environ.get("COURIER_LOCUST_GATE") == "1":
        print("[locust] SLO gate: " + ("PASS" if gate.passed else "FAIL: " + "; ".join(gate.reasons)), flush=True)
        environment.process_exit_code = 0 if gate.passed else 1


class AppUser(FastHttpUser):
    """One person with the app open: sessions of one feed and a few ETA checks."""

    wait_time = between(PAUSE[0] * SCALE, PAUSE[1] * SCALE)  # between sessions

    def on_start(self) -> None:
        """People do not all open the app in the same second: spread the first sessions out."""
        gevent.sleep(random.uniform(0, PAUSE[1] * SCALE))

    @task
    def session(self) -> None:
        city = _city[0]
        requests = session_requests(city.session(), TRAFFIC["endpoints"])
        for i, request in enumerate(requests):
            if i:
                gevent.sleep(random.uniform(*THINK) * SCALE)
            with self.client.request(request.method, request.path, data=request.body, name=request.endpoint,
                                     headers={"content-type": "application/json", **AUTH},
                                     catch_response=True) as response:
                if 200 <= response.status_code < 300:
                    response.success()
                else:
                    response.failure(f"HTTP {response.status_code}")
