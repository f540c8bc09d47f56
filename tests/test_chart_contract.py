"""What the operators and the scheduler enforce at run time, proven on the rendered chart.

The CRD schemas (test_chart.py) accept manifests that the KubeRay operator then refuses, that KServe
serves with another runtime than intended, or that the scheduler cannot place. charts/checks mirrors
those rules from the pinned sources; here they run on every values scenario, each rule is shown to
refuse the shape it exists for (the old chart's findings among them), and the documented minimum
clusters are shown to hold every phase of an install.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from chart_support import SCENARIOS, admits, find, only, rendered_objects

from charts.checks import fit, kserve, kuberay, rollout
from charts.checks.render import ROOT

# --- KubeRay: validation.go on every scenario ---------------------------------------------------


@pytest.mark.parametrize("rule", kuberay.RULES, ids=lambda r: r.name)
def test_kuberay_accepts_the_rayservice_of_every_scenario(render, rule):
    """No scenario (defaults, each toggle, the cluster profile) breaks this rule of KubeRay's validation.go."""
    for scenario in SCENARIOS:
        for rayservice in find(render(scenario), "RayService"):
            broken = list(rule.check(rayservice))
            assert not broken, f"{scenario}: KubeRay ({rule.source}) would refuse the RayService: {broken}"


def _head(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]["headGroupSpec"]


def _worker(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _head_env(rs: dict, name: str, value: str) -> None:
    _head(rs)["template"]["spec"]["containers"][0]["env"].append({"name": name, "value": value})


# (rule, scenario, what to break, KubeRay's message): the first two are the old chart's findings 1 and 2.
REFUSALS: list[tuple[str, str, Callable[[dict], None], str]] = [
    ("idle-timeout-needs-autoscaler-v2", "defaults",
     lambda rs: rs["spec"]["rayClusterConfig"]["autoscalerOptions"].pop("version"),
     "idleTimeoutSeconds is set, but autoscaler v2 is not enabled"),
    ("gcs-fault-tolerance-options", "redis-auth", lambda rs: _head_env(rs, "REDIS_PASSWORD", "x"),
     "cannot set `REDIS_PASSWORD` env var in head Pod when GcsFaultToleranceOptions is enabled"),
    ("gcs-fault-tolerance-options", "gcs-fault-tolerance",
     lambda rs: rs["metadata"].setdefault("annotations", {}).update({"ray.io/external-storage-namespace": "x"}),
     "cannot set `ray.io/external-storage-namespace` annotation"),
    ("gcs-fault-tolerance-options", "defaults", lambda rs: _head_env(rs, "RAY_REDIS_ADDRESS", "redis:6379"),
     "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance"),
    ("rayservice-name", "defaults", lambda rs: rs["metadata"].update(name="c" * 48), "no more than 47 characters"),
    ("groups-have-containers", "defaults", lambda rs: _worker(rs)["template"]["spec"].update(containers=[]),
     "workerGroupSpec should have at least one container"),
    ("group-resources-once", "defaults", lambda rs: _head(rs).update(resources={"CPU": "1"}),
     "resource fields should not be set in both rayStartParams and Resources for Head group"),
    ("group-labels", "defaults", lambda rs: _worker(rs)["rayStartParams"].update(labels="zone=a"),
     "rayStartParams['labels'] is not supported"),
    ("worker-replica-bounds", "minimal", lambda rs: _worker(rs).pop("maxReplicas"),
     "must set both minReplicas and maxReplicas when autoscaling is disabled"),
    ("worker-replica-bounds", "defaults", lambda rs: _worker(rs).update(minReplicas=4),
     "has minReplicas 4 greater than maxReplicas 3"),
    ("no-redis-username", "defaults", lambda rs: _head_env(rs, "REDIS_USERNAME", "ray"),
     "cannot set redis username"),
    ("autoscaler-options", "defaults", lambda rs: _head_env(rs, "RAY_enable_autoscaler_v2", "true"),
     "both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set"),
    ("autoscaler-options", "defaults", lambda rs: _head(rs)["template"]["spec"].update(restartPolicy="Always"),
     "restartPolicy for head Pod should be Never or unset when using autoscaler V2"),
    ("rayservice-spec", "defaults", lambda rs: rs["spec"].update(upgradeStrategy={}), "without a type"),
    ("rayservice-spec", "defaults", lambda rs: rs["spec"].update(upgradeStrategy={"type": "BlueGreen"}),
     "Spec.UpgradeStrategy.Type value BlueGreen is invalid"),
]


@pytest.mark.parametrize(("rule", "scenario", "breaking", "message"), REFUSALS,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(REFUSALS)])
def test_each_rule_refuses_what_kuberay_refuses(render, rule, scenario, breaking, message):
    """Break the rendered RayService the way the rule is about: the check names KubeRay's own message."""
    rayservice = copy.deepcopy(only(render(scenario), "RayService"))
    assert not kuberay.violations(rayservice)
    breaking(rayservice)
    found = [text for r, text in kuberay.violations(rayservice) if r.name == rule]
    assert any(message in text for text in found), f"{rule} did not say {message!r}; it said {found}"


def test_every_rule_is_shown_to_refuse_something():
    """No rule in charts/checks/kuberay.py is a rubber stamp."""
    assert {rule for rule, *_ in REFUSALS} == {rule.name for rule in kuberay.RULES}


# --- KubeRay: what its controller does with the pods --------------------------------------------


def test_worker_readiness_checks_the_serve_proxy(render):
    """KubeRay keeps a probe the template defines and then injects none (common/pod.go
    initLivenessAndReadinessProbe): the workers' own readiness must check the Serve proxy, as KubeRay's
    would, or a worker whose proxy is down stays in the serve Service."""
    for scenario in SCENARIOS:
        for rayservice in find(render(scenario), "RayService"):
            for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
                probe = group["template"]["spec"]["containers"][0]["readinessProbe"]
                assert probe["httpGet"] == {"path": "/-/healthz", "port": 8000}, scenario


def test_the_head_takes_no_client_traffic_and_the_operator_reaches_it_when_it_does(render):
    """By default the head (no replicas) is out of the serve Service (excludeHeadPodFromServeSvc), so a head
    restart drops no client connection. With it in, the operator checks GET head:8000/-/healthz on every
    reconcile (rayservice_controller.go updateHeadPodServeLabel): the NetworkPolicy must let it, even when
    networkPolicy.servingFrom narrows port 8000 to one client."""
    assert only(render(), "RayService")["spec"]["excludeHeadPodFromServeSvc"] is True
    objects = render("defaults", "ray.head.serveTraffic=true",
                     'networkPolicy.servingFrom=[{"podSelector": {"matchLabels": {"app": "gateway"}}}]')
    rayservice = only(objects, "RayService")
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is False
    head_labels = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    policies = find(objects, "NetworkPolicy")
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    assert any(admits(p, head_labels, 8000, operator, "ray-system") for p in policies)
    assert any(admits(p, head_labels, 8000, {"app": "gateway"}, "courier") for p in policies)
    assert not any(admits(p, head_labels, 8000, {"app": "other"}, "courier") for p in policies)


def test_upgrade_strategy_is_always_explicit(render):
    """Always a type (the operator dereferences it); None where a second Ray cluster does not fit (kind,
    minikube: the fit below), NewCluster in the cluster profile, whose upgrade phase is fitted too."""
    assert only(render(), "RayService")["spec"]["upgradeStrategy"] == {"type": "None"}
    assert only(render("cluster-profile"), "RayService")["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    for scenario in SCENARIOS:
        for rayservice in find(render(scenario), "RayService"):
            assert rayservice["spec"]["upgradeStrategy"]["type"] in kuberay.UPGRADE_TYPES


def _script(container: dict) -> str:
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0]


def _run_waiting(script: str, data_dir: Path, env: dict[str, str], timeout_s: float = 1.5):
    """Run a wait script with /data moved to data_dir: (exit code or None if still waiting, its output)."""
    proc = subprocess.Popen(["/bin/sh", "-c", script.replace("/data/", f"{data_dir}/")],
                            env={"PATH": "/usr/bin:/bin", "WAIT_INTERVAL_S": "0.1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out


def test_the_head_waits_for_every_model_and_the_redis_cleanup_job_for_none(render, tmp_path):
    """The head's init container waits for the champion of each model the serve config serves (ETA, retrieval,
    ranker) and the Feast registry (run for real against a SQLite registry in
    test_chart_rollout.py::test_the_head_wait_resolves_each_version_in_a_real_registry). KubeRay's Redis
    cleanup Job is built from the head pod, init containers included (raycluster_controller.go
    buildRedisCleanupJob): with its node type it must not wait, or an uninstall before training hangs on the
    GCS finalizer."""
    head = only(render("gcs-fault-tolerance"), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    wait = head["template"]["spec"]["initContainers"][0]
    assert wait["env"][0] == {"name": "RAY_NODE_TYPE", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.labels['ray.io/node-type']"}}}
    script = _script(wait)
    assert "eta=champion ranker=champion retrieval=champion" in script and "/data/feast/registry.db" in script
    code, out = _run_waiting(script, tmp_path, {"RAY_NODE_TYPE": "redis-cleanup"})
    assert code == 0 and "nothing to wait for" in out


# --- Ray Serve: the model slots of the serve config -------------------------------------------------


def _eta_slot(config: dict) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == "EtaModel")["user_config"]


def _ingress_eta(config: dict) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")["user_config"]["eta"]


SLOT_REFUSALS: list[tuple[str, Callable[[dict], None], str]] = [
    ("shadow-needs-a-challenger", lambda c: _eta_slot(c).update(shadow=0.1, challenger=None), "need a challenger"),
    ("canary-needs-a-challenger", lambda c: _eta_slot(c).update(canary=0.5, challenger=None), "need a challenger"),
    ("share-above-one", lambda c: _eta_slot(c).update(shadow=1.5, challenger="eta-2"), "a share is a number in [0, 1]"),
    ("share-negative", lambda c: _eta_slot(c).update(canary=-0.1, challenger="eta-2"), "a share is a number in [0, 1]"),
    ("share-not-a-number", lambda c: _eta_slot(c).update(canary="half", challenger="eta-2"), "a share is a number"),
    ("ingress-eta-differs", lambda c: _ingress_eta(c).update(version="eta-other"), "must be the same versions"),
    ("unknown-key", lambda c: _eta_slot(c).update(weight=0.5), "unknown user_config key"),
    ("no-version", lambda c: _eta_slot(c).update(version=""), "no version"),
    ("challenger-is-the-version", lambda c: _eta_slot(c).update(challenger=_eta_slot(c)["version"]), "the version itself"),
]


@pytest.mark.parametrize(("name", "breaking", "message"), SLOT_REFUSALS, ids=[n for n, *_ in SLOT_REFUSALS])
def test_slot_rules_refuse_what_ray_serve_refuses(render, name, breaking, message):
    """Break a model slot of the rendered serve config the way Ray Serve's reconfigure (serving/variants.py)
    would refuse it, or make the Ingress's ETA slot differ from EtaModel's: charts/checks/rollout.py says so."""
    config = yaml.safe_load(only(render(), "RayService")["spec"]["serveConfigV2"])
    assert rollout.slot_violations(config) == []
    breaking(config)
    problems = rollout.slot_violations(config)
    assert any(message in p for p in problems), f"{name}: {problems}"


def test_every_scenario_serves_consistent_slots(render):
    """No scenario renders a slot Ray Serve would refuse or two ETA slots that differ."""
    for scenario in SCENARIOS:
        for rayservice in find(render(scenario), "RayService"):
            assert rollout.slot_violations(yaml.safe_load(rayservice["spec"]["serveConfigV2"])) == [], scenario
        assert list(rollout.registry_violations(render(scenario))) == [], scenario


# --- KServe: the runtime and the model ------------------------------------------------------------


def test_kserve_runs_the_model_on_the_named_runtime(render, render_error):
    """Unnamed, an ONNX model over v2 goes to the highest-priority runtime, kserve-openvino where it is
    installed (predictor_model.go GetSupportingRuntimes); the chart names kserve-tritonserver, which lists
    onnx and v2, and refuses to render with no runtime."""
    isvc = only(render("kserve"), "InferenceService")
    assert kserve.select_runtime(isvc) == "kserve-tritonserver"
    unnamed = copy.deepcopy(isvc)
    del unnamed["spec"]["predictor"]["model"]["runtime"]
    assert kserve.select_runtime(unnamed) == "kserve-openvino"
    assert kserve.select_runtime(unnamed, tuple(r for r in kserve.KSERVE_RUNTIMES if r.name != "kserve-openvino")) \
        == "kserve-tritonserver"
    assert "kserve.runtime" in render_error("kserve", 'kserve.runtime=""')


def test_kserve_starts_triton_once_the_model_exists_and_is_ready_only_with_it(render, tmp_path):
    """Triton loads its repository only at start (model control "none"), and its server readiness is 200
    with no model at all: the predictor waits for the file the training Job writes, and is ready when the
    model is."""
    objects = render("kserve")
    predictor = only(objects, "InferenceService")["spec"]["predictor"]
    assert predictor["model"]["readinessProbe"]["httpGet"]["path"] == "/v2/models/eta/ready"
    script = _script(predictor["initContainers"][0])
    train_script = only(objects, "Job", "train")["spec"]["template"]["spec"]["containers"][0]["command"][2]
    target = "/data/artifacts/triton/eta/1/model.onnx"
    assert f"mv {target}.tmp {target}" in train_script and target in script
    assert _run_waiting(script, tmp_path, {})[0] is None
    model = tmp_path / "artifacts" / "triton" / "eta" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"onnx")
    assert _run_waiting(script, tmp_path, {})[0] == 0
    claim = next(v for v in predictor["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert predictor["model"]["storageUri"] == f"pvc://{claim}/artifacts/triton"


# --- the scheduler: documented minimum clusters ---------------------------------------------------

CLUSTERS = fit.load_clusters()


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_every_phase_fits_the_documented_minimum_cluster(name):
    """The pods that run at once (install: with the Feast bootstrap and training Jobs; after install;
    a NewCluster upgrade where configured) fit the cluster docs/kubernetes.md names, with the Ray
    workers spread over nodes where the profile asks; the arithmetic is in the failure message
    (and printed by `python -m charts.checks`)."""
    cluster = CLUSTERS[name]
    objects = rendered_objects("cluster-profile" if cluster.values else "defaults")
    placements = fit.check(objects, cluster)
    assert {p.phase for p in placements} >= {"install", "after install"}
    for placement in placements:
        assert placement.fits, placement.report()
    if name == "cluster":
        workers = [{p.name for p in n.placed if " worker " in p.name and "new cluster" not in p.name}
                   for n in placements[0].nodes]
        assert sum(1 for w in workers if w) == 2, "the two workers must land on different nodes"


def test_the_old_defaults_did_not_fit_kind(render):
    """The check would have caught finding 4: the former defaults (one 2-CPU/6 GiB worker, a 1-CPU/2 GiB
    head, a 1-CPU/2 GiB training Job) hold the training Job out of a 4-CPU kind node."""
    old = rendered_objects("defaults", 'ray.worker.resources={"requests": {"cpu": "2", "memory": "6Gi"}, '
                                       '"limits": {"cpu": "2", "memory": "6Gi"}}',
                           'ray.head.resources={"requests": {"cpu": "1", "memory": "2Gi"}, '
                           '"limits": {"cpu": "1", "memory": "2Gi"}}',
                           'ray.worker.replicas=1', 'ray.worker.minReplicas=1',
                           'train.resources={"requests": {"cpu": "1", "memory": "2Gi"}, '
                           '"limits": {"cpu": "2", "memory": "4Gi"}}')
    install = fit.place(CLUSTERS["kind"], fit.phases(old)["install"])
    assert not install.fits and any("train" in p.name or "head" in p.name for p in install.unplaced)


def test_the_cluster_profile_needs_a_second_cluster_room_and_kind_does_not(render):
    """NewCluster doubles the Ray pods during an upgrade: kind cannot hold it (hence None there)."""
    upgrade_on_kind = fit.phases(render("defaults", 'ray.upgradeStrategy="NewCluster"'))["upgrade"]
    assert not fit.place(CLUSTERS["kind"], upgrade_on_kind, "upgrade").fits
    assert "upgrade" not in fit.phases(render())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_workers_advertise_the_cpus_the_replicas_ask(render, scenario):
    """KubeRay passes each worker's CPU limit, rounded up, to `ray start --num-cpus`: at minReplicas the
    workers must hold every deployment's min_replicas x num_cpus, or replicas wait for a node forever."""
    for rayservice in find(render(scenario), "RayService"):
        low, _high, advertised = fit.ray_cpu_slots(rayservice, yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
        assert 0 < low <= advertised, f"{scenario}: replicas need {low} CPUs, workers advertise {advertised}"


def test_fit_arithmetic_counts_what_the_scheduler_counts():
    """A pod's request is max(largest init container, sum of containers); quantities parse like Kubernetes'."""
    spec = {"initContainers": [{"resources": {"requests": {"cpu": "2", "memory": "64Mi"}}}],
            "containers": [{"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}},
                           {"resources": {"requests": {"cpu": 0.25, "memory": "512M"}}}]}
    pod = fit.pod_request("p", spec)
    assert pod.cpu_m == 2000 and pod.memory_mi == pytest.approx(1024 + 512e6 / 2**20)
    node = fit.Cluster("one", "", (), (("n", 1000, 1024.0),), ())
    assert not fit.place(node, [fit.PodRequest("big", 1001, 1)]).fits
    assert fit.place(node, [fit.PodRequest("a", 500, 512), fit.PodRequest("b", 500, 512)]).fits


# --- the chaos drill on a cluster -----------------------------------------------------------------

WORKER_BACK_S = 60  # a deleted Ray worker pod: rescheduled, ray start, replicas placed again (budget)


def test_in_cluster_drill_kills_one_worker_at_a_time(render):
    """Every Ray worker holds replicas of every deployment and a proxy; with two, the drill deletes one
    worker pod at a time, the next only once the first is back, and never the head."""
    rayservice = only(render("chaos"), "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] >= 2
    config = yaml.safe_load(only(render("chaos"), "ConfigMap", "chaos")["data"]["loadtest.yaml"])["chaos"]["kubernetes"]
    workers = "app.kubernetes.io/instance=courier,app.kubernetes.io/component=serving,ray.io/node-type=worker"
    assert config["selectors"] == {"*": workers, "node": workers}
    kills = [f["at_s"] for f in config["faults"] if "kill" in f]
    assert kills and all(f["kill"] == "node" for f in config["faults"] if "kill" in f)
    assert all(b - a >= WORKER_BACK_S for a, b in itertools.pairwise(kills))


def test_spreading_workers_over_nodes_needs_a_shared_volume(render, render_error):
    """Every Ray pod mounts the data volume: spreading workers over nodes with a ReadWriteOnce claim would
    leave all but one node's pods unable to mount it, so the render refuses and says what to set."""
    error = render_error("defaults", "ray.worker.spreadOverNodes=true")
    assert "ReadWriteMany" in error and "storage.existingClaim" in error
    worker = only(render("cluster-profile"), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    constraint = worker["template"]["spec"]["topologySpreadConstraints"][0]
    assert constraint["topologyKey"] == "kubernetes.io/hostname" and constraint["whenUnsatisfiable"] == "DoNotSchedule"
    assert only(render("cluster-profile"), "PersistentVolumeClaim", "data")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_scheduled_materialization_waits_for_the_bootstrap(render):
    """The CronJob skips while nothing is applied and otherwise takes the registry lock the bootstrap holds
    (feature_repo.store; the lock itself is tested in test_feature_store.py)."""
    cron = only(render(), "CronJob", "feast-materialize")
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-2:] == ["materialize", "--if-applied"]


def test_checks_command_passes_on_the_shipped_chart():
    """`python -m charts.checks` (what a user runs on their own values) passes for every documented cluster
    and prints the arithmetic; a values file that breaks a rule makes it exit 1 naming the rule."""
    out = subprocess.run([sys.executable, "-m", "charts.checks"], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all checks passed" in out.stdout and "phase 'install'" in out.stdout
    for name in CLUSTERS:
        assert f"{name} (" in out.stdout
    broken = subprocess.run([sys.executable, "-m", "charts.checks", "--cluster", "kind", "--set-json",
                             ('ray.worker.resources={"requests": {"cpu": "3", "memory": "6Gi"}, '
                             '"limits": {"cpu": "3", "memory": "6Gi"}}')],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert broken.returncode == 1 and "does not fit" in broken.stderr


# --- the live city and the monitor on Kubernetes ---------------------------------------------------


def _args_of(deployment: dict) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    return {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}


def test_the_live_city_keeps_every_pushed_view_fresh_while_it_runs(render):
    """On by default, the city pushes each view with a push source every 5 world-minutes (300 / speed wall
    seconds, the simulator's snapshot cadence) into the chart's Redis, inside every such view's TTL:
    the live views never expire while it runs (they used to, 15 minutes after install)."""
    from feast import PushSource

    from feature_repo import definitions
    from models.simulator import SNAPSHOT

    objects = render()
    city = only(objects, "Deployment", "city")
    args = _args_of(city)
    assert args["--online-store"] == "redis" and args["--url"] == "http://courier-serve-svc.courier.svc:8000"
    container = city["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in container["env"]} >= {"COURIER_REDIS", "COURIER_DATA_DIR"}
    cadence_s = SNAPSHOT.total_seconds() / float(args["--speed"])
    pushed = [v for v in vars(definitions).values()
              if type(v).__name__ == "FeatureView" and isinstance(v.stream_source, PushSource)]
    assert {v.name for v in pushed} == {"restaurant_load_15m", "area_congestion_15m"}
    for view in pushed:
        assert cadence_s < view.ttl.total_seconds(), f"{view.name}: pushed every {cadence_s} s, TTL {view.ttl}"
    init = city["spec"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == "wait-for-features"


def test_the_monitor_reads_the_chart_redis_and_writes_the_joined_log_on_the_volume(render):
    """The monitor joins the streams on the chart's Redis (COURIER_REDIS) and appends to /data/offline/logged:
    it mounts the data volume writable; both it and the city are probed on their /metrics."""
    monitor = only(render(), "Deployment", "monitor")
    args = _args_of(monitor)
    assert args["--data-dir"] == "/data" and args["--online-store"] == "redis" and args["--port"] == "9108"
    container = monitor["spec"]["template"]["spec"]["containers"][0]
    assert next(m for m in container["volumeMounts"] if m["name"] == "data").get("readOnly") is not True
    for deployment in (monitor, only(render(), "Deployment", "city")):
        probes = deployment["spec"]["template"]["spec"]["containers"][0]
        assert probes["readinessProbe"]["httpGet"]["path"] == "/metrics" == probes["livenessProbe"]["httpGet"]["path"]
    assert not find(render("defaults", "city.enabled=false", "monitor.enabled=false"), "Deployment")
