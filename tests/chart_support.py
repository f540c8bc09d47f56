"""Rendering the chart per values scenario, and reading the rendered objects: shared by the chart tests.

A scenario is a values file: one per toggle in tests/chart_values/, the documented profile for a real
cluster (charts/courier/values-cluster.yaml), and the chart's defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from charts.checks.render import CHART, NAMESPACE, RELEASE, render_text  # noqa: F401 (re-exported to the tests)

VALUES_DIR = Path(__file__).parent / "chart_values"
# Every toggle's values file, plus the documented profile for a real cluster.
SCENARIO_FILES = {"defaults": None, "cluster-profile": CHART / "values-cluster.yaml",
                  **{p.stem: p for p in sorted(VALUES_DIR.glob("*.yaml"))}}
SCENARIOS = list(SCENARIO_FILES)


def scenario_files(scenario: str) -> tuple[str, ...]:
    """The values files of a scenario (none for the defaults)."""
    path = SCENARIO_FILES[scenario]
    return (str(path),) if path else ()


def render_scenario(scenario: str, sets: tuple[str, ...] = ()) -> tuple[str, str, int]:
    """(stdout, stderr, exit code) of helm template for a scenario plus --set-json items (cached)."""
    return render_text(scenario_files(scenario), tuple(sets))


def rendered_objects(scenario: str = "defaults", *sets: str) -> list[dict[str, Any]]:
    """The objects of a scenario; fails with helm's message when it does not render."""
    stdout, stderr, code = render_scenario(scenario, sets)
    assert code == 0, f"helm template failed for {scenario} {sets}:\n{stderr}"
    return [doc for doc in yaml.safe_load_all(stdout) if doc]


def kinds(objects: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def only(objects: list[dict], kind: str, component: str | None = None) -> dict:
    found = find(objects, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def find(objects: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (
        component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def pod_specs(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod labels, pod spec) of every pod an object will create, custom resources included."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "Pod":
        yield name, obj["metadata"].get("labels", {}), obj["spec"]
    elif kind in {"Deployment", "StatefulSet", "Job"}:
        tpl = obj["spec"]["template"]
        yield name, tpl["metadata"].get("labels", {}), tpl["spec"]
    elif kind == "CronJob":
        tpl = obj["spec"]["jobTemplate"]["spec"]["template"]
        yield name, tpl["metadata"].get("labels", {}), tpl["spec"]
    elif kind == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        yield f"{name}/head", cluster["headGroupSpec"]["template"]["metadata"]["labels"], \
            cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            yield f"{name}/{group['groupName']}", group["template"]["metadata"]["labels"], group["template"]["spec"]
    elif kind == "InferenceService":
        predictor = obj["spec"]["predictor"]
        yield f"{name}/predictor", predictor.get("labels", {}), {**predictor, "containers": [predictor["model"]]}


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def admits(policy: dict, pod_labels: dict, port: int, peer_labels: dict | None, peer_ns: str) -> bool:
    """Does one NetworkPolicy let a peer (pod labels, namespace) reach this pod on this port?"""
    selector = policy["spec"]["podSelector"]
    if not all(pod_labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] in ("In", "NotIn"), f"admits() reads In and NotIn only, not {expression}"
        if (pod_labels.get(expression["key"]) in expression["values"]) != (expression["operator"] == "In"):
            return False
    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
            if ns and ns.get("kubernetes.io/metadata.name") != peer_ns:
                continue
            if not ns and peer_ns != NAMESPACE:
                continue
            want = peer.get("podSelector", {}).get("matchLabels", {})
            if peer_labels is not None and all(peer_labels.get(k) == v for k, v in want.items()):
                return True
    return False
