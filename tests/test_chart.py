"""The Helm chart, proven offline: the real helm binary renders it, the Kubernetes and CRD schemas
validate every object, Ray Serve validates serveConfigV2, and checkov scans the result.

Scenarios are values files in tests/chart_values/ (one per toggle), the profile for a real cluster
(charts/courier/values-cluster.yaml), plus the defaults (tests/chart_support.py). What the operators
enforce at run time is in tests/test_chart_contract.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_support import (
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    admits,
    containers,
    env_of,
    find,
    kinds,
    only,
    pod_specs,
    render_scenario,
    scenario_files,
)
from test_monitoring_chart import prometheus_rule_errors

from charts.checks.render import CHART, ROOT

# The chart's kubeVersion floor and the kubectl we ship.
KUBERNETES_VERSIONS = ["1.30.0", "1.35.0"]
CRD_FILES = {"RayService": ("ray.io_rayservices.yaml", "v1"),
             "InferenceService": ("serving.kserve.io_inferenceservices.yaml", "v1beta1")}

def _tool(name: str) -> str:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "tools.sh"), name], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, f"scripts/tools.sh {name} failed:\n{out.stderr}"
    return out.stdout.strip().splitlines()[-1]


def _helm(helm_bin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_bin, *args], capture_output=True, text=True, cwd=ROOT, check=False)


# --- 1. helm lint, and every scenario renders -----------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm, scenario):
    """helm lint --strict passes for the defaults and for every toggle."""
    args = ["lint", "--strict", str(CHART)]
    for path in scenario_files(scenario):
        args += ["-f", path]
    out = _helm(helm, *args)
    assert out.returncode == 0, out.stdout + out.stderr


# --- 2. schemas: Kubernetes, the real CRDs, Ray Serve ------------------------------------------

def _strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it: unknown fields are refused, not silently pruned."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="session")
def crd_validators() -> dict[str, jsonschema.Draft4Validator]:
    """RayService and InferenceService validators from ../shared/crds (or $COURIER_CRDS_DIR)."""
    crds_dir = Path(os.environ.get("COURIER_CRDS_DIR", "../shared/crds"))
    crds_dir = crds_dir if crds_dir.is_absolute() else ROOT / crds_dir
    validators = {}
    for kind, (file, version) in CRD_FILES.items():
        path = crds_dir / file
        assert path.exists(), f"{path} is missing: set COURIER_CRDS_DIR, or run `make crds` and use .tools/crds"
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        validators[kind] = jsonschema.Draft4Validator(_strict(spec["schema"]["openAPIV3Schema"]))
    return validators


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_matches_its_schema(render, crd_validators, scenario):
    """Core objects pass kubernetes-validate (strict) on 1.30 and 1.35; custom resources their CRD."""
    for obj in render(scenario):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CRD_FILES:
            errors = [f"{list(e.absolute_path)}: {e.message[:200]}"
                      for e in crd_validators[obj["kind"]].iter_errors(obj)]
            assert not errors, f"{where} violates its CRD: {errors[:5]}"
            continue
        if obj["kind"] == "PrometheusRule":  # prometheus-operator's CRD, not in ../shared/crds
            errors = prometheus_rule_errors(obj)
            assert not errors, f"{where} violates the PrometheusRule CRD: {errors[:5]}"
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is invalid on Kubernetes {version}: {exc}")


def test_crd_validation_refuses_unknown_fields(render, crd_validators):
    """The CRD check is not a rubber stamp: a misspelt field in the RayService fails it."""
    rayservice = only(render(), "RayService")
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert list(crd_validators["RayService"].iter_errors(rayservice))


def _serve_config(objects: list[dict]) -> dict:
    return yaml.safe_load(only(objects, "RayService")["spec"]["serveConfigV2"])


def _repository_config_with_cluster_settings() -> dict:
    """serving/serve_config.yaml plus exactly the changes the chart is meant to make."""
    from serving.config import load_serve_config, with_overrides

    config = load_serve_config()
    file_args = config["applications"][0]["args"]
    args = {"online_store": "redis",  # and API keys on, their digests from the chart's Secret (templates/auth.yaml)
            "auth": {**file_args.get("auth", {}), "enabled": True, "keys_env": "COURIER_API_KEYS",
                     "rate_per_s": 50, "burst": 100}}
    if "artifacts" in file_args:
        args["artifacts"] = "/data/artifacts"
    if "data_dir" in file_args:
        args["data_dir"] = "/data"
    return with_overrides(config, host="0.0.0.0", args=args)


def test_serve_config_is_the_repository_file(render):
    """The chart reads serving/serve_config.yaml through a symlink; serveConfigV2 equals it after the
    cluster settings (host 0.0.0.0, the artifacts and the data on the volume, Redis), and Ray Serve accepts it."""
    from serving.app import AppArgs
    from serving.config import validate

    link = CHART / "files" / "serve_config.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "serving" / "serve_config.yaml").resolve()
    rendered = _serve_config(render())
    assert rendered == _repository_config_with_cluster_settings()
    validate(rendered)
    for app in rendered["applications"]:
        AppArgs.model_validate(app["args"])


def test_serve_overrides_take_precedence(render):
    """Precedence: serve.args and serve.deployments > the chart's cluster settings > the file."""
    rendered = _serve_config(render("defaults", 'serve.args={"max_body_bytes": 131072, "artifacts": "/models"}',
                                    'serve.deployments={"EtaModel": {"autoscaling_config": {"max_replicas": 8}}}'))
    expected = _repository_config_with_cluster_settings()
    app = expected["applications"][0]
    app["args"].update(max_body_bytes=131072, artifacts="/models")
    eta = next(d for d in app["deployments"] if d["name"] == "EtaModel")
    eta["autoscaling_config"]["max_replicas"] = 8  # deep merge: the other autoscaling keys stay
    assert rendered == expected
    from serving.config import validate
    validate(rendered)


def test_unknown_deployment_override_fails(render_error):
    """A misspelt deployment name fails the render, naming the known deployments."""
    error = render_error("defaults", 'serve.deployments={"EtaModle": {"max_ongoing_requests": 4}}')
    assert "EtaModle" in error and "EtaModel" in error


def test_packaged_chart_carries_the_serve_config(helm, tmp_path):
    """helm package follows the symlinks, so a packaged (or pushed) chart has the real files."""
    out = _helm(helm, "package", str(CHART), "-d", str(tmp_path))
    assert out.returncode == 0, out.stderr
    with tarfile.open(next(tmp_path.glob("courier-*.tgz"))) as tgz:
        for name in ("serve_config.yaml", "ray_env.yaml"):
            member = tgz.extractfile(f"courier/files/{name}")
            assert member.read() == (ROOT / "serving" / name).read_bytes()


# --- 3. toggles add and remove what they should -------------------------------------------------

def test_defaults_deploy_the_platform(render):
    """Defaults: RayService, Redis, the registry's PostgreSQL, volume, Feast bootstrap + materialize, training
    and retraining, the live city and the monitor, policies, helm test."""
    objects = render()
    assert only(objects, "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    only(objects, "StatefulSet", "redis")
    only(objects, "StatefulSet", "registry")
    only(objects, "CronJob", "retrain")
    assert sorted(o["metadata"]["name"] for o in find(objects, "Secret")) == [
        "courier-api-keys", "courier-redis", "courier-registry"]  # API keys and Redis's password: on by default
    only(objects, "PersistentVolumeClaim", "data")
    only(objects, "Job", "feast-bootstrap")
    only(objects, "CronJob", "feast-materialize")
    only(objects, "Job", "train")
    assert len(find(objects, "NetworkPolicy")) == 3
    only(objects, "PodDisruptionBudget", "serving")
    assert only(objects, "Pod", "helm-test")["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert sorted(o["metadata"]["name"] for o in find(objects, "Deployment")) == ["courier-city", "courier-monitor"]
    for absent in ("InferenceService", "Ingress", "Role", "ValidatingAdmissionPolicy", "PrometheusRule"):
        assert not find(objects, absent), f"{absent} should be off by default"
    assert not find(objects, "Job", "locust-master") and not find(objects, "Job", "chaos")


def test_minimal_turns_every_optional_object_off(render):
    """With every toggle off only the RayService, Redis, volume and service account remain, and the Secrets of
    the API keys and Redis's password (security stays on: auth.enabled and redis.auth.enabled are not toggles
    of optional objects)."""
    assert kinds(render("minimal")) == ["PersistentVolumeClaim", "RayService", "Secret", "Secret", "Service",
                                        "ServiceAccount", "StatefulSet"]
    head = only(render("minimal"), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "initContainers" not in head and head["automountServiceAccountToken"] is False


@pytest.mark.parametrize(("toggle", "kind", "component"), [
    ("feast.bootstrap.enabled=false", "Job", "feast-bootstrap"),
    ("feast.materialize.enabled=false", "CronJob", "feast-materialize"),
    ("train.enabled=false", "Job", "train"),
    ("retrain.enabled=false", "CronJob", "retrain"),
    ("networkPolicy.enabled=false", "NetworkPolicy", None),
    ("podDisruptionBudget.enabled=false", "PodDisruptionBudget", None),
    ("tests.enabled=false", "Pod", "helm-test"),
    ("city.enabled=false", "Deployment", "city"),
    ("monitor.enabled=false", "Deployment", "monitor"),
    ("redis.persistence.enabled=false", "PersistentVolumeClaim", "redis"),
    ('storage.existingClaim="mine"', "PersistentVolumeClaim", "data"),
])
def test_each_default_object_has_its_own_off_switch(render, toggle, kind, component):
    """Each optional object on by default goes away with its own toggle, and nothing else does."""
    def present(objects):
        if kind == "PersistentVolumeClaim" and component == "redis":  # the StatefulSet's claim template
            return bool(only(objects, "StatefulSet", "redis")["spec"].get("volumeClaimTemplates"))
        return bool(find(objects, kind, component))
    assert present(render()) and not present(render("defaults", toggle))
    def key(o):  # Job names carry a spec hash, so compare by kind and component
        return o["kind"], o["metadata"].get("labels", {}).get("app.kubernetes.io/component", o["metadata"]["name"])
    kept = {key(o) for o in render("defaults", toggle)}
    for obj in render():
        if key(obj) not in kept:  # only the toggled object (and its parts) went
            assert obj["kind"] == kind or key(obj)[1] == component, key(obj)


def test_autoscaling_toggle(render):
    """ray.autoscaling.enabled=false: no autoscaler sidecar, and the head mounts no token."""
    cluster = only(render("defaults", "ray.autoscaling.enabled=false"), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_kserve_toggle(render):
    """kserve.enabled adds an InferenceService for the ONNX model over the Open Inference Protocol,
    its NetworkPolicy, and the Triton layout step in the training job."""
    objects = render("kserve")
    isvc = only(objects, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-tritonserver"
    assert model["storageUri"] == "pvc://courier-data/artifacts/triton"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert find(objects, "NetworkPolicy", "kserve")
    script = only(objects, "Job", "train")["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert "triton/eta/1/model.onnx" in script
    assert 'Registry().resolve("eta", "champion").path' in script and "current" not in script
    default_script = only(render(), "Job", "train")["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert "triton" not in default_script


def test_loadtest_toggle(render):
    """loadtest.enabled adds a headless Locust master Job, N worker pods and the master Service
    (engine=openloop: one open-loop runner Job instead)."""
    openloop = render("loadtest-openloop")
    assert not find(openloop, "Job", "locust-master") and find(openloop, "Job", "loadtest-openloop")
    objects = render("loadtest")
    assert not find(objects, "Job", "loadtest-openloop")
    master = only(objects, "Job", "locust-master")
    args = master["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--headless" in args and args[args.index("--expect-workers") + 1] == "3"
    assert master["spec"]["backoffLimit"] == 0
    workers = only(objects, "Job", "locust-worker")
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] == 3
    assert only(objects, "Service", "locust-master")["spec"]["ports"][0]["port"] == 5557
    assert env_of(master["spec"]["template"]["spec"]["containers"][0])["COURIER_URL"] == \
        "http://courier-serve-svc.courier.svc:8000"


def test_feature_server_toggle(render):
    """feast.featureServer.enabled adds the Deployment, its Service and a PodDisruptionBudget."""
    objects = render("feature-server")
    assert only(objects, "Deployment", "feature-server")["spec"]["replicas"] == 2
    only(objects, "Service", "feature-server")
    only(objects, "PodDisruptionBudget", "feature-server")


def test_ingress_toggle(render):
    """serve.ingress.enabled routes the host to the serve Service on port 8000."""
    ingress = only(render("ingress"), "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "courier-serve-svc", "port": {"number": 8000}}
    assert ingress["spec"]["rules"][0]["host"] == "eta.example.com"


def test_gcs_fault_tolerance_has_a_redis_of_its_own(render):
    """GCS fault tolerance stores into a Redis of its own, never Feast's (the chaos drill's store outage
    stops Feast's); ray.gcsFaultTolerance.redisAddress replaces it; KubeRay picks the key namespace."""
    objects = render("gcs-fault-tolerance")
    options = only(objects, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    gcs_redis = only(objects, "StatefulSet", "gcs-redis")
    assert options["redisAddress"] == f"{gcs_redis['metadata']['name']}:6379" == "courier-gcs-redis:6379"
    assert "externalStorageNamespace" not in options  # each RayCluster's UID: upgrades never share state
    assert gcs_redis["spec"]["volumeClaimTemplates"], "GCS state must survive a Redis restart"
    feast_store = env_of(only(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                         ["containers"][0])["COURIER_REDIS"]
    outage_target = _loadtest_config(render("chaos-store-outage", "ray.gcsFaultTolerance.enabled=true"),
                                     "chaos")["chaos"]["kubernetes"]["redis"]["name"]
    assert feast_store.split(":")[0] == outage_target == "courier-redis" != gcs_redis["metadata"]["name"]
    objects = render("gcs-fault-tolerance", 'ray.gcsFaultTolerance.redisAddress="gcs.example:6379"')
    assert only(objects, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == \
        "gcs.example:6379"
    assert not find(objects, "StatefulSet", "gcs-redis")
    assert "gcsFaultToleranceOptions" not in only(render(), "RayService")["spec"]["rayClusterConfig"]
    assert not find(render(), "StatefulSet", "gcs-redis")


def test_redis_auth_puts_the_password_in_the_connection_string(render):
    """redis.auth.enabled: a Secret, both Redis require it, and COURIER_REDIS carries it (defined after
    COURIER_REDIS_PASSWORD, so Kubernetes expands it). Not REDIS_PASSWORD: KubeRay refuses that name on
    the head with GCS fault tolerance, which gets the password through gcsFaultToleranceOptions."""
    objects = render("redis-auth")
    only(objects, "Secret", "redis")
    for component in ("redis", "gcs-redis"):
        redis = only(objects, "StatefulSet", component)["spec"]["template"]["spec"]["containers"][0]
        assert "--requirepass" in redis["args"][0] and "--protected-mode no" not in redis["args"][0]
    for obj in find(objects, "Job", "train") + find(objects, "RayService"):
        for _, _, spec in pod_specs(obj):
            names = [e["name"] for e in spec["containers"][0]["env"]]
            assert "REDIS_PASSWORD" not in names
            assert names.index("COURIER_REDIS_PASSWORD") < names.index("COURIER_REDIS")
            assert env_of(spec["containers"][0])["COURIER_REDIS"] == \
                "courier-redis:6379,password=$(COURIER_REDIS_PASSWORD)"
    options = only(objects, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "courier-redis"


def _secret_ref(container: dict, name: str) -> dict | None:
    entry = next((e for e in container.get("env", []) if e["name"] == name), None)
    return entry and entry["valueFrom"]["secretKeyRef"]


@pytest.mark.parametrize("scenario", ["defaults", "everything", "cluster-profile", "loadtest"])
def test_api_keys_are_on_by_default_and_every_client_carries_its_own(render, scenario):
    """auth.enabled by default: a Secret with one random key per client and the server's list of their digests
    (never the keys) that serveConfigV2 tells the Ingress to read from COURIER_API_KEYS; the city gets the public
    key, the load tests, the chaos drill and the helm test the internal one (they call /v2)."""
    import base64
    import hashlib

    from serving.auth import AuthArgs, load_keys

    objects = render(scenario)
    secret = only(objects, "Secret", "auth")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    listed = json.loads(data["api-keys.json"])
    keys = load_keys(AuthArgs(enabled=True), {"COURIER_API_KEYS": data["api-keys.json"]})
    assert {(k.name, tuple(k.scopes)) for k in keys} == {("public", ("public",)), ("internal", ("public", "internal"))}
    for key in keys:
        raw = data[f"{key.name}-key"]
        assert len(raw) >= 40 and key.sha256 == hashlib.sha256(raw.encode()).hexdigest()
        assert raw not in data["api-keys.json"]
    assert next(k for k in listed if k["name"] == "internal")["rate_per_s"] == 0  # load tests are not throttled
    assert _serve_config(objects)["applications"][0]["args"]["auth"] == {
        "enabled": True, "keys_file": None, "keys_env": "COURIER_API_KEYS", "rate_per_s": 50, "burst": 100}
    wanted = {"city": "public-key", "locust-master": "internal-key", "locust-worker": "internal-key",
              "loadtest": "internal-key", "chaos": "internal-key", "smoke-test": "internal-key"}
    seen = set()
    for obj in objects:
        for where, _, spec in pod_specs(obj):
            for container in spec["containers"]:
                if obj["kind"] == "RayService":
                    assert _secret_ref(container, "COURIER_API_KEYS") == {"name": "courier-api-keys",
                                                                         "key": "api-keys.json"}, where
                    assert _secret_ref(container, "COURIER_API_KEY") is None  # the server holds no key
                elif container.get("name") in wanted:
                    seen.add(container["name"])
                    assert _secret_ref(container, "COURIER_API_KEY") == {"name": "courier-api-keys",
                                                                        "key": wanted[container["name"]]}, where
                else:
                    assert _secret_ref(container, "COURIER_API_KEY") is None, where
    assert "city" in seen and (scenario != "everything" or {"chaos", "smoke-test", "loadtest"} <= seen)
    assert scenario != "loadtest" or {"locust-master", "locust-worker"} <= seen


def test_api_keys_off_or_from_an_existing_secret(render, render_error):
    """auth.enabled=false: no Secret, no key anywhere, the Ingress admits everyone; auth.existingSecret: the
    chart creates none and every reference names the given one; a chart client without its key fails the render."""
    objects = render("everything", "auth.enabled=false")
    assert not find(objects, "Secret", "auth")
    assert _serve_config(objects)["applications"][0]["args"]["auth"]["enabled"] is False
    names = {e["name"] for obj in objects for _, _, spec in pod_specs(obj) for c in containers(spec)
             for e in c.get("env", [])}
    assert not names & {"COURIER_API_KEY", "COURIER_API_KEYS"}
    objects = render("everything", 'auth.existingSecret="my-keys"')
    assert not find(objects, "Secret", "auth")
    refs = {_secret_ref(c, name)["name"] for obj in objects for _, _, spec in pod_specs(obj) for c in spec["containers"]
            for name in ("COURIER_API_KEY", "COURIER_API_KEYS") if _secret_ref(c, name)}
    assert refs == {"my-keys"}
    error = render_error("everything", "auth.clients.internal=null")
    assert "auth.clients.internal" in error
    assert "scopes" in render_error("defaults", 'auth.clients={"public": {"scopes": ["admin"]}}')


@pytest.mark.parametrize("scenario", ["defaults", "everything", "cluster-profile"])
def test_redis_has_a_password_by_default_and_every_client_carries_it(render, scenario):
    """On by default: Redis requires the Secret's password, and every container told where Redis is (serving,
    Feast's jobs and feature server, training, the city, the monitor, the load tests) gets it in COURIER_REDIS."""
    objects = render(scenario)
    secret = only(objects, "Secret", "redis")
    assert secret["data"]["redis-password"]
    redis = only(objects, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert '--requirepass "$COURIER_REDIS_PASSWORD"' in redis["args"][0]
    clients = set()
    for obj in objects:
        for where, _, spec in pod_specs(obj):
            for container in containers(spec):
                env = env_of(container)
                if "COURIER_REDIS" in env:
                    clients.add(container["name"])
                    assert env["COURIER_REDIS"] == "courier-redis:6379,password=$(COURIER_REDIS_PASSWORD)", where
                    password = next(e for e in container["env"] if e["name"] == "COURIER_REDIS_PASSWORD")
                    assert password["valueFrom"]["secretKeyRef"] == {"name": "courier-redis", "key": "redis-password"}
    assert {"ray-head", "ray-worker", "city", "monitor", "materialize", "apply", "train", "retrain"} <= clients


def test_external_redis_replaces_the_statefulset(render, render_error):
    """redis.enabled=false uses redis.externalAddress everywhere, and refuses to render without it."""
    objects = render("external-redis")
    assert not find(objects, "StatefulSet", "redis") and not find(objects, "StatefulSet", "gcs-redis")
    head = only(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert env_of(head["containers"][0])["COURIER_REDIS"] == "redis.shared.svc:6380,password=$(COURIER_REDIS_PASSWORD)"
    assert not find(objects, "Secret", "redis")  # the given Secret, not one of the chart's
    head = only(render("external-redis", "redis.auth.enabled=false"), "RayService")["spec"]["rayClusterConfig"][
        "headGroupSpec"]["template"]["spec"]
    assert env_of(head["containers"][0])["COURIER_REDIS"] == "redis.shared.svc:6380"
    assert "redis.externalAddress" in render_error("defaults", "redis.enabled=false", "redis.auth.enabled=false")
    assert "redis.auth.existingSecret" in render_error("defaults", "redis.enabled=false",
                                                       'redis.externalAddress="r:6379"')


def test_existing_claim_takes_precedence(render):
    """storage.existingClaim: no PVC is created and every pod and KServe use the given claim."""
    objects = render("existing-claim")
    assert not find(objects, "PersistentVolumeClaim")
    claims = {v["persistentVolumeClaim"]["claimName"] for obj in objects for _, _, spec in pod_specs(obj)
              for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    assert claims == {"courier-nfs"}
    storage_uri = only(objects, "InferenceService")["spec"]["predictor"]["model"]["storageUri"]
    assert storage_uri.startswith("pvc://courier-nfs/")


def test_image_reference_precedence(render):
    """Image: digest > tag > the chart's appVersion."""
    def serving_image(*sets):
        return only(render("defaults", *sets), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"][
            "template"]["spec"]["containers"][0]["image"]
    assert serving_image() == "courier-serving:0.1.0"
    assert serving_image('images.serving.tag="dev"') == "courier-serving:dev"
    digest = "sha256:" + "a" * 64
    assert serving_image('images.serving.tag="dev"', f'images.serving.digest="{digest}"') == f"courier-serving@{digest}"


def test_ray_settings_precedence(render):
    """ray.*.rayStartParams override the chart's start parameters; every Ray container gets the Ray
    settings that run locally (serving/ray_env.yaml), each replaceable by a serve.env entry."""
    from serving.config import load_ray_env

    shipped = load_ray_env(root="/app")  # Courier's own files (e.g. the HAProxy wrapper) are under /app in the images
    assert shipped, "serving/ray_env.yaml ships no settings"
    assert shipped["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/app/serving/haproxy_admission.py"
    objects = render("defaults", 'ray.worker.rayStartParams={"object-store-memory": "1000000000"}',
                     'serve.env=[{"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "0"}, {"name": "EXTRA", "value": "x"}]')
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"][0]["rayStartParams"] == {"metrics-export-port": "8080",
                                                                "object-store-memory": "1000000000"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for _, _, spec in pod_specs(only(objects, "RayService")):
        names = [e["name"] for e in spec["containers"][0]["env"]]
        assert len(names) == len(set(names)), f"an env var is set twice: {names}"
        env = env_of(spec["containers"][0])
        assert {k: env[k] for k in shipped} == {**shipped, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
        assert env["EXTRA"] == "x"
    for _, _, spec in pod_specs(only(render("defaults"), "RayService")):
        env = env_of(spec["containers"][0])
        assert {k: env.get(k) for k in shipped} == shipped  # the same settings as `make serve`


def test_worker_replica_bounds_are_checked(render_error):
    """ray.worker needs minReplicas <= replicas <= maxReplicas."""
    assert "minReplicas <= replicas <= maxReplicas" in render_error("defaults", "ray.worker.replicas=5")


def test_values_schema_refuses_typos_and_insecure_settings(render_error):
    """values.schema.json: a misspelt key or a root pod is refused before anything renders."""
    assert "maxReplica" in render_error("defaults", "ray.worker.maxReplica=3")
    assert "runAsNonRoot" in render_error("defaults", "podSecurityContext.runAsNonRoot=false")


def test_job_names_follow_their_spec(render):
    """Jobs are immutable: a changed spec gets a new name (a new run), an unchanged one keeps it."""
    def train_name(*sets):
        return only(render("defaults", *sets), "Job", "train")["metadata"]["name"]
    assert train_name() == train_name("loadtest.enabled=true")
    assert train_name() != train_name('train.extraArgs=["--epochs", "3"]')


# --- 4. secure and resilient by default ---------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_meet_the_restricted_profile(render, scenario):
    """Every pod, custom resources included: non-root, seccomp RuntimeDefault, no privilege escalation,
    all capabilities dropped, read-only root, requests and limits, probes on long-running containers,
    and a service-account token only for the chaos drill and the Ray autoscaler."""
    for obj in render(scenario):
        long_running = obj["kind"] in {"Deployment", "StatefulSet", "RayService", "InferenceService"}
        autoscaler = obj.get("spec", {}).get("rayClusterConfig", {}).get("autoscalerOptions")
        if autoscaler:  # the sidecar KubeRay adds to the head pod
            assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
            assert autoscaler["securityContext"]["readOnlyRootFilesystem"] is True
            assert set(autoscaler["resources"]) == {"requests", "limits"}
        for where, labels, spec in pod_specs(obj):
            pod_sc = spec["securityContext"]
            assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert not spec.get("hostNetwork") and not spec.get("hostPID"), where
            assert not any("hostPath" in v for v in spec.get("volumes", [])), where
            token = spec.get("automountServiceAccountToken")
            if labels.get("app.kubernetes.io/component") == "chaos" or (
                    where.endswith("/head") and obj["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]):
                assert token is True, where
            else:
                assert token is False, where
            for c in containers(spec):
                sc, res = c["securityContext"], c["resources"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
                assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, where
                assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), where
            if long_running:
                for c in spec["containers"]:
                    assert "livenessProbe" in c and "readinessProbe" in c, f"{where}/{c['name']}"


def test_ray_ports_stay_inside_the_cluster(render):
    """No Service is NodePort or LoadBalancer, and the Ray head keeps KubeRay's ClusterIP service."""
    for scenario in SCENARIOS:
        for obj in render(scenario):
            if obj["kind"] == "Service":
                assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
            if obj["kind"] == "RayService":
                head = obj["spec"]["rayClusterConfig"]["headGroupSpec"]
                assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")


def test_network_policies_expose_only_the_serving_port(render):
    """From outside the release only Ray Serve's 8000 (and KServe's 8080) answer. Inside it, the Ray pods talk to
    each other on every port, but the release's other pods (the city, jobs, load tests: code that is not the
    Ray cluster) reach them on the serve and metrics ports only: the dashboard (job submission, no auth), the
    GCS, the Ray client and the agent answer the KubeRay operator (dashboard, agent) and pods labelled as operator
    tooling. Every other pod of the release takes the release's traffic (Redis has a password)."""
    objects = render("everything", "networkPolicy.metricsFrom=[]")
    policies = find(objects, "NetworkPolicy")
    stranger, operator = {"app": "other"}, {"app.kubernetes.io/name": "kuberay-operator"}
    tooling = {"courier.io/ray-operator-tooling": "true"}
    pods = [(where, labels) for obj in objects for where, labels, _ in pod_specs(obj)]
    ray = {where for obj in objects if obj["kind"] == "RayService" for where, _, _ in pod_specs(obj)}
    assert len(ray) == 2 and len(pods) > 8

    def reachable(labels, port, peer, ns=NAMESPACE):
        return any(admits(p, labels, port, peer, ns) for p in policies)
    for where, labels in pods:
        for port in (6379, 8265, 10001, 52365, 8080, 8000, 5557, 6566, 5432):
            for peer_where, peer in pods:
                expected = where not in ray or peer_where in ray or port in (8000, 8080)
                assert reachable(labels, port, peer) == expected, f"{peer_where} -> {where}:{port}"
            open_to_all = (port == 8000 and labels.get("app.kubernetes.io/component") == "serving") or (
                port == 8080 and labels.get("app.kubernetes.io/component") == "kserve")
            assert reachable(labels, port, stranger) == open_to_all, f"{where}:{port}"
            assert reachable(labels, port, stranger, "elsewhere") == open_to_all, f"{where}:{port}"
            assert reachable(labels, port, tooling) == (where in ray and port in (8265, 6379, 10001, 52365, 8000)
                                                        or open_to_all), \
                f"tooling -> {where}:{port}"
            assert not reachable(labels, port, tooling, "elsewhere") or open_to_all, f"{where}:{port}"
        if where in ray:
            for port in (8265, 52365):
                assert reachable(labels, port, operator, "ray-system"), f"{where}:{port} closed to KubeRay"
            for port in (6379, 10001):
                assert not reachable(labels, port, operator, "ray-system"), f"{where}:{port} open to KubeRay"


def test_disruption_budget_covers_ray_workers_not_the_head(render):
    """The PDB lets a drain take one Ray worker at a time and never blocks on the single head."""
    objects = render()
    selector = only(objects, "PodDisruptionBudget", "serving")["spec"]["selector"]["matchLabels"]
    pods = {where: labels for where, labels, _ in pod_specs(only(objects, "RayService"))}
    assert all(pods["courier/cpu"].get(k) == v for k, v in selector.items())
    assert not all(pods["courier/head"].get(k) == v for k, v in selector.items())


def test_chaos_rbac_and_guard(render):
    """The chaos drill: a namespaced Role on pods only (get, list, watch, delete), and an admission
    policy that lets its service account delete only this release's serving pods, because RBAC
    cannot select by label."""
    objects = render("chaos")
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    assert only(objects, "Role")["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                                                "verbs": ["get", "list", "watch", "delete"]}]
    binding = only(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "courier-chaos", "namespace": NAMESPACE}]
    policy = only(objects, "ValidatingAdmissionPolicy")
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["operations"] == ["DELETE"]
    assert "system:serviceaccount:courier:courier-chaos" in policy["spec"]["matchConditions"][0]["expression"]
    required = dict(re.findall(r"labels\['([^']+)'\] == '([^']+)'", policy["spec"]["validations"][0]["expression"]))
    assert required == {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "serving"}
    bound = only(objects, "ValidatingAdmissionPolicyBinding")["spec"]
    assert bound["validationActions"] == ["Deny"] and bound["policyName"] == policy["metadata"]["name"]
    # The guard admits exactly the serving pods: Ray head and workers yes; Redis, jobs, the test no.
    for obj in objects:
        for where, labels, _ in pod_specs(obj):
            deletable = all(labels.get(k) == v for k, v in required.items())
            assert deletable == (obj["kind"] == "RayService"), where
    # ... and the drill's own selectors only ever name pods the guard admits.
    selectors = _loadtest_config(objects, "chaos")["chaos"]["kubernetes"]["selectors"]
    for selector in selectors.values():
        assert dict(pair.split("=") for pair in selector.split(",")).items() >= required.items(), selector
    job = only(objects, "Job", "chaos")["spec"]["template"]["spec"]
    assert job["serviceAccountName"] == "courier-chaos"
    assert job["containers"][0]["command"][-2:] == ["chaos", "--kubernetes"]


def test_chaos_store_outage_toggle(render):
    """chaos.storeOutage keeps the drill's Redis outages and grants scaling that one StatefulSet only."""
    default_faults = _loadtest_config(render("chaos"), "chaos")["chaos"]["kubernetes"]["faults"]
    assert default_faults and not any("store_down_s" in f for f in default_faults)
    objects = render("chaos-store-outage")
    rules = only(objects, "Role")["rules"]
    assert rules[1] == {"apiGroups": ["apps"], "resources": ["statefulsets/scale"],
                        "resourceNames": ["courier-redis"], "verbs": ["get", "patch"]}
    from loadtest.config import load_config
    assert _loadtest_config(objects, "chaos")["chaos"]["kubernetes"]["faults"] == \
        load_config(None)["chaos"]["kubernetes"]["faults"]


def _loadtest_config(objects: list[dict], component: str) -> dict:
    return yaml.safe_load(only(objects, "ConfigMap", component)["data"]["loadtest.yaml"])


def test_loadtest_config_is_the_repository_file(render):
    """The load and chaos Jobs get loadtest/config.yaml (a symlink in the chart) with only the cluster
    changes: the city's data on the volume and the drill's targets scoped to this release."""
    from loadtest.config import load_config

    expected = load_config(None)
    expected["traffic"]["offline_dir"] = "/data/offline"
    workers = "app.kubernetes.io/instance=courier,app.kubernetes.io/component=serving,ray.io/node-type=worker"
    expected["chaos"]["kubernetes"].update(namespace=NAMESPACE, redis={"kind": "statefulset", "name": "courier-redis"},
                                           selectors={"*": workers, "node": workers})
    assert _loadtest_config(render("chaos-store-outage"), "chaos") == expected
    job = only(render("loadtest-openloop"), "Job", "loadtest-openloop")["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["python", "-m", "loadtest", "--config", "/etc/courier/loadtest.yaml", "run", "steady"]
    assert job["args"] == ["--url", "http://courier-serve-svc.courier.svc:8000"]


def test_every_value_is_documented_and_in_the_schema():
    """Every leaf of values.yaml sits under a `# --` comment; every top-level key is in the schema."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    keyed = [(i, len(m.group(1)), m.group(2)) for i, line in enumerate(lines)
             if (m := re.match(r"^(\s*)([A-Za-z][\w.-]*):", line))]
    documented_at: dict[int, bool] = {}  # indent -> documented ancestor at that indent
    for n, (i, indent, key) in enumerate(keyed):
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            j -= 1
        own = any(lines[k].strip().startswith("# --") for k in range(j + 1, i))
        documented_at = {d: v for d, v in documented_at.items() if d < indent}
        documented = own or any(documented_at.values())
        documented_at[indent] = documented
        is_leaf = n + 1 == len(keyed) or keyed[n + 1][1] <= indent
        assert documented or not is_leaf, f"values.yaml line {i + 1}: `{key}` has no `# --` comment"
    schema = json.loads((CHART / "values.schema.json").read_text())
    top = {key for _, indent, key in keyed if indent == 0}
    assert top <= set(schema["properties"]), top - set(schema["properties"])


# --- 5. the security scan, once over every scenario ----------------------------------------------

@pytest.fixture(scope="session")
def checkov_report(helm, tmp_path_factory) -> dict:
    """checkov (own venv via scripts/tools.sh) over the renders of every scenario."""
    out_dir = tmp_path_factory.mktemp("renders")
    for scenario in SCENARIOS:
        stdout, stderr, code = render_scenario(scenario)
        assert code == 0, stderr
        (out_dir / f"{scenario}.yaml").write_text(stdout)
    scan = subprocess.run([_tool("checkov"), "-d", str(out_dir), "--framework", "kubernetes", "--skip-download",
                           "-o", "json"], capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(scan.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_finds_nothing_unexplained(checkov_report):
    """Zero failed checks; every skipped one carries a reason, and values.yaml explains that waiver
    next to the value that causes it."""
    failed = [(c["check_id"], c["resource"]) for c in checkov_report["results"].get("failed_checks", [])]
    assert not failed, failed
    assert checkov_report["summary"]["passed"] > 0
    values_text = (CHART / "values.yaml").read_text()
    for check in checkov_report["results"].get("skipped_checks", []):
        assert check["check_result"].get("suppress_comment"), check["check_id"]
        check_id = check["check_id"]
        assert f"Waiver {check_id}" in values_text or f"and {check_id}" in values_text, check_id


def test_waivers_follow_the_values(render):
    """Pin images by digest, pull Always and run as a high uid, and those waivers disappear: only the
    ones that stay true (the chaos token, the test pod's probes) remain."""
    def waived(objects):
        return {v.split("=")[0] for o in objects for k, v in o["metadata"].get("annotations", {}).items()
                if k.startswith("checkov.io/skip")}
    assert waived(render()) == {"CKV_K8S_15", "CKV_K8S_43", "CKV_K8S_40", "CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_35"}
    assert waived(render("everything", "redis.auth.enabled=false")) == {"CKV_K8S_38", "CKV_K8S_8", "CKV_K8S_9",
                                                                       "CKV_K8S_35"}
    # The registry's URI reaches the training pods through their environment only while it holds a password.
    assert waived(render("everything", "redis.auth.enabled=false", "registry.postgresql.enabled=false",
                         "retrain.enabled=false")) == {"CKV_K8S_38", "CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_35"}
    # ... and the chart's clients of serving get their API key through theirs only while auth is on.
    assert waived(render("everything", "redis.auth.enabled=false", "registry.postgresql.enabled=false",
                         "retrain.enabled=false", "auth.enabled=false")) == {"CKV_K8S_38", "CKV_K8S_8", "CKV_K8S_9"}


# --- 6. images, versions and the helm test -------------------------------------------------------

def test_versions_agree_across_images_chart_and_pyproject():
    """Ray: serving.Dockerfile == values ray.version == pyproject; torch: jobs.Dockerfile == Makefile."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[serve\]==([\d.]+)"', pyproject).group(1)
    serving_docker = (ROOT / "images" / "serving.Dockerfile").read_text()
    assert re.search(r"ARG RAY_VERSION=([\d.]+)", serving_docker).group(1) == ray_pin
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-cpu" in serving_docker
    assert yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["version"] == ray_pin
    torch = re.search(r"^TORCH_VERSION := ([\d.]+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert re.search(r"ARG TORCH_VERSION=([\d.]+)", (ROOT / "images" / "jobs.Dockerfile").read_text()).group(1) == torch


def test_job_commands_name_real_entry_points(render):
    """Every `python -m <module>` the chart runs exists in the repository (a renamed module fails here,
    not in a cluster)."""
    modules = set()
    for obj in render("everything") + render("loadtest-openloop"):
        for _, _, spec in pod_specs(obj):
            for c in containers(spec):
                words = " ".join(c.get("command", []) + c.get("args", [])).split()
                modules |= {words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m" and words[i - 1].endswith("python")}
    assert {"models.simulator", "feature_repo.store", "models.eta.train", "models.retrain", "loadtest"} <= modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"


def test_locust_jobs_point_at_the_locustfile(render):
    """The Locust Jobs run loadtest/locustfile.py, which must exist in the repository."""
    command = only(render("loadtest"), "Job", "locust-master")["spec"]["template"]["spec"]["containers"][0]["command"]
    locustfile = ROOT / command[command.index("--locustfile") + 1]
    assert locustfile.is_file(), f"{locustfile.relative_to(ROOT)} is missing: loadtest.engine=locust cannot run"


def test_image_requirements_follow_pyproject():
    """images/requirements.py lists pyproject's dependencies minus the excluded ones."""
    spec = importlib.util.spec_from_file_location("image_requirements", ROOT / "images" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    deps = module.runtime_requirements(ROOT / "pyproject.toml", {"torch"})
    assert "ray[serve]==" in " ".join(deps) and not any(module.requirement_name(d) == "torch" for d in deps)
    assert module.requirement_name("feast[redis,duckdb]==0.67.0") == "feast"


class _FakeCourier(BaseHTTPRequestHandler):
    """Just enough of the serving API for the smoke test; `broken` answers /v1/eta with a 500."""
    broken = False

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v2/health/ready":
            return self._send(200, {"ready": True})
        return self._send(200, {"name": "eta", "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 3]},
                                                          {"name": "area", "datatype": "INT64", "shape": [-1]}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/eta":
            return self._send(500, {"error": "boom"}) if self.broken else self._send(200, {"eta_minutes": 31.5})
        assert [len(t["data"]) for t in body["inputs"]] == [3, 1]
        return self._send(200, {"outputs": [{"name": "eta_minutes", "data": [30.0]}]})

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("broken", [False, True])
def test_helm_test_script_checks_real_answers(render, broken):
    """The helm test hook runs files/smoke_test.py, which passes against a serving API and fails
    (naming the endpoint) when one answers wrong."""
    pod = only(render(), "Pod", "helm-test")
    assert pod["spec"]["containers"][0]["command"] == ["python", "/smoke/smoke_test.py"]
    handler = type("Handler", (_FakeCourier,), {"broken": broken})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "COURIER_URL": f"http://127.0.0.1:{server.server_port}", "COURIER_READY_TIMEOUT_S": "5"}
        run = subprocess.run([sys.executable, str(CHART / "files" / "smoke_test.py")], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    finally:
        server.shutdown()
    if broken:
        assert run.returncode != 0 and "FAIL POST /v1/eta" in run.stderr
    else:
        assert run.returncode == 0 and "PASS" in run.stdout, run.stdout + run.stderr
