"""The chart's monitoring objects: the PrometheusRule is the repository's rule file, unchanged and valid
for promtool and for the prometheus-operator's CRD; the dashboard ConfigMap is the repository's JSON.

The scenario tests/chart_values/monitoring.yaml also runs through every per-scenario check of
tests/test_chart.py (lint, schemas, restricted profile, checkov) and tests/test_chart_contract.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_support import find, only

from charts.checks.render import CHART, ROOT

RULES = ROOT / "monitoring" / "rules" / "courier.rules.yaml"
DASHBOARD = ROOT / "monitoring" / "dashboards" / "courier.json"
LINKS = {"courier.rules.yaml": RULES, "courier-dashboard.json": DASHBOARD}

# The PrometheusRule CRD's schema (spec and below), transcribed from prometheus-operator v0.82.2,
# example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml: the CRD is not among the
# pinned files in ../shared/crds. Unknown fields are refused, as the API server's strict validation does.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_RULE = {"type": "object", "required": ["expr"], "additionalProperties": False, "properties": {
    "alert": {"type": "string"}, "record": {"type": "string"}, "annotations": _STRINGS, "labels": _STRINGS,
    "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "for": _DURATION,
    "keep_firing_for": {**_DURATION, "minLength": 1}}}
_GROUP = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string", "minLength": 1}, "interval": _DURATION, "labels": _STRINGS, "limit": {"type": "integer"},
    # Upstream writes ^(?i)(abort|warn)?$; Python wants the flag first.
    "partial_response_strategy": {"type": "string", "pattern": "(?i)^(abort|warn)?$"},
    "query_offset": _DURATION, "rules": {"type": "array", "items": _RULE}}}
PROMETHEUS_RULE_SCHEMA = {"type": "object", "required": ["spec"], "properties": {
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
    "metadata": {"type": "object"},
    "spec": {"type": "object", "additionalProperties": False,
             "properties": {"groups": {"type": "array", "items": _GROUP}}}}}


def prometheus_rule_errors(obj: dict[str, Any]) -> list[str]:
    """What the API server would refuse in a PrometheusRule: the CRD's schema, group names unique (a list
    map keyed by name), and its metadata as Kubernetes validates any object's (checked on a ConfigMap)."""
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}"
              for e in jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA).iter_errors(obj)]
    names = [group.get("name") for group in obj.get("spec", {}).get("groups", [])]
    if len(names) != len(set(names)):
        errors.append(f"spec.groups: duplicate names {names}")
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    for version in ("1.30.0", "1.35.0"):
        try:
            kubernetes_validate.validate(carrier, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"metadata on Kubernetes {version}: {exc}")
    return errors


def _monitoring(objects: list[dict]) -> list[dict]:
    return find(objects, "PrometheusRule") + find(objects, "ConfigMap", "monitoring")


def test_monitoring_is_off_by_default(render):
    """No PrometheusRule by default: without the prometheus-operator's CRDs it would fail the install."""
    assert not _monitoring(render())
    assert yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]["enabled"] is False


def test_the_chart_reads_the_repository_files_through_symlinks():
    """files/ links to monitoring/rules and monitoring/dashboards: one copy of each, nothing to sync."""
    for name, target in LINKS.items():
        link = CHART / "files" / name
        assert link.is_symlink() and link.resolve() == target.resolve(), name


def test_prometheus_rule_is_the_rule_file(render):
    """The PrometheusRule's groups are exactly the rule file's; the values' labels reach it (the
    operator's ruleSelector) and the CRD's schema accepts it."""
    rule = only(render("monitoring"), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/component"] == "monitoring"
    assert prometheus_rule_errors(rule) == []


def test_the_crd_schema_refuses_what_the_operator_refuses(render):
    """The transcribed schema is not a rubber stamp: a misspelt field or a bad duration fails it."""
    rule = only(render("monitoring"), "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    rule["spec"]["groups"][1]["rules"][-1]["for"] = "5 minutes"
    rule["spec"]["groups"].append({"name": rule["spec"]["groups"][2]["name"], "rules": []})
    errors = " ".join(prometheus_rule_errors(rule))
    assert "expresion" in errors and "5 minutes" in errors and "duplicate" in errors


def test_rendered_rules_pass_promtool(render, tmp_path):
    """What the operator hands Prometheus (the rendered groups) passes `promtool check rules`."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: install Debian's prometheus package: sudo apt-get install prometheus")
    path = tmp_path / "rendered.rules.yaml"
    groups = only(render("monitoring"), "PrometheusRule")["spec"]["groups"]
    path.write_text(yaml.safe_dump({"groups": groups}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in out.stdout


def test_dashboard_configmap_is_the_dashboard_file(render):
    """The ConfigMap holds the repository's dashboard JSON, labelled for Grafana's sidecar, with the
    values' annotations."""
    configmap = only(render("monitoring"), "ConfigMap", "monitoring")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Courier"}
    assert list(configmap["data"]) == ["courier.json"]
    assert json.loads(configmap["data"]["courier.json"]) == json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize(("toggle", "kept"), [("monitoring.rules.enabled=false", "ConfigMap"),
                                              ("monitoring.dashboard.enabled=false", "PrometheusRule")])
def test_rules_and_dashboard_each_have_a_switch(render, toggle, kept):
    """monitoring.rules.enabled and monitoring.dashboard.enabled drop one object each, nothing else."""
    assert [o["kind"] for o in _monitoring(render("monitoring", toggle))] == [kept]
    others = sorted(o["kind"] for o in render("monitoring") if o not in _monitoring(render("monitoring")))
    assert sorted(o["kind"] for o in render("defaults")) == others


def test_packaged_chart_carries_the_rules_and_dashboard(helm, tmp_path):
    """helm package follows the symlinks: a packaged chart has the real rule file and dashboard."""
    out = subprocess.run([helm, "package", str(CHART), "-d", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    with tarfile.open(next(Path(tmp_path).glob("courier-*.tgz"))) as tgz:
        for name, target in LINKS.items():
            assert tgz.extractfile(f"courier/files/{name}").read() == target.read_bytes(), name
