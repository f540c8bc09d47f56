"""The load tools: traffic model, open-loop driver, raw percentiles, reports, the SLO gate, Locust.

Nothing here is a timed benchmark. The gate is exercised end to end (`python -m loadtest run`,
its exit code) against a deliberately fast, slow and failing stub server; the scenario and
Locust are smoke-run for a few seconds against the real Ray Serve app (the session's `served`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from loadtest import openloop
from loadtest.config import load_config, resolve_rate, scenario
from loadtest.openloop import CONNECTION_ERROR, RetryPolicy, Stage, arrival_times
from loadtest.records import Records
from loadtest.report import summarize, timeseries, write_run_report
from loadtest.run import run_open, step_windows
from loadtest.server import ServiceProcess, free_port
from loadtest.slo import SLO, check, check_report
from loadtest.traffic import City, Request, session_requests
from models.geo import haversine_km
from models.simulator import DELIVERY_RADIUS_KM
from serving.paths import PROJECT_ROOT
from serving.schemas import parse_eta_request, parse_feed_request


def stub(env: dict[str, str] | None = None) -> ServiceProcess:
    """loadtest/servers/stub.py under uvicorn on a free port (fast unless env says otherwise)."""
    port = free_port()
    return ServiceProcess.python_module(
        "uvicorn", ["loadtest.servers.stub:app", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        port, env=env, name="stub", timeout_s=30)


@pytest.fixture(scope="module")
def fast_stub():
    with stub() as server:
        yield server


@pytest.fixture(scope="module")
def small_city(city_dir) -> City:
    return City(city_dir / "offline", seed=3)


def records_from(latencies_ms, statuses=None, endpoint=None) -> Records:
    n = len(latencies_ms)
    scheduled = np.arange(n) * 0.01
    statuses = np.full(n, 200) if statuses is None else np.asarray(statuses)
    endpoint = np.zeros(n, dtype=int) if endpoint is None else np.asarray(endpoint)
    rows = [(int(e), s, s, s + lat / 1000, int(st), int(st), 1, False)
            for e, s, lat, st in zip(endpoint, scheduled, latencies_ms, statuses)]
    return Records.from_rows(["eta", "feed"][: int(endpoint.max()) + 1], rows)


# -- traffic -------------------------------------------------------------------------------------

def test_sessions_come_from_the_simulated_city_and_pass_the_real_validator(small_city):
    for _ in range(50):
        session = small_city.session()
        assert 1 <= len(session.restaurants) <= 6
        assert len(set(session.restaurants)) == len(session.restaurants)
        for request in session_requests(session, ["eta"]):
            parsed = parse_eta_request(request.body)  # the serving contract accepts every body
            assert parsed.restaurant_id in set(small_city.restaurant_ids.tolist())
            i = list(small_city.restaurant_ids).index(parsed.restaurant_id)
            distance = haversine_km(parsed.delivery_lat, parsed.delivery_lon, small_city.r_lat[i], small_city.r_lon[i])
            assert distance <= DELIVERY_RADIUS_KM + 1e-6


def test_adding_the_feed_endpoint_is_a_list_entry(small_city):
    session = small_city.session()
    eta_only = session_requests(session, ["eta"])
    with_feed = session_requests(session, ["feed", "eta"])
    assert [r.endpoint for r in with_feed] == ["feed"] + ["eta"] * len(session.restaurants)
    assert with_feed[0].path == "/v1/feed" and with_feed[1:] == eta_only
    parsed = parse_feed_request(with_feed[0].body)  # the serving contract accepts the feed body too
    assert parsed.user_id == session.user_id and (parsed.user_lat, parsed.user_lon) == (
        round(session.lat, 6), round(session.lon, 6))
    assert load_config()["traffic"]["endpoints"] == ["feed", "eta"]


def test_config_rates_resolve_against_the_target():
    config = load_config()
    assert resolve_rate("target", 120) == 120 and resolve_rate("0.5x target", 120) == 60 and resolve_rate(7, 1) == 7
    steady = scenario(config, "steady")
    assert steady["stages"][0]["rate"] == float(config["target_rate"]) and steady["gate"] is True
    with pytest.raises(ValueError):
        resolve_rate("fast", 1)


# -- arrivals and the open-loop driver ---------------------------------------------------------

def test_poisson_and_constant_schedules_have_the_stated_rates():
    times = arrival_times([Stage(200, 50)], "poisson", seed=1)
    assert abs(len(times) / 200 - 50) < 2.5
    gaps = np.diff(times)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential gaps: coefficient of variation 1
    constant = arrival_times([Stage(2, 10), Stage(1, 0), Stage(1, 20)], "constant")
    assert len(constant) == 40 and np.allclose(np.diff(constant[:20]), 0.1)
    assert not ((constant >= 2) & (constant < 3)).any()


def test_the_driver_is_open_loop_and_counts_time_behind_a_slow_server():
    """A server slower than the arrival gap still gets every request on schedule."""
    with stub({"COURIER_STUB_DELAY_MS": "300"}) as slow:
        times = arrival_times([Stage(2.0, 50)], "constant")
        records = openloop.run(slow.url, times, [Request("eta", "POST", "/v1/eta", b"{}")])
    assert len(records) == 100 and records.ok.all()
    lag = records.started - records.scheduled
    assert np.percentile(lag, 99) < 0.05  # sent when scheduled, not when the previous answer came
    assert np.all(records.latency_ms >= 295)  # ... and latency counts from the scheduled send time
    concurrent = np.array([((records.started <= t) & (records.finished > t)).sum() for t in records.started])
    assert concurrent.max() >= 10  # a closed loop of one would never have more than one in flight


def test_the_capacity_sweep_finds_a_single_servers_limit_even_below_the_lowest_rate(small_city):
    """A server answering one request at a time in 10 ms holds < 100 req/s; the sweep, started above
    that, halves the rate until one holds, then bisects: the capacity lies between 25 and 100 req/s."""
    from loadtest.run import sweep

    with stub({"COURIER_STUB_SERVICE_MS": "10"}) as single:
        result = sweep(single.url, [200, 400], 3.0, 0.5, small_city, ["eta"], SLO(p99_ms=100), refine=1,
                       pause_s=0.2, noisy_retries=0, log=lambda _: None)
    assert not any(p["passed"] for p in result["points"] if p["offered_rate"] >= 200)
    assert result["capacity_rate"] is not None and 25 <= result["capacity_rate"] < 100, result
    assert result["first_failing_rate"] <= 100


def test_connection_errors_are_recorded_and_retried_once_with_backoff():
    port = free_port()  # nobody listens: every attempt is refused
    times = arrival_times([Stage(0.5, 20)], "constant")
    retry = RetryPolicy(retries=1, backoff_s=0.1)
    records = openloop.run(f"http://127.0.0.1:{port}", times, [Request("eta", "POST", "/v1/eta", b"{}")], retry=retry)
    assert (records.status == CONNECTION_ERROR).all() and (records.attempts == 2).all()
    assert np.all(records.latency_ms >= 100)  # the backoff is part of the latency


# -- percentiles and reports --------------------------------------------------------------------

def test_percentiles_come_from_the_raw_latencies():
    rng = np.random.default_rng(0)
    latencies = rng.lognormal(2, 0.7, 5000)
    statuses = np.where(rng.uniform(size=5000) < 0.01, 503, 200)
    endpoint = (rng.uniform(size=5000) < 0.2).astype(int)
    summary = summarize(records_from(latencies, statuses, endpoint), offered_rate=100)
    assert summary["p99_ms"] == pytest.approx(np.percentile(latencies, 99), rel=1e-6, abs=1e-3)
    assert summary["p50_ms"] == pytest.approx(np.percentile(latencies, 50), abs=1e-3)
    assert summary["max_ms"] == pytest.approx(latencies.max(), abs=1e-3)
    assert summary["errors"] == int((statuses != 200).sum()) and summary["error_statuses"] == {"503": summary["errors"]}
    feed = latencies[endpoint == 1]
    assert summary["endpoints"]["feed"]["p99_ms"] == pytest.approx(np.percentile(feed, 99), abs=1e-3)
    assert summary["endpoints"]["feed"]["requests"] == len(feed)


def test_report_writes_json_raw_records_and_a_plot(tmp_path):
    records = records_from(np.full(300, 5.0))
    summary = summarize(records, offered_rate=100)
    paths = write_run_report("unit", summary, records, out_dir=tmp_path, offered={"t": [0, 3], "rate": [100, 0]},
                             replicas=[{"t": 0, "counts": {"EtaModel": 1}}, {"t": 2, "counts": {"EtaModel": 2}}],
                             events=[{"t": 1, "label": "kill"}], windows=[{"start": 1, "end": 2, "label": "w"}],
                             slo={"p99_ms": 100})
    report = json.loads(paths["json"].read_text())
    assert report["summary"]["requests"] == 300 and report["machine"]["cpus"] >= 1
    assert report["replicas"][1]["counts"]["EtaModel"] == 2 and len(report["series"]["t"]) >= 3
    assert paths["png"].stat().st_size > 10_000 and paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert sum(timeseries(records)["sent"]) == pytest.approx(300)


def test_step_windows_exclude_warm_up_after_each_step_up():
    stages = [Stage(30, 10), Stage(60, 100), Stage(60, 10), Stage(30, 50)]
    windows = step_windows(stages, 5, 20)
    assert [(w["start"], w["end"]) for w in windows] == [(0, 5), (30, 50), (150, 170)]


# -- the SLO gate ---------------------------------------------------------------------------------

def test_gate_logic():
    slo = SLO(p99_ms=100, max_error_rate=0.001)
    good = summarize(records_from(np.full(2000, 10.0)), offered_rate=100)
    assert check(good, slo).passed
    slow = summarize(records_from(np.r_[np.full(1970, 10.0), np.full(30, 150.0)]), offered_rate=100)
    assert not check(slow, slo).passed and "p99" in check(slow, slo).reasons[0]
    failing = summarize(records_from(np.full(2000, 10.0), statuses=[500] * 3 + [200] * 1997), offered_rate=100)
    assert not check(failing, slo).passed  # 0.15 % > 0.1 %
    one_bad = summarize(records_from(np.full(2000, 10.0), statuses=[500] * 2 + [200] * 1998), offered_rate=100)
    assert check(one_bad, slo).passed  # 0.1 % is allowed
    assert not check(good, slo, target_rate=150).passed  # the target rate was not offered
    feed_slow = summarize(records_from(np.r_[np.full(1900, 10.0), np.full(100, 300.0)],
                                       endpoint=np.r_[np.zeros(1900), np.ones(100)]), offered_rate=100)
    result = check(feed_slow, slo)
    assert not result.passed and any("endpoint feed" in r for r in result.reasons)  # every endpoint is gated


def gate_config(tmp_path: Path, offline_dir: Path, rate: float = 30, seconds: float = 3) -> Path:
    config = load_config()
    config["traffic"]["offline_dir"] = str(offline_dir)  # the test's small city: a clean clone has no data/
    config["target_rate"] = rate
    config["quiet"] = {"max_wait_s": 0}  # a test does not wait for the shared machine to be quiet
    config["scenarios"]["steady"] = {"arrival": "poisson", "stages": [{"duration_s": seconds + 0.5, "rate": "target"}],
                                     "warmup_s": 0.5, "gate": True}
    path = tmp_path / "loadtest.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("env, passes", [
    ({}, True),
    ({"COURIER_STUB_DELAY_MS": "150"}, False),  # every answer over the p99 budget
    ({"COURIER_STUB_ERROR_RATE": "0.05"}, False),  # 5 % of requests fail
], ids=["fast", "slow", "failing"])
def test_the_gate_cli_fails_against_a_slow_or_failing_server(tmp_path, city_dir, env, passes):
    config = gate_config(tmp_path, city_dir / "offline")
    with stub(env) as server:
        done = run_cli("--config", str(config), "run", "steady", "--url", server.url, "--name", "gate-test")
    assert (done.returncode == 0) == passes, done.stdout + done.stderr
    assert ("SLO gate: PASS" in done.stdout) == passes
    report = PROJECT_ROOT / "reports" / "loadtest" / "gate-test.json"
    assert check_report(report).passed == passes
    gate = run_cli("gate", str(report))
    assert (gate.returncode == 0) == passes
    for suffix in (".json", ".png", ".npz"):
        report.with_suffix(suffix).unlink()


# -- smoke runs against the real service ---------------------------------------------------------

@pytest.mark.integration
def test_smoke_scenario_against_the_real_service(served, small_city):
    spec = {"arrival": "poisson", "stages": [{"duration_s": 4, "rate": 20}], "warmup_s": 1}
    endpoints = load_config()["traffic"]["endpoints"]
    result = run_open(served.url, spec, small_city, endpoints, slo=SLO(p99_ms=2000))
    summary = result.summary
    assert summary["requests"] > 30 and summary["errors"] == 0, summary
    assert set(summary["endpoints"]) == set(endpoints)  # the feed and the ETA checks, per endpoint
    assert all(e["requests"] > 0 and e["p99_ms"] < 2000 for e in summary["endpoints"].values())
    assert result.gate.passed and summary["cpu"]["busy_cores"] > 0


@pytest.mark.integration
def test_the_feed_stage_probe_reports_every_stage(served, small_city):
    """python -m loadtest.feed_stages: end-to-end and per-stage latencies of real feeds."""
    from loadtest.feed_stages import probe

    stages = probe(served.url, requests=3, rate=50, city=small_city, request_time="2026-11-19T19:00:00Z")  # open
    assert {"client", "total", "retrieval_call", "ranker_features", "ranking", "blending"} <= set(stages)
    assert all(len(values) == 3 for values in stages.values())
    assert max(stages["total"]) <= max(stages["client"])  # the server's part of what the client saw


@pytest.mark.integration
def test_locust_smoke_run_reports_raw_latencies(served, city_dir, tmp_path):
    config = load_config()
    config["traffic"]["offline_dir"] = str(city_dir / "offline")
    path = tmp_path / "loadtest.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "COURIER_LOADTEST_CONFIG": str(path), "COURIER_LOCUST_NAME": "locust-smoke",
           "COURIER_LOCUST_GATE": "0", "COURIER_LOCUST_TIME_SCALE": "0.02"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--host", served.url,
                           "--headless", "-u", "4", "-r", "4", "-t", "4s", "--only-summary"], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=90, check=False)
    assert time.monotonic() - started < 60
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report_path = PROJECT_ROOT / "reports" / "loadtest" / "locust-smoke.json"
    report = json.loads(report_path.read_text())
    assert report["closed_loop"] and report["summary"]["requests"] >= 10
    assert report["summary"]["errors"] == 0 and report["summary"]["endpoints"]["eta"]["p99_ms"] > 0
    assert report["endpoints_in_mix"] == config["traffic"]["endpoints"]
    for suffix in (".json", ".png", ".npz"):
        report_path.with_suffix(suffix).unlink()


# -- the side-by-side benchmark's variants ---------------------------------------------------------

def test_bench_variants_differ_from_the_shipped_config_only_as_stated():
    """(a) drops every deployment option; (b) is the shipped config; all run ETA only, at fixed replicas."""
    from loadtest.bench import (
        ETA_ONLY,
        fixed_replicas,
        ray_default_config,
        with_deployment_overrides,
    )
    from serving.config import load_serve_config, validate

    shipped = load_serve_config()
    eta_only = with_deployment_overrides(shipped, ETA_ONLY)
    names = [d["name"] for d in eta_only["applications"][0]["deployments"]]
    assert names == ["Ingress", "EtaModel"]
    default = ray_default_config(eta_only)
    assert all(set(d) == {"name"} for d in default["applications"][0]["deployments"])
    assert set(default["http_options"]) <= {"host", "port"}
    pinned = fixed_replicas(eta_only)
    for before, after in zip(eta_only["applications"][0]["deployments"], pinned["applications"][0]["deployments"]):
        assert "autoscaling_config" not in after
        assert after["num_replicas"] == before["autoscaling_config"]["min_replicas"]
        assert {k: v for k, v in after.items() if k != "num_replicas"} == \
               {k: v for k, v in before.items() if k != "autoscaling_config"}
    for config in (default, pinned):
        validate(config)
