"""Model versions, the registry and retraining on Kubernetes, proven on the rendered chart.

`serving.models.<model>` renders into the model slots (`user_config`) of serveConfigV2, one source for
the Ingress's ETA slot and EtaModel's; a version change touches nothing but serveConfigV2, which KubeRay
applies to the running cluster in place (rayservice_controller.go shouldPrepareNewCluster hashes only
rayClusterConfig). The registry's backend (the chart's PostgreSQL, an external URI, or SQLite with one
writer) reaches every pod that trains or serves; the retrain CronJob runs models.retrain like the
training Job. charts/checks/rollout.py refuses the slots Ray Serve would refuse.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chart_support import containers, env_of, find, only, pod_specs

from charts.checks import rollout
from charts.checks.render import ROOT

PINNED = "eta-20261201000000-abcdef"
CHALLENGER = "eta-20261202000000-123456"


def _serve_config(objects: list[dict]) -> dict:
    return yaml.safe_load(only(objects, "RayService")["spec"]["serveConfigV2"])


def _deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


# --- the model slots ------------------------------------------------------------------------------


def test_defaults_serve_the_serve_config_slots(render):
    """With no serving.models set, every slot is the serve config's own (the champion), and passes the checks."""
    from serving.config import load_serve_config

    rendered, shipped = _deployments(_serve_config(render())), _deployments(load_serve_config())
    for name in ("Ingress", "EtaModel", "Ranker", "Retrieval"):
        assert rendered[name]["user_config"] == shipped[name]["user_config"], name
    assert rendered["EtaModel"]["user_config"]["version"] == "champion"
    assert rendered["Ingress"]["user_config"]["eta"] == rendered["EtaModel"]["user_config"]
    assert rollout.slot_violations(_serve_config(render())) == []


def test_model_values_render_into_every_slot_of_the_model(render):
    """serving.models.eta sets EtaModel's slot and the Ingress's eta slot together (one source); ranker and
    retrieval their own; `--set` strings (0.25, a registry number) arrive as numbers and references."""
    objects = render("defaults", f'serving.models.eta.version="{PINNED}"', f'serving.models.eta.challenger="{CHALLENGER}"',
                     'serving.models.eta.shadow="0.25"', 'serving.models.ranker.challenger=7',
                     'serving.models.ranker.canary=0.1', 'serving.models.retrieval.version="retrieval-20261201000000-aa"')
    config = _serve_config(objects)
    deployments = _deployments(config)
    eta = {"version": PINNED, "challenger": CHALLENGER, "shadow": 0.25, "canary": 0}
    assert deployments["EtaModel"]["user_config"] == eta == deployments["Ingress"]["user_config"]["eta"]
    assert deployments["Ranker"]["user_config"] == {"version": "champion", "challenger": "7", "shadow": 0, "canary": 0.1}
    assert deployments["Retrieval"]["user_config"] == {"version": "retrieval-20261201000000-aa"}
    assert rollout.slot_violations(config) == []
    from serving.config import validate
    validate(config)
    variants = pytest.importorskip("serving.variants")
    variants.check_consistent(config)  # the app's own rule agrees


def test_a_version_change_touches_only_the_serve_config(render):
    """`helm upgrade --set serving.models.eta.version=...` changes serveConfigV2 and nothing else: the
    rayClusterConfig KubeRay hashes (utils.GenerateHashWithoutReplicasAndWorkersToDelete, compared in
    shouldPrepareNewCluster) is identical, so no new RayCluster; the config goes to the running cluster
    (checkIfNeedSubmitServeApplications -> updateServeDeployment) and Ray Serve reconfigures the replicas."""
    def comparable(objects):  # the generated registry password differs per render, by design
        return {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] != "Secret"}
    for scenario in ("defaults", "cluster-profile", "everything"):
        before = comparable(render(scenario))
        after = comparable(render(scenario, f'serving.models.eta.version="{PINNED}"'))
        assert before.keys() == after.keys(), scenario
        changed = [key for key in before if before[key] != after[key]]
        assert changed == [("RayService", "courier")], (scenario, changed)
        old, new = before[changed[0]]["spec"], after[changed[0]]["spec"]
        assert old["rayClusterConfig"] == new["rayClusterConfig"], "a version change must not touch the Ray pods"
        assert {k for k in old if old[k] != new[k]} == {"serveConfigV2"}


def test_bad_slots_are_refused_before_anything_deploys(render_error):
    """A share outside [0, 1], shadow or canary without a challenger, a challenger on Retrieval (one version),
    a model slot set through serve.deployments (a second source), and an unknown deployment are refused."""
    assert "shadow" in render_error("defaults", "serving.models.eta.shadow=1.5")
    assert "need a challenger" in render_error("defaults", 'serving.models.ranker.canary="0.2"')
    assert "challenger" in render_error("defaults", 'serving.models.retrieval.challenger="r-2"')
    error = render_error("defaults", 'serve.deployments={"EtaModel": {"user_config": {"version": "3"}}}')
    assert "serving.models" in error
    assert "EtaModle" in render_error("defaults", 'serving.models.eta.deployment="EtaModle"')
    assert "version" in render_error("defaults", 'serving.models.eta.version="eta; rm -rf /"')


def test_the_head_waits_for_the_champion_of_every_served_model(render):
    """The head's init container waits for a champion of each model a slot serves (and the Feast registry),
    whatever version is pinned: the pinned version lives in serveConfigV2 alone."""
    for sets in ((), (f'serving.models.eta.version="{PINNED}"', f'serving.models.eta.challenger="{CHALLENGER}"')):
        head = only(render("defaults", *sets), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
        script = head["template"]["spec"]["initContainers"][0]["args"][0]
        line = next(line for line in script.splitlines() if line.startswith("exec python"))
        assert line.split()[3:7] == ["/data/feast/registry.db", "eta=champion", "ranker=champion", "retrieval=champion"]


# --- the registry ---------------------------------------------------------------------------------


def _trains_or_serves(objects: list[dict]) -> list[tuple[str, dict]]:
    """(where, container) of every container that trains or serves: the training Job, the retrain CronJob,
    every Ray container and the head's wait."""
    found = []
    for obj in objects:
        component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if component not in {"train", "retrain", "serving"} or obj["kind"] == "Service":
            continue
        for where, _, spec in pod_specs(obj):
            for c in containers(spec):
                if c["name"] not in {"prepare", "wait-for-features"}:
                    found.append((f"{where}/{c['name']}", c))
    return found


def test_the_chart_postgresql_is_the_default_registry(render):
    """Defaults: a PostgreSQL StatefulSet (official image, its own volume, the password read from a Secret
    file), and COURIER_REGISTRY pointing at it in every container that trains or serves."""
    objects = render()
    db = only(objects, "StatefulSet", "registry")
    pod = db["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"].startswith("docker.io/library/postgres:")
    env = env_of(container)
    assert env["POSTGRES_PASSWORD_FILE"] == "/etc/courier/registry/postgres-password" and "POSTGRES_PASSWORD" not in env
    assert env["PGDATA"].startswith("/var/lib/postgresql/data/")
    assert db["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    password = next(v for v in pod["volumes"] if v["name"] == "password")["secret"]
    assert password["secretName"] == "courier-registry"
    assert only(objects, "Service", "registry")["spec"]["ports"][0]["port"] == 5432
    assert "postgres-password" in _registry_secret(objects)["data"]
    uri = "postgresql+psycopg2://courier:$(COURIER_REGISTRY_PASSWORD)@courier-registry:5432/courier"
    users = _trains_or_serves(objects)
    assert {w.split("/")[0] for w, _ in users} >= {"courier", only(objects, "Job", "train")["metadata"]["name"],
                                                   "courier-retrain"}
    for where, c in users:
        names = [e["name"] for e in c["env"]]
        assert env_of(c)["COURIER_REGISTRY"] == uri, where
        assert names.index("COURIER_REGISTRY_PASSWORD") < names.index("COURIER_REGISTRY"), where
        assert env_of(c)["COURIER_ARTIFACTS"] == "/data/artifacts", where
    assert list(rollout.registry_violations(objects)) == []


def _registry_secret(objects: list[dict]) -> dict | None:
    """The registry's Secret (the release has others: API keys, Redis's password), or None."""
    found = [o for o in find(objects, "Secret") if o["metadata"]["name"] == "courier-registry"]
    assert len(found) <= 1
    return found[0] if found else None


def test_an_external_registry_comes_from_a_secret(render):
    """registry.uri: no database in the chart, the URI in a Secret of its own and COURIER_REGISTRY read from
    it; registry.existingSecret names yours instead."""
    uri = "postgresql://mlflow:s3cret@db.example:5432/mlflow"
    objects = render("defaults", "registry.postgresql.enabled=false", f'registry.uri="{uri}"')
    assert not find(objects, "StatefulSet", "registry")
    secret = _registry_secret(objects)
    import base64
    assert base64.b64decode(secret["data"]["registry-uri"]).decode() == uri
    for where, c in _trains_or_serves(objects):
        ref = next(e for e in c["env"] if e["name"] == "COURIER_REGISTRY")["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "courier-registry", "key": "registry-uri"}, where
        assert uri not in json.dumps(c)
    mine = render("defaults", "registry.postgresql.enabled=false", 'registry.existingSecret="mlflow"')
    assert _registry_secret(mine) is None
    for where, c in _trains_or_serves(mine):
        assert next(e for e in c["env"] if e["name"] == "COURIER_REGISTRY")["valueFrom"]["secretKeyRef"]["name"] == "mlflow"


def test_sqlite_takes_one_writer(render, render_error):
    """Without PostgreSQL or a URI the registry is SQLite on the shared volume: refused while the training Job
    and the retrain CronJob both write it, accepted with one writer (then read-only in the Ray pods)."""
    error = render_error("defaults", "registry.postgresql.enabled=false")
    assert "one writer" in error and "registry.postgresql.enabled=true" in error and "retrain.enabled=false" in error
    objects = render("defaults", "registry.postgresql.enabled=false", "retrain.enabled=false")
    assert _registry_secret(objects) is None and not find(objects, "StatefulSet", "registry")
    for where, c in _trains_or_serves(objects):
        assert env_of(c)["COURIER_REGISTRY"] == "sqlite:////data/artifacts/registry.db", where
    assert rollout.registry_writers(objects) == {
        "sqlite:////data/artifacts/registry.db": [f"Job/{only(objects, 'Job', 'train')['metadata']['name']}"]}
    assert list(rollout.registry_violations(objects)) == []


def test_the_registry_check_refuses_a_second_sqlite_writer(render):
    """charts/checks/rollout.py sees a second writer the render let through (an older chart, a values trick)."""
    objects = render("defaults", "registry.postgresql.enabled=false", "retrain.enabled=false")
    second = copy.deepcopy(only(objects, "Job", "train"))
    second["metadata"]["name"] = "courier-train-again"
    problems = list(rollout.registry_violations(objects + [second]))
    assert len(problems) == 1 and "2 writers" in problems[0] and "registry.postgresql.enabled=true" in problems[0]


# --- retraining -----------------------------------------------------------------------------------


def test_the_retrain_cronjob_runs_models_retrain_like_the_training_job(render):
    """Daily by default, never two at once, `python -m models.retrain --model all` on the volume and against
    the Redis online store (the gate checks the feature service there), with the training Job's image,
    volumes, env and init containers; a refused candidate is not retried."""
    objects = render()
    cron = only(objects, "CronJob", "retrain")
    assert cron["spec"]["schedule"] == "0 3 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    retrain = pod["containers"][0]
    assert retrain["command"] == ["python", "-m", "models.retrain", "--model", "all", "--data-dir", "/data",
                                  "--artifacts", "/data/artifacts", "--reports", "/data/reports/retrain",
                                  "--online", "redis"]
    train_pod = only(objects, "Job", "train")["spec"]["template"]["spec"]
    train = train_pod["containers"][0]
    assert retrain["image"] == train["image"] and retrain["env"] == train["env"]
    assert retrain["volumeMounts"] == train["volumeMounts"] and pod["volumes"] == train_pod["volumes"]
    assert [c["name"] for c in pod["initContainers"]] == [c["name"] for c in train_pod["initContainers"]]
    custom = only(render("defaults", "retrain.days=14", 'retrain.model="eta"', 'retrain.schedule="0 */6 * * *"',
                         'retrain.extraArgs=["--shuffle-labels"]'), "CronJob", "retrain")
    container = custom["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][3:7] == ["--model", "eta", "--days", "14"] and container["args"] == ["--shuffle-labels"]
    assert custom["spec"]["schedule"] == "0 */6 * * *"


# --- the head's wait, run for real against a SQLite registry ---------------------------------------


def _artifact(root: Path, name: str, version: str) -> Path:
    directory = root / name / version
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"onnx")
    (directory / "manifest.json").write_text(json.dumps({
        "name": name, "version": version, "feature_service": f"{name}_v1", "inputs": [], "outputs": [],
        "training_window": {"start": "2026-11-01T00:00:00", "end": "2026-11-30T00:00:00"}}))
    return directory


def _wait(script: str, data_dir: Path, env: dict[str, str], timeout_s: float = 60) -> tuple[int | None, str]:
    """Run the head's wait with /data moved to data_dir: (exit code, or None while it still waits; output)."""
    proc = subprocess.Popen(["/bin/sh", "-c", script.replace("/data/", f"{data_dir}/")],
                            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "WAIT_INTERVAL_S": "0.2",
                                 "PYTHONPATH": str(ROOT), "HOME": str(data_dir), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        return None, proc.communicate()[0]


def test_the_head_wait_resolves_each_version_in_a_real_registry(render, tmp_path):
    """The wait exits at once for KubeRay's Redis cleanup Job, waits while a version is unregistered (naming
    it), and exits once the registry resolves every version the slots name and the Feast registry exists."""
    from models.registry import Registry

    head = only(render("gcs-fault-tolerance"), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    wait = head["template"]["spec"]["initContainers"][0]
    script = wait["args"][0]
    artifacts = tmp_path / "artifacts"
    env = {"COURIER_ARTIFACTS": str(artifacts), "COURIER_REGISTRY": f"sqlite:///{tmp_path / 'registry.db'}"}
    assert {"COURIER_REGISTRY", "COURIER_ARTIFACTS", "RAY_NODE_TYPE"} <= {e["name"] for e in wait["env"]}

    code, out = _wait(script, tmp_path, {**env, "RAY_NODE_TYPE": "redis-cleanup"}, timeout_s=10)
    assert code == 0 and "nothing to wait for" in out
    registry = Registry(uri=env["COURIER_REGISTRY"], artifacts=artifacts)
    for name in ("eta", "ranker"):
        registry.set_alias(name, "champion", registry.register(_artifact(artifacts, name, f"{name}-1")).number)
    code, out = _wait(script, tmp_path, {**env, "RAY_NODE_TYPE": "head"}, timeout_s=20)
    assert code is None and "retrieval@champion" in out and "feast/registry.db" in out and "eta@" not in out
    registry.set_alias("retrieval", "champion", registry.register(_artifact(artifacts, "retrieval", "retrieval-1")).number)
    (tmp_path / "feast").mkdir()
    (tmp_path / "feast" / "registry.db").write_text("")
    code, out = _wait(script, tmp_path, {**env, "RAY_NODE_TYPE": "head"})
    assert code == 0, out


def test_checks_command_reports_bad_slots(tmp_path):
    """`python -m charts.checks` fails on a values file whose slots Ray Serve would refuse... which the render
    itself already refuses; and it names the aliases left for replicas to resolve."""
    out = subprocess.run([sys.executable, "-m", "charts.checks", "--cluster", "kind"], cwd=ROOT, capture_output=True,
                         text=True, check=False, env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "EtaModel serves 'champion'" in out.stdout
    values = tmp_path / "pinned.yaml"
    values.write_text(yaml.safe_dump({"serving": {"models": {name: {"version": f"{name}-1"}
                                                             for name in ("eta", "ranker", "retrieval")}}}))
    pinned = subprocess.run([sys.executable, "-m", "charts.checks", "--cluster", "kind", "-f", str(values)], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert pinned.returncode == 0 and "serves 'champion'" not in pinned.stdout


# --- a model added to Courier (docs/adding-a-model.md) ----------------------------------------------


def test_an_added_model_renders_its_slot_its_training_and_the_wait(helm, tmp_path):
    """A copy of the chart whose serve config has the doc's prep_time entry, with the doc's chart values (and a
    pinned version): the model's deployment gets its slot in serveConfigV2 (checks and the app's own rules
    agree), the training Job trains it after the three, and the head waits for its champion."""
    import shutil

    from charts.checks.render import CHART, render
    from serving.config import load_serve_config, validate
    from serving.variants import Slot, check_consistent, slot_holders, slots
    from tests.test_adding_a_model import doc_yaml, with_documented_model

    chart = tmp_path / "courier"
    shutil.copytree(CHART, chart, symlinks=False)  # files/*.yaml are links: copied as the files they point at
    config = with_documented_model(load_serve_config())
    (chart / "files" / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    values = tmp_path / "added-model.yaml"
    values.write_text(yaml.safe_dump(doc_yaml("chart values")))
    version = "prep_time-20261201000000-abcdef"
    objects = render((str(values),), (f'serving.models.prep_time.version="{version}"',
                                      'serving.models.prep_time.challenger="challenger"',
                                      'serving.models.prep_time.canary="0.1"'), chart=str(chart))
    serve = _serve_config(objects)
    assert serve["applications"][0]["args"]["extra_models"] == [{"name": "prep_time"}]
    assert _deployments(serve)["prep_time"]["user_config"] == {"version": version, "challenger": "challenger",
                                                               "shadow": 0.0, "canary": 0.1}
    assert rollout.slot_violations(serve) == []
    validate(serve)
    check_consistent(serve)
    assert slots(serve)["prep_time"] == Slot(version=version, challenger="challenger", canary=0.1)
    assert slot_holders(serve)["prep_time"] == [("prep_time", None)]
    script = only(objects, "Job", "train")["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert ("python -m models.prep_time.train --data-dir /data --artifacts /data/artifacts --reports "
            "/data/reports/prep_time") in script
    assert script.index("models.ranker.train") < script.index("models.prep_time.train")
    head = only(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    line = next(line for line in head["template"]["spec"]["initContainers"][0]["args"][0].splitlines()
                if line.startswith("exec python"))
    assert "prep_time=champion" in line.split()
    defaults = only(render(chart=str(CHART)), "Job", "train")["spec"]["template"]["spec"]["containers"][0]
    assert "prep_time" not in defaults["command"][2]  # the shipped chart trains the three built-in models


def test_an_added_model_needs_a_clean_training_entry(render_error):
    """train.extraModels names a module and a model: anything else (a shell word) is refused by the schema."""
    assert "module" in render_error("defaults", 'train.extraModels=[{"name":"x","module":"models.x.train; rm -rf /"}]')
    assert "name" in render_error("defaults", 'train.extraModels=[{"name":"X Y","module":"models.x.train"}]')
