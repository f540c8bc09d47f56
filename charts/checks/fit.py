"""Do the chart's pods fit the cluster? The scheduler's arithmetic, done offline.

Kubernetes places a pod only where its requests fit what the node has left, and a pod's request is
the larger of its biggest init container and the sum of its containers. The chart's pods do not all
run at once, so the check is made per phase:

* install: every long-running pod (Ray head and workers, Redis, the registry's PostgreSQL, KServe, the
  feature server) plus the Jobs on the critical path (Feast bootstrap, training). The Ray head waits for the models in an
  init container while holding its requests, so if these do not fit together the training Job
  stays Pending and the head waits for it until the Job's deadline: a deadlock, not a slow start.
* after install: the long-running pods plus everything that runs later (the materialize and retrain
  CronJobs, load tests, the chaos drill, the helm test pod).
* upgrade: with the RayService's NewCluster upgrade strategy (KubeRay's default) a change to the Ray
  pods builds a second Ray cluster beside the first before traffic moves, so both must fit.

It also checks Ray's own arithmetic: KubeRay gives each worker `ray start --num-cpus` = its CPU
limit rounded up (common/pod.go generateRayStartCommand), and every Serve replica must find its
`num_cpus` there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CLUSTERS_FILE = Path(__file__).with_name("clusters.yaml")
SETUP_JOBS = {"feast-bootstrap", "train"}  # the Jobs the Ray head waits for
# KubeRay's autoscaler sidecar when autoscalerOptions.resources is unset (common/pod.go).
DEFAULT_AUTOSCALER = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}
LONG_RUNNING = {"Deployment", "StatefulSet", "RayService", "InferenceService"}

_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def millicores(quantity: str | float | None) -> int:
    """A CPU quantity ("500m", "2", 0.5) in millicores."""
    if quantity is None:
        return 0
    text = str(quantity)
    return int(text[:-1]) if text.endswith("m") else round(float(text) * 1000)


def mebibytes(quantity: str | float | None) -> float:
    """A memory quantity ("768Mi", "2Gi", "512M") in MiB."""
    if quantity is None:
        return 0.0
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return float(match.group(1)) * _UNITS[match.group(2)] / 2**20


@dataclass(frozen=True)
class PodRequest:
    """One pod as the scheduler sees it: its requests, and the group it must spread over nodes with."""

    name: str
    cpu_m: int
    memory_mi: float
    spread: str | None = None


def _container_requests(container: dict) -> tuple[int, float]:
    requests = (container.get("resources") or {}).get("requests") or {}
    return millicores(requests.get("cpu")), mebibytes(requests.get("memory"))


def pod_request(name: str, spec: dict, extra: list[dict] = (), spread: str | None = None) -> PodRequest:
    """max(largest init container, sum of containers): what the scheduler reserves for the pod."""
    containers = [_container_requests(c) for c in list(spec.get("containers") or []) + list(extra)]
    inits = [_container_requests(c) for c in spec.get("initContainers") or []]
    cpu = max([sum(c for c, _ in containers)] + [c for c, _ in inits])
    memory = max([sum(m for _, m in containers)] + [m for _, m in inits])
    return PodRequest(name, cpu, memory, spread)


def ray_pods(rayservice: dict) -> list[PodRequest]:
    """The head (with KubeRay's autoscaler sidecar) and each worker group at its starting replicas."""
    cluster, name = rayservice["spec"]["rayClusterConfig"], rayservice["metadata"]["name"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    sidecar = []
    if cluster.get("enableInTreeAutoscaling"):
        sidecar = [{"resources": (cluster.get("autoscalerOptions") or {}).get("resources") or DEFAULT_AUTOSCALER}]
    pods = [pod_request(f"{name} head", head, sidecar)]
    for group in cluster.get("workerGroupSpecs") or []:
        spec = group["template"]["spec"]
        spread = f"{name}/{group['groupName']}" if spec.get("topologySpreadConstraints") else None
        replicas = min(max(group.get("replicas", 0), group.get("minReplicas", 0)), group.get("maxReplicas", 2**31))
        pods += [pod_request(f"{name} worker {group['groupName']} #{i + 1}", spec, spread=spread)
                 for i in range(replicas)]
    return pods


def _component(obj: dict) -> str:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component", obj["metadata"]["name"])


def pods_of(obj: dict) -> list[PodRequest]:
    """Every pod an object creates (its replicas, a Job's parallelism, one run of a CronJob)."""
    kind, name = obj["kind"], f"{obj['kind']}/{_component(obj)}"
    spec = obj.get("spec", {})
    if kind == "RayService":
        return ray_pods(obj)
    if kind in {"Deployment", "StatefulSet"}:
        return [pod_request(f"{name} #{i + 1}", spec["template"]["spec"]) for i in range(spec.get("replicas", 1))]
    if kind == "Job":
        return [pod_request(f"{name} #{i + 1}", spec["template"]["spec"]) for i in range(spec.get("parallelism", 1))]
    if kind == "CronJob":
        return [pod_request(name, spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "Pod":
        return [pod_request(name, spec)]
    if kind == "InferenceService":
        predictor = spec["predictor"]
        pod = {**predictor, "containers": [predictor["model"]]}
        return [pod_request(f"{name} predictor #{i + 1}", pod) for i in range(predictor.get("minReplicas", 1))]
    return []


def phases(objects: list[dict]) -> dict[str, list[PodRequest]]:
    """The pods that run at once in each phase (see the module docstring)."""
    long_running = [p for o in objects if o["kind"] in LONG_RUNNING for p in pods_of(o)]
    setup = [p for o in objects if o["kind"] == "Job" and _component(o) in SETUP_JOBS for p in pods_of(o)]
    later = [p for o in objects if o["kind"] in {"Job", "CronJob", "Pod"} and _component(o) not in SETUP_JOBS
             for p in pods_of(o)]
    result = {"install": long_running + setup, "after install": long_running + later}
    for rayservice in (o for o in objects if o["kind"] == "RayService"):
        strategy = (rayservice["spec"].get("upgradeStrategy") or {}).get("type", "NewCluster")
        if strategy != "None":
            # The new cluster's workers carry the same labels, so one spread constraint covers both clusters.
            second = [PodRequest(p.name.replace(" ", " (new cluster) ", 1), p.cpu_m, p.memory_mi, p.spread)
                      for p in ray_pods(rayservice)]
            result["upgrade"] = long_running + second
    return result


@dataclass
class Node:
    """A node's allocatable and what has been placed on it."""

    name: str
    cpu_m: int
    memory_mi: float
    placed: list[PodRequest] = field(default_factory=list)

    @property
    def free(self) -> tuple[int, float]:
        return (self.cpu_m - sum(p.cpu_m for p in self.placed),
                self.memory_mi - sum(p.memory_mi for p in self.placed))

    def fits(self, pod: PodRequest) -> bool:
        cpu, memory = self.free
        return pod.cpu_m <= cpu and pod.memory_mi <= memory + 1e-6


@dataclass(frozen=True)
class Cluster:
    """A documented minimum cluster: its nodes and what runs there before Courier."""

    name: str
    description: str
    values: tuple[str, ...]
    nodes: tuple[tuple[str, int, float], ...]
    system: tuple[PodRequest, ...]
    per_node: tuple[PodRequest, ...] = ()


def load_clusters(path: Path = CLUSTERS_FILE) -> dict[str, Cluster]:
    """The clusters of charts/checks/clusters.yaml, by name."""
    raw = yaml.safe_load(path.read_text())

    def items(entries):
        return tuple(PodRequest(e["name"], millicores(e.get("cpu")), mebibytes(e.get("memory"))) for e in entries or [])
    return {name: Cluster(name, c["description"], tuple(c.get("values") or []),
                          tuple((n["name"], millicores(n["cpu"]), mebibytes(n["memory"])) for n in c["nodes"]),
                          items(c.get("system")), items(c.get("per_node")))
            for name, c in raw.items()}


@dataclass
class Placement:
    """Where each pod went (first fit, largest first, spread groups kept apart), and what did not fit."""

    cluster: Cluster
    phase: str
    nodes: list[Node]
    unplaced: list[PodRequest]

    @property
    def fits(self) -> bool:
        return not self.unplaced

    def report(self) -> str:
        """The arithmetic, one line per pod, then per node: requested against allocatable."""
        lines = [f"{self.cluster.name} ({self.cluster.description}), phase '{self.phase}':"]
        for node in self.nodes:
            lines.append(f"  node {node.name}: allocatable {node.cpu_m}m CPU, {node.memory_mi:.0f}Mi")
            for pod in node.placed:
                lines.append(f"    {pod.cpu_m:>6}m {pod.memory_mi:>7.0f}Mi  {pod.name}")
            used_cpu, used_mem = node.cpu_m - node.free[0], node.memory_mi - node.free[1]
            lines.append(f"    {used_cpu:>6}m {used_mem:>7.0f}Mi  requested "
                         f"({used_cpu / node.cpu_m:.0%} CPU, {used_mem / node.memory_mi:.0%} memory); "
                         f"left {node.free[0]}m, {node.free[1]:.0f}Mi")
        for pod in self.unplaced:
            lines.append(f"  DOES NOT FIT: {pod.name} ({pod.cpu_m}m, {pod.memory_mi:.0f}Mi)")
        return "\n".join(lines)


def place(cluster: Cluster, pods: list[PodRequest], phase: str = "install") -> Placement:
    """Place the system pods, then Courier's, as a scheduler would (first fit decreasing)."""
    nodes = [Node(name, cpu, memory, placed=list(cluster.per_node)) for name, cpu, memory in cluster.nodes]
    unplaced = []
    ordered = list(cluster.system) + sorted(pods, key=lambda p: (p.memory_mi, p.cpu_m), reverse=True)
    for pod in ordered:
        candidates = [n for n in nodes if n.fits(pod)]
        if pod.spread:  # topologySpreadConstraints over hostnames: the node with fewest of the group first
            candidates.sort(key=lambda n: sum(p.spread == pod.spread for p in n.placed))
        if candidates:
            candidates[0].placed.append(pod)
        else:
            unplaced.append(pod)
    return Placement(cluster, phase, nodes, unplaced)


def ray_cpu_slots(rayservice: dict, serve_config: dict) -> tuple[float, float, float]:
    """(CPUs the serve config's replicas need at min_replicas, at max_replicas, CPUs Ray advertises on
    the workers at minReplicas), the last as KubeRay derives it: the CPU limit rounded up."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    advertised = 0.0
    for group in cluster.get("workerGroupSpecs") or []:
        params = group.get("rayStartParams") or {}
        container = group["template"]["spec"]["containers"][0]
        resources = container.get("resources") or {}
        cpu = params.get("num-cpus") or (resources.get("limits") or {}).get("cpu") or (resources.get("requests") or {}).get("cpu")
        advertised += math.ceil(millicores(cpu) / 1000) * group.get("minReplicas", 0)
    low = high = 0.0
    for app in serve_config["applications"]:
        for deployment in app.get("deployments") or []:
            cpus = (deployment.get("ray_actor_options") or {}).get("num_cpus", 1)
            scaling = deployment.get("autoscaling_config") or {}
            count = deployment.get("num_replicas", 1)
            low += cpus * scaling.get("min_replicas", count if isinstance(count, int) else 1)
            high += cpus * scaling.get("max_replicas", count if isinstance(count, int) else 1)
    return low, high, advertised


def check(objects: list[dict], cluster: Cluster) -> list[Placement]:
    """Every phase placed on the cluster."""
    return [place(cluster, pods, phase) for phase, pods in phases(objects).items()]


def find_kind(objects: list[dict], kind: str) -> list[dict[str, Any]]:
    """The rendered objects of one kind."""
    return [o for o in objects if o["kind"] == kind]
