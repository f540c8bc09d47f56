"""What the KubeRay operator refuses in a RayService, checked on the rendered chart.

The CRD schema accepts a RayService that the operator then rejects at run time: its controller
validates the spec (ray-operator/controllers/ray/utils/validation.go) and, on failure, leaves the
RayService `Ready=False` with reason `ValidationFailed` and never creates a RayCluster. These
rules mirror that file for every field the Courier chart renders; each names the Go function it
mirrors and returns KubeRay's own message, so a failure here reads as the cluster would report it.

Pinned with the CRDs (../shared/crds, ray-project/kuberay feeaf72f) and the operator that
`make operators` installs (KubeRay 1.7.1): the validation.go of that era is the one with
`validateWorkerGroupPriority` and `validateGcsFaultToleranceBackend`. Rules on fields the chart
never renders (RayJob, RayCronJob, authOptions, tlsOptions, networkPolicy, historyServerOptions,
the rocksdb GCS backend, worker-group priority and suspend) are left out on purpose; re-read the
file when the pin moves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

KUBERAY_COMMIT = "feeaf72facab4881ba2b179248bb67315634e229"
VALIDATION_GO = "ray-operator/controllers/ray/utils/validation.go"

MAX_RAYCLUSTER_NAME = 53  # utils/constant.go: 63 - len("-serve-svc")
MAX_RAYSERVICE_NAME = MAX_RAYCLUSTER_NAME - 6  # GenerateRayClusterName appends "-" + 5 random characters
UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Rule:
    """One check of validation.go: `check(rayservice)` yields KubeRay's error messages."""

    name: str
    source: str  # the Go function (in validation.go unless a path is given) it mirrors
    check: Callable[[dict[str, Any]], Iterator[str]]


# -- reading a RayService the way the Go types see it -------------------------------------------

def _cluster(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]


def _head(rs: dict) -> dict:
    return _cluster(rs)["headGroupSpec"]


def _workers(rs: dict) -> list[dict]:
    return _cluster(rs).get("workerGroupSpecs") or []


def _ray_container(group: dict) -> dict:
    """KubeRay's RayContainerIndex is 0: the first container is the Ray one."""
    return (group["template"]["spec"].get("containers") or [{}])[0]


def _env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def _autoscaling(rs: dict) -> bool:
    return bool(_cluster(rs).get("enableInTreeAutoscaling"))


def _autoscaler_v2(rs: dict) -> bool:
    """IsAutoscalingV2Enabled (utils/util.go): only the explicit autoscalerOptions.version counts."""
    return (_cluster(rs).get("autoscalerOptions") or {}).get("version") == "v2"


def _v2_env_on(rs: dict) -> bool:
    return _env(_ray_container(_head(rs))).get("RAY_enable_autoscaler_v2") in ("1", "true")


# -- the rules ---------------------------------------------------------------------------------

def _name(rs: dict) -> Iterator[str]:
    name = rs["metadata"]["name"]
    if len(name) > MAX_RAYSERVICE_NAME:
        yield f"The RayService metadata is invalid: RayService name should be no more than {MAX_RAYSERVICE_NAME} characters"
    if not DNS1035.match(name):
        yield f"The RayService metadata is invalid: RayService name should be a valid DNS1035 label: {name!r}"


def _containers(rs: dict) -> Iterator[str]:
    if not _head(rs)["template"]["spec"].get("containers"):
        yield "headGroupSpec should have at least one container"
    for group in _workers(rs):
        if not group["template"]["spec"].get("containers"):
            yield "workerGroupSpec should have at least one container"


def _groups(rs: dict) -> Iterator[tuple[str, dict]]:
    yield "Head", _head(rs)
    for group in _workers(rs):
        yield group["groupName"], group


def _group_resources(rs: dict) -> Iterator[str]:
    for name, group in _groups(rs):
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            yield (f"resource fields should not be set in both rayStartParams and Resources for {name} group; "
                   "please use only one")


def _group_labels(rs: dict) -> Iterator[str]:
    for name, group in _groups(rs):
        if "labels" in (group.get("rayStartParams") or {}):
            yield (f"rayStartParams['labels'] is not supported for {name} group; "
                   "please use the top-level Labels field instead")
        for key, value in (group.get("labels") or {}).items():
            if not QUALIFIED_NAME.match(key):
                yield f"invalid label key for {name} group: '{key}'"
            if len(value) > 63 or not LABEL_VALUE.match(value):
                yield f"invalid label value for key '{key}' in {name} group: '{value}'"


def _replica_bounds(rs: dict) -> Iterator[str]:
    for group in _workers(rs):
        name, low, high = group["groupName"], group.get("minReplicas"), group.get("maxReplicas")
        if not _autoscaling(rs) and (low is None or high is None):
            yield f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
        if low is not None and low < 0:
            yield f"worker group {name} has negative minReplicas {low}"
        if high is not None and high < 0:
            yield f"worker group {name} has negative maxReplicas {high}"
        if low is not None and high is not None and low > high:
            yield f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"


def _idle_timeout(rs: dict) -> Iterator[str]:
    for group in _workers(rs):
        timeout = group.get("idleTimeoutSeconds")
        if timeout is None:
            continue
        if timeout < 0:
            yield f"worker group {group['groupName']}: idleTimeoutSeconds must be non-negative, got {timeout}"
        elif not (_autoscaler_v2(rs) or _v2_env_on(rs)):
            yield (f"worker group {group['groupName']}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled. "
                   "Please set .spec.autoscalerOptions.version to 'v2'")


def _gcs_fault_tolerance(rs: dict) -> Iterator[str]:
    cluster, head = _cluster(rs), _head(rs)
    env = _env(_ray_container(head))
    annotations = rs["metadata"].get("annotations") or {}
    options = cluster.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and options is not None:
        yield ("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set. "
               "Please use only GcsFaultToleranceOptions to configure GCS fault tolerance")
    ft_on = options is not None or annotations.get("ray.io/ft-enabled") == "true"
    if not ft_on and "RAY_REDIS_ADDRESS" in env:
        yield ("RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions "
               "is not set. Please set GcsFaultToleranceOptions to enable GCS fault tolerance")
    if options is None:
        return
    if (head.get("rayStartParams") or {}).get("redis-password"):
        yield ("cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled - "
               "use GcsFaultToleranceOptions.RedisPassword instead")
    if "REDIS_PASSWORD" in env:
        yield ("cannot set `REDIS_PASSWORD` env var in head Pod when GcsFaultToleranceOptions is enabled - "
               "use GcsFaultToleranceOptions.RedisPassword instead")
    if "RAY_REDIS_ADDRESS" in env:
        yield ("cannot set `RAY_REDIS_ADDRESS` env var in head Pod when GcsFaultToleranceOptions is enabled - "
               "use GcsFaultToleranceOptions.RedisAddress instead")
    if annotations.get("ray.io/external-storage-namespace"):
        yield ("cannot set `ray.io/external-storage-namespace` annotation when GcsFaultToleranceOptions is enabled - "
               "use GcsFaultToleranceOptions.ExternalStorageNamespace instead")
    if options.get("backend", "redis") == "redis" and options.get("storage") is not None:
        yield "cannot set GcsFaultToleranceOptions.Storage when backend is 'redis' - it only applies to the 'rocksdb' backend"


def _redis_username(rs: dict) -> Iterator[str]:
    head = _head(rs)
    if (head.get("rayStartParams") or {}).get("redis-username") or "REDIS_USERNAME" in _env(_ray_container(head)):
        yield ("cannot set redis username in rayStartParams or environment variables - "
               "use GcsFaultToleranceOptions.RedisUsername instead")


def _autoscaler(rs: dict) -> Iterator[str]:
    cluster, env = _cluster(rs), _env(_ray_container(_head(rs)))
    options = cluster.get("autoscalerOptions") or {}
    if not _autoscaling(rs) and _v2_env_on(rs):
        yield (f"environment variable RAY_enable_autoscaler_v2 cannot be set to '{env['RAY_enable_autoscaler_v2']}' "
               "when enableInTreeAutoscaling is false. Please set enableInTreeAutoscaling: true to use autoscaler v2")
    if _autoscaling(rs):
        if options.get("version") is not None and "RAY_enable_autoscaler_v2" in env:
            yield ("both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set, "
                   "please only use the former")
        if _autoscaler_v2(rs):
            if _head(rs)["template"]["spec"].get("restartPolicy", "Never") != "Never":
                yield "restartPolicy for head Pod should be Never or unset when using autoscaler V2"
            for group in _workers(rs):
                if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                    yield f"restartPolicy for worker group {group['groupName']} should be Never or unset when using autoscaler V2"
    if options.get("idleTimeoutSeconds", 0) < 0:
        yield f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {options['idleTimeoutSeconds']}"
    if any(e["name"] == "KUBERAY_GEN_AUTOSCALER_START_CMD" for e in options.get("env") or []):
        yield ("autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD: it is managed by KubeRay "
               "and injected automatically into the autoscaler container")


def _rayservice_spec(rs: dict) -> Iterator[str]:
    spec = rs["spec"]
    if ((_head(rs).get("headService") or {}).get("metadata") or {}).get("name"):
        yield ("The RayService spec is invalid: spec.rayClusterConfig.headGroupSpec.headService.metadata.name "
               "should not be set")
    strategy = spec.get("upgradeStrategy")
    if strategy is not None:
        kind = strategy.get("type")
        if kind is None:  # IsIncrementalUpgradeEnabled dereferences Type without a nil check (utils/util.go)
            yield "The RayService spec is invalid: upgradeStrategy is set without a type (the operator dereferences it)"
        elif kind not in UPGRADE_TYPES:
            yield (f"The RayService spec is invalid: Spec.UpgradeStrategy.Type value {kind} is invalid, "
                   f"valid options are {', '.join(UPGRADE_TYPES[:2])}, or {UPGRADE_TYPES[2]}")
        elif kind == "NewClusterWithIncrementalUpgrade":
            yield from _incremental_upgrade(rs, strategy.get("clusterUpgradeOptions"))
    delay = spec.get("rayClusterDeletionDelaySeconds")
    if delay is not None and delay < 0:
        yield f"The RayService spec is invalid: Spec.RayClusterDeletionDelaySeconds should be a non-negative integer, got {delay}"


def _incremental_upgrade(rs: dict, options: dict | None) -> Iterator[str]:
    """ValidateClusterUpgradeOptions."""
    if not _autoscaling(rs):
        yield "Ray Autoscaler is required for NewClusterWithIncrementalUpgrade"
    if options is None:
        yield "ClusterUpgradeOptions are required for NewClusterWithIncrementalUpgrade"
        return
    surge, step, interval = options.get("maxSurgePercent", 100), options.get("stepSizePercent"), options.get("intervalSeconds")
    if not 0 <= surge <= 100:
        yield "maxSurgePercent must be between 0 and 100"
    if step is None or not 0 <= step <= 100:
        yield "stepSizePercent must be between 0 and 100"
    elif step > surge:
        yield "stepSizePercent must be less than or equal to maxSurgePercent"
    if interval is None or interval <= 0:
        yield "intervalSeconds must be greater than 0"
    if not options.get("gatewayClassName"):
        yield "gatewayClassName is required for NewClusterWithIncrementalUpgrade"


RULES: tuple[Rule, ...] = (
    Rule("rayservice-name", "ValidateRayServiceMetadata", _name),
    Rule("groups-have-containers", "ValidateRayClusterSpec", _containers),
    Rule("group-resources-once", "validateRayGroupResources", _group_resources),
    Rule("group-labels", "validateRayGroupLabels", _group_labels),
    Rule("worker-replica-bounds", "ValidateRayClusterSpec (minReplicas/maxReplicas)", _replica_bounds),
    Rule("idle-timeout-needs-autoscaler-v2", "validateWorkerGroupIdleTimeout", _idle_timeout),
    Rule("gcs-fault-tolerance-options", "ValidateRayClusterSpec (GcsFaultToleranceOptions)", _gcs_fault_tolerance),
    Rule("no-redis-username", "ValidateRayClusterSpec (redis-username)", _redis_username),
    Rule("autoscaler-options", "ValidateRayClusterSpec (autoscaler v2, autoscalerOptions)", _autoscaler),
    Rule("rayservice-spec", "ValidateRayServiceSpec, ValidateClusterUpgradeOptions", _rayservice_spec),
)


def violations(rayservice: dict[str, Any], rules: tuple[Rule, ...] = RULES) -> list[tuple[Rule, str]]:
    """Every (rule, KubeRay's message) the RayService breaks; empty when the operator would accept it."""
    return [(rule, message) for rule in rules for message in rule.check(rayservice)]
