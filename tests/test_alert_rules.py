"""The alert rules, their unit tests and the dashboard, checked by the real promtool and a real Prometheus.

promtool and prometheus come from Debian's `prometheus` package (.ci/run installs it). The rules and
the dashboard may only name the metrics of the issue-11 contract (serving's with Ray's `ray_` prefix,
the monitor's without) or the rules' own recorded series.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port

from monitoring.prometheus import PrometheusServer, rule_files

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "rules" / "courier.rules.yaml"
RULE_TESTS = sorted((ROOT / "monitoring" / "rules" / "tests").glob("*.yaml"))
DASHBOARD = ROOT / "monitoring" / "dashboards" / "courier.json"
INSTALL_HINT = "install Debian's prometheus package: sudo apt-get install prometheus (.ci/run does)"

# Serving's metrics as Prometheus sees them through Ray's metrics agent (prefix `ray_`).
SERVING_METRICS = {
    "ray_courier_predictions_logged_total", "ray_courier_prediction_log_dropped_total",
    "ray_courier_feature_reads_total", "ray_courier_feature_expired_reads_total",
    "ray_courier_model_trained_timestamp_seconds", "ray_courier_fallback_total",
    "ray_courier_rejected_requests_total",
    "ray_courier_stage_latency_ms_bucket", "ray_courier_stage_latency_ms_count", "ray_courier_stage_latency_ms_sum",
}
# The monitor's metrics (python -m monitoring, :9108).
MONITOR_METRICS = {
    "courier_eta_outcomes_total", "courier_eta_error_minutes_total", "courier_eta_abs_error_minutes_total",
    "courier_eta_squared_error_minutes2_total", "courier_eta_offline_rmse_minutes",
    "courier_feed_impressions_total", "courier_feed_orders_total",
    "courier_feed_top_predicted_orders_total", "courier_feed_top_orders_total",
    "courier_prediction_psi", "courier_feature_psi",
    "courier_feature_view_newest_age_seconds", "courier_feature_view_ttl_seconds",
    "courier_feature_view_freshness_budget_seconds", "courier_model_age_budget_seconds",
    "courier_joined_records_total", "courier_unjoined_expired_total", "courier_offline_rows_appended_total",
}
CONTRACT_METRICS = SERVING_METRICS | MONITOR_METRICS
# Every label the contract's metrics carry (Ray's own are aggregated away), plus the histogram's `le`.
CONTRACT_LABELS = {"endpoint", "reason", "view", "model", "version", "model_version", "variant", "position", "feature",
                   "status", "stage", "table", "le"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan"}


def series_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and strings left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    text = re.sub(r"(?<![A-Za-z0-9_:])\d[\w.]*", "", text)  # numbers and offset durations (5m, 1e3, 0.99)
    text = _LABEL_LIST.sub("", text)  # `max by (x) (` becomes `max (`: a call
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        is_call = text[match.end():].lstrip().startswith("(")
        if not is_call and match.group(0).lower() not in _KEYWORDS:
            names.add(match.group(0))
    return names


def label_names(expr: str) -> set[str]:
    """Label names an expression matches or groups by (label_replace's target is a string: not here)."""
    text = _STRING.sub('""', expr)
    grouped = {name.strip() for _, names in _LABEL_LIST.findall(text) for name in names.split(",") if name.strip()}
    matched = {m for selector in re.findall(r"\{([^}]*)\}", text)
               for m in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", selector)}
    return grouped | matched


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


RECORDED = {rule["record"] for rule in _rules() if "record" in rule}
ALERTS = {rule["alert"]: rule for rule in _rules() if "alert" in rule}


@pytest.fixture(scope="module")
def promtool() -> str:
    """The real promtool binary."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"promtool is not on PATH: {INSTALL_HINT}")
    return path


def _run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def test_the_extractor_finds_metrics_not_functions_or_labels():
    """series_names is the basis of the contract checks: it must see metrics and only metrics."""
    expr = ('histogram_quantile(0.99, sum by (endpoint, le) (rate(ray_x_bucket{stage="total"}[5m])))'
            ' > on (endpoint) group_left max by (model) (b:c:d) and label_replace(e, "f", "g", "h", "i")'
            ' or vector(0) unless time() - ignoring (x) j offset 5m')
    assert series_names(expr) == {"ray_x_bucket", "b:c:d", "e", "j"}
    assert label_names(expr) == {"endpoint", "le", "stage", "model", "x"}


def test_rule_files_pass_promtool_check(promtool):
    """promtool check rules: valid PromQL, valid templates, no duplicate rules."""
    out = _run(promtool, "check", "rules", *map(str, rule_files()))
    assert out.returncode == 0, out.stdout + out.stderr
    assert [RULES] == rule_files()


def test_rule_unit_tests_pass(promtool):
    """promtool test rules: every alert fires on its series at the stated time with its labels and
    annotations, stays silent on the healthy series, and the recording rules compute the stated values."""
    assert RULE_TESTS, "no rule unit tests in monitoring/rules/tests/"
    out = _run(promtool, "test", "rules", *[p.name for p in RULE_TESTS], cwd=RULE_TESTS[0].parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_severity_and_says_what_to_do():
    """Each alert: severity critical or warning, a summary, and a description that says what to do."""
    assert set(ALERTS) == {
        "CourierModelTooOld", "CourierFeatureViewStale", "CourierFeatureViewExpired", "CourierLiveEtaErrorHigh",
        "CourierConversionDrop", "CourierCalibrationDrift", "CourierPredictionDrift", "CourierFeatureDrift",
        "CourierLatencyP99AboveSlo", "CourierErrorRateHigh", "CourierFallbackRateHigh",
        "CourierPredictionLogDropping"}
    for name, rule in ALERTS.items():
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name} has no summary"
        assert "What to do:" in annotations.get("description", ""), f"{name}'s description does not say what to do"


def test_drill_alerts_fire_within_a_short_drill():
    """A drill of a few minutes sees the ETA and freshness alerts: their `for` stays short."""
    assert ALERTS["CourierLiveEtaErrorHigh"]["for"] == "1m"
    assert ALERTS["CourierFeatureViewStale"]["for"] == "30s"
    assert ALERTS["CourierFeatureViewExpired"]["for"] == "30s"


def test_rules_use_only_contract_metrics_and_labels():
    """Every series a rule reads is a contract metric or a series recorded earlier in the file, and every
    label it matches or groups by is one the contract's metrics carry."""
    recorded_so_far: set[str] = set()
    for rule in _rules():
        where = rule.get("record") or rule.get("alert")
        unknown = series_names(rule["expr"]) - CONTRACT_METRICS - recorded_so_far
        assert not unknown, f"{where} reads {unknown}: not in the contract nor recorded before it"
        assert label_names(rule["expr"]) <= CONTRACT_LABELS, f"{where}: {label_names(rule['expr']) - CONTRACT_LABELS}"
        if "record" in rule:
            recorded_so_far.add(rule["record"])
    assert len(RECORDED) == len([r for r in _rules() if "record" in r]), "a series is recorded twice"


def test_every_alert_and_record_is_unit_tested():
    """Every alert has a case where it fires and a case where it must stay silent; every recorded
    series has its value checked; the input series only use contract metrics."""
    fires, silent, checked = set(), set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for series in case["input_series"]:
                name = series["series"].split("{")[0]
                assert name in CONTRACT_METRICS, f"{path.name}: input series {name} is not a contract metric"
            for test in case.get("alert_rule_test", []):
                (fires if test.get("exp_alerts") else silent).add(test["alertname"])
            for test in case.get("promql_expr_test", []):
                checked |= series_names(test["expr"])
    assert set(ALERTS) - fires == set(), f"alerts never shown firing: {set(ALERTS) - fires}"
    assert set(ALERTS) - silent == set(), f"alerts never shown silent: {set(ALERTS) - silent}"
    assert RECORDED - checked == set(), f"recorded series whose value no test checks: {RECORDED - checked}"


def _dashboard_panels() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_is_grafana_json_on_known_series():
    """The dashboard: Grafana schema 39, its Prometheus picked by the DS_PROMETHEUS variable, unique
    panel ids inside the 24-column grid, and every query on contract metrics or recorded series."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39 and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queried = set()
    for panel in _dashboard_panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            names = series_names(target["expr"])
            unknown = names - CONTRACT_METRICS - RECORDED
            assert names and not unknown, f"{panel['title']} queries {unknown}: not contract metrics nor recorded"
            queried |= names
    # What the alerts judge is on the dashboard.
    for series in ("model_version:courier_eta_rmse_minutes:5m", "model_version:courier_feed_calibration:ratio5m",
                   "model_version_position:courier_feed_conversion:ratio5m",
                   "courier_prediction_psi", "courier_feature_psi",
                   "view:courier_feature_view_newest_age_seconds:max", "model_version:courier_model_age_seconds:max",
                   "endpoint:courier_request_latency_ms:p99_5m", "courier:request_5xx:ratio_rate5m",
                   "endpoint:courier_fallback:ratio_rate5m", "endpoint_reason:courier_prediction_log_dropped:rate5m"):
        assert series in queried, f"the dashboard does not show {series}"


# --- a real Prometheus scraping a real exporter ----------------------------------------------------

def _exporter(stale_age_s: float):
    """A prometheus_client HTTP server exposing freshness gauges as the monitor does: one view past its
    budget (not its TTL), one fresh."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    age = Gauge("courier_feature_view_newest_age_seconds", "newest value age", ["view"], registry=registry)
    budget = Gauge("courier_feature_view_freshness_budget_seconds", "freshness budget", ["view"], registry=registry)
    ttl = Gauge("courier_feature_view_ttl_seconds", "TTL", ["view"], registry=registry)
    for view, seconds in (("area_congestion_15m", stale_age_s), ("restaurant_load_15m", 5.0)):
        age.labels(view).set(seconds)
        budget.labels(view).set(60)
        ttl.labels(view).set(900)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server, port


def _with_short_for(tmp_path: Path, alert: str, duration: str) -> Path:
    """The repository's rules with one alert's `for` shortened, so the test waits seconds, not minutes."""
    groups = yaml.safe_load(RULES.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["for"] = duration
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(groups, sort_keys=False))
    return path


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_prometheus_scrapes_the_monitor_and_fires_the_stale_view_alert(tmp_path):
    """monitoring.prometheus runs Debian's Prometheus on the repository's rules (Stale's `for` cut to
    2 s): it scrapes a monitor-like exporter, records the view's age, fires CourierFeatureViewStale for
    the stale view only, and leaves no process or port behind."""
    exporter, exporter_port = _exporter(stale_age_s=300)
    port = free_port()
    rules = _with_short_for(tmp_path, "CourierFeatureViewStale", "2s")
    try:
        with PrometheusServer(serving_metrics=None, monitor=f"127.0.0.1:{exporter_port}", port=port,
                              eval_interval="1s", scrape_interval="1s", rules=[rules],
                              run_dir=tmp_path / "prometheus") as prom:
            prom.wait_ready(timeout_s=30)
            deadline, firing = time.monotonic() + 30, []
            while time.monotonic() < deadline and not firing:
                firing = prom.firing("CourierFeatureViewStale")
                time.sleep(0.5)
            assert firing, f"CourierFeatureViewStale did not fire within 30 s; active: {prom.alerts()}"
            assert [a["labels"] for a in firing] == [
                {"alertname": "CourierFeatureViewStale", "severity": "warning", "view": "area_congestion_15m"}]
            assert firing[0]["annotations"]["summary"] == (
                "Feature view area_congestion_15m is stale: newest value 5m 0s old, over its freshness budget")
            ages = {r["metric"]["view"]: float(r["value"][1])
                    for r in prom.query("view:courier_feature_view_newest_age_seconds:max")}
            assert ages == {"area_congestion_15m": 300.0, "restaurant_load_15m": 5.0}
            assert not prom.firing("CourierFeatureViewExpired")  # 300 s is under the 900 s TTL
            now = time.time()
            series = prom.query_range("up", now - 10, now, step=1)
            assert series and series[0]["metric"]["job"] == "courier-monitor"
            process = prom.process
        assert process.poll() is not None, "prometheus still runs after the context exited"
        assert not _port_open(port), f"port {port} still answers after the context exited"
    finally:
        exporter.shutdown()
