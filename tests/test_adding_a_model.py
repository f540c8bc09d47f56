"""Adding a fourth model through the documented path (docs/adding-a-model.md) and serving it.

The prep-time model (models/prep_time) is trained, gated and registered through models.lifecycle in a
tmp artifact root; the serve config entry is read from the doc itself; a real Ray Serve app
(serving.launch) serves it at /v2/models/prep_time next to the ETA model, and a reconfigure rolls it
out in place. No serving code knows the model's name.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from serving.config import load_serve_config
from serving.paths import PROJECT_ROOT
from serving.variants import (
    Slot,
    VariantError,
    check_consistent,
    in_canary,
    pin,
    slot_holders,
    slots,
)

MODEL = "prep_time"
DOC = PROJECT_ROOT / "docs" / "adding-a-model.md"


def doc_yaml(title: str) -> dict:
    """The YAML block of docs/adding-a-model.md whose first line is the comment `# <title>`."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if b.splitlines()[0].startswith(f"# {title}")]
    assert len(found) == 1, f"expected one yaml block titled {title!r} in {DOC}"
    return yaml.safe_load(found[0])


def with_documented_model(config: dict) -> dict:
    """The serve config plus the doc's `extra_models` entry and deployment, as step 5 says to add them."""
    config = copy.deepcopy(config)
    entry = doc_yaml("serving/serve_config.yaml")
    app = next(a for a in config["applications"] if a["name"] == "courier")
    args = app.setdefault("args", {})
    args["extra_models"] = [*(args.get("extra_models") or []), *entry["args"]["extra_models"]]
    app["deployments"] = [*app.get("deployments", []), *entry["deployments"]]
    return config


def _deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def _fake_artifact(root: Path, model: str, version: str, service: str) -> Path:
    directory = root / model / version
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"")  # the registry reads only the manifest
    (directory / "manifest.json").write_text(json.dumps({
        "name": model, "version": version, "feature_service": service, "inputs": [], "outputs": [],
        "training_window": {}}))
    return directory


# --- the serve config: discovery of the model's slot ------------------------------------------------

def test_the_documented_entry_makes_the_model_a_slot_of_the_app():
    """slot_holders / slots / check_consistent know the extra model from the config alone; the built-ins
    are unchanged; Ray Serve's schema and the app's args accept the config."""
    from serving.app import AppArgs
    from serving.config import validate

    shipped = load_serve_config()
    config = with_documented_model(shipped)
    check_consistent(config)
    holders = slot_holders(config)
    assert holders[MODEL] == [(MODEL, None)]
    assert holders == {**slot_holders(shipped), MODEL: [(MODEL, None)]}
    assert holders["eta"] == [("Ingress", "eta"), ("EtaModel", None)]
    assert slots(config)[MODEL] == Slot(version="champion")
    assert set(slots(config)) == {"eta", "ranker", "retrieval", MODEL}
    validate(config)
    settings = AppArgs.model_validate(config["applications"][0]["args"])
    assert [m.name for m in settings.extra_models] == [MODEL]
    with pytest.raises(VariantError, match="need a challenger"):
        bad = copy.deepcopy(config)
        _deployment(bad, MODEL)["user_config"] = {"version": "champion", "canary": 0.2}
        check_consistent(bad)


def test_pin_pins_the_extra_model_against_a_real_registry(tmp_path):
    """The deployer's pin resolves the extra model's aliases too, and gives it a deployment entry when the
    config has none, so no replica resolves an alias on its own."""
    from models.registry import Registry

    registry = Registry(artifacts=tmp_path)
    for model, service in (("eta", "eta_v1"), ("ranker", "ranker_v1"), ("retrieval", "retrieval_v1"),
                           (MODEL, "prep_time_v1")):
        for n in (1, 2):
            registry.register(_fake_artifact(tmp_path, model, f"{model}-2026010{n}-abc", service))
        registry.set_alias(model, "champion", "1")
        registry.set_alias(model, "challenger", "2")
    config = with_documented_model(load_serve_config())
    _deployment(config, MODEL)["user_config"] = {"version": "champion", "challenger": "challenger", "canary": 0.3}
    pinned = pin(config, registry)
    assert slots(pinned)[MODEL] == Slot(version=f"{MODEL}-20260101-abc", challenger=f"{MODEL}-20260102-abc",
                                        canary=0.3)
    assert slots(pinned)["eta"].version == "eta-20260101-abc"
    without_entry = copy.deepcopy(config)
    without_entry["applications"][0]["deployments"] = [d for d in config["applications"][0]["deployments"]
                                                       if d["name"] != MODEL]
    added = pin(without_entry, registry)
    assert _deployment(added, MODEL)["user_config"]["version"] == f"{MODEL}-20260101-abc"


@pytest.mark.parametrize("name, why", [
    ("eta", "taken"), ("Ingress", "lower-case"), ("user_tower", "taken"), ("OnnxModel", "lower-case"),
    ("prep-time", "lower-case"), ("", "lower-case"),
])
def test_an_extra_model_needs_a_free_well_formed_name(name, why):
    """The name is a deployment, an artifact folder and a route: Courier's own names and odd ones are refused."""
    from pydantic import ValidationError

    from serving.app import AppArgs

    config = load_serve_config()
    config["applications"][0]["args"]["extra_models"] = [{"name": name}]
    with pytest.raises(VariantError, match=why):
        check_consistent(config)
    with pytest.raises(ValidationError, match=why):
        AppArgs.model_validate(config["applications"][0]["args"])


def test_an_extra_model_is_listed_once():
    from pydantic import ValidationError

    from serving.app import AppArgs

    config = load_serve_config()
    config["applications"][0]["args"]["extra_models"] = [{"name": MODEL}, {"name": MODEL}]
    with pytest.raises(VariantError, match="twice"):
        check_consistent(config)
    with pytest.raises(ValidationError, match="twice"):
        AppArgs.model_validate(config["applications"][0]["args"])


# --- training, the gate and the registry -------------------------------------------------------------

@pytest.fixture(scope="module")
def prep_time(tmp_path_factory, city_dir, feature_store, eta_trained):
    """A tmp artifact root holding the session's ETA version and two prep-time versions trained through the
    lifecycle (champion, then challenger), with the root's own registry."""
    from models.prep_time.evaluate import GATE
    from models.prep_time.train import TrainConfig, run
    from models.registry import Registry
    from tests.conftest import small_city

    root = tmp_path_factory.mktemp("added-model-artifacts")
    eta = root / "eta" / Path(eta_trained.target).name
    eta.parent.mkdir(parents=True)
    eta.symlink_to(Path(eta_trained.target).resolve(), target_is_directory=True)
    registry = Registry(f"sqlite:///{root / 'registry.db'}", artifacts=root)
    reports = tmp_path_factory.mktemp("prep-time-reports")
    config = TrainConfig(epochs=8, test_days=2, validation_days=1)
    champion = run(city_dir, root, reports, config, store=feature_store, registry=registry, gate=small_city(GATE))
    challenger = run(city_dir, root, reports, TrainConfig(epochs=16, test_days=2, validation_days=1, seed=3),
                     store=feature_store, registry=registry, gate=small_city(GATE))
    return {"root": root, "registry": registry, "champion": champion, "challenger": challenger,
            "eta": Path(eta_trained.target).name}


def test_the_model_trains_gates_and_registers_through_the_lifecycle(prep_time):
    """Two runs of models.prep_time.train: the first gated version is the champion, the second the
    challenger (compared with the champion on its own window); gate.json, manifest and lineage are there."""
    from models.artifact import load_manifest

    registry, champion, challenger = prep_time["registry"], prep_time["champion"], prep_time["challenger"]
    assert registry.resolve(MODEL, "champion").version == champion.version
    assert registry.resolve(MODEL, "challenger").version == challenger.version
    for result in (champion, challenger):
        assert result.artifact_dir == prep_time["root"] / MODEL / result.version
        gate = json.loads((result.artifact_dir / "gate.json").read_text())
        assert gate["passed"] and [c["name"] for c in gate["checks"]] == ["parity", "offline_metrics",
                                                                          "feature_service"]
        manifest = load_manifest(result.artifact_dir)
        assert manifest.feature_service == "prep_time_v1"
        assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("features", "FP32", [-1, 4])]
        assert result.metrics["rmse"] < result.metrics["baseline_rmse"]  # the live load carries signal
    assert challenger.gate.champion == champion.version
    lineage = registry.lineage(challenger.registered)
    assert lineage["params"]["feature_service"] == "prep_time_v1"
    assert float(lineage["params"]["parity_max_abs_diff"]) <= 1e-3
    assert "data_window.start" in lineage["params"] and lineage["metrics"]["gate_passed"] == 1.0


# --- serving it: a real Ray Serve app ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, city_dir, prep_time):
    """serving.launch with the project's serve config, the ETA model only (no feed, no log), plus the doc's
    prep_time entry naming the alias `champion` (the launcher pins it)."""
    from serving.launch import BackgroundServer
    from tests.conftest import distinct_ports

    root = prep_time["root"]
    config = with_documented_model(load_serve_config())
    app = config["applications"][0]
    app["args"].update(artifacts=str(root), registry=f"sqlite:///{root / 'registry.db'}", data_dir=str(city_dir),
                       feed=None, prediction_log=None)
    app["deployments"] = [d for d in app["deployments"] if d["name"] not in ("Ranker", "Retrieval")]
    eta = {"version": prep_time["eta"], "challenger": None, "shadow": 0.0, "canary": 0.0}
    _deployment(config, "EtaModel")["user_config"] = dict(eta)
    _deployment(config, "Ingress")["user_config"] = {"eta": dict(eta)}
    folder = tmp_path_factory.mktemp("added-model-serve")
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with BackgroundServer(*distinct_ports(2), folder / "serve.log",
                          extra=["--config", str(path), "--num-cpus", "2"]) as running:
        yield running


def _rows(trained, n: int = 8) -> np.ndarray:
    from models.prep_time.train import features_of

    rows = features_of(trained.frames["test"])
    return rows[~np.isnan(rows).any(axis=1)][:n]  # JSON has no NaN: complete rows


def _infer(http: httpx.Client, rows: np.ndarray, **parameters) -> dict:
    body = {"id": "r-1", "inputs": [{"name": "features", "datatype": "FP32", "shape": list(rows.shape),
                                     "data": rows.reshape(-1).tolist()}]}
    if parameters:
        body["parameters"] = parameters
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _expected(trained, rows: np.ndarray) -> np.ndarray:
    from models.prep_time.model import onnx_predict

    return onnx_predict(trained.artifact_dir / "model.onnx", rows)


def test_the_model_is_served_at_its_oip_route(server, prep_time, known):
    """POST /v2/models/prep_time/infer answers with the champion ONNX model's outputs and its version;
    GET /v2/models/prep_time shows the pinned version; /v1/eta keeps answering next to it."""
    champion = prep_time["champion"]
    rows = _rows(champion)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        answers = [_infer(http, rows) for _ in range(20)]
        metadata = http.get(f"/v2/models/{MODEL}").json()
        ready = http.get(f"/v2/models/{MODEL}/ready")
        index = http.get("/").json()
        eta = http.post("/v1/eta", json=known)
        wrong = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": [{"name": "features", "datatype": "FP32",
                                                                           "shape": [1, 3], "data": [1, 2, 3]}]})
    assert {(a["model_name"], a["model_version"], a["parameters"]["variant"]) for a in answers} == {
        (MODEL, champion.version, "champion")}
    output = answers[0]["outputs"][0]
    assert (output["name"], output["datatype"], output["shape"]) == ("prep_minutes", "FP32", [len(rows)])
    np.testing.assert_allclose(output["data"], _expected(champion, rows), rtol=1e-5, atol=1e-4)
    assert answers[0]["id"] == "r-1"
    assert metadata["name"] == MODEL and metadata["versions"] == [champion.version]
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["parameters"]["feature_service"] == "prep_time_v1"
    assert ready.status_code == 200 and ready.json() == {"name": MODEL, "ready": True}
    assert f"POST /v2/models/{MODEL}/infer" in index["endpoints"]
    assert eta.status_code == 200 and eta.json()["model_version"] == prep_time["eta"]
    assert wrong.status_code == 422 and "shape" in wrong.text


def _apply_slot(server, model: str, slot: dict, timeout_s: float = 180) -> None:
    """Set a model's slot in the running config through the Ray dashboard, wherever slot_holders says it sits."""
    from serving.rollout import Dashboard

    dashboard = Dashboard(server.dashboard_url)
    config = dashboard.config()
    for name, key in slot_holders(config)[model]:
        deployment = next(d for d in config["applications"][0]["deployments"] if d["name"] == name)
        deployment["user_config"] = {**(deployment.get("user_config") or {}), key: slot} if key else dict(slot)
    since = time.time()
    dashboard.deploy(config)
    dashboard.wait_running(since, timeout_s)


def _replicas(server) -> set[str]:
    from serving.rollout import Dashboard

    deployments = Dashboard(server.dashboard_url).details()["applications"]["courier"]["deployments"]
    return {r["replica_id"] for r in deployments[MODEL]["replicas"] if r["state"] == "RUNNING"}


def test_the_model_rolls_out_in_place_with_a_sticky_canary(server, prep_time):
    """A reconfigure adds the challenger as a 50 % canary: each user gets the stable hash's variant on every
    request, answered by that variant's model; then the challenger is rolled out. Same replicas throughout."""
    from serving.rollout import wait_for_version

    champion, challenger = prep_time["champion"], prep_time["challenger"]
    rows = _rows(champion)
    replicas = _replicas(server)
    _apply_slot(server, MODEL, {"version": champion.version, "challenger": challenger.version, "shadow": 0.0,
                                "canary": 0.5})
    users = range(1, 41)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        rounds = [[_infer(http, rows, user_id=u) for u in users] for _ in range(2)]
        versions = http.get(f"/v2/models/{MODEL}").json()["versions"]
    assert versions == [champion.version, challenger.version]
    expected = [in_canary(u, 0.5, f"{MODEL}:{challenger.version}") for u in users]
    assert 0 < sum(expected) < len(expected)
    outputs = {v: _expected(r, rows) for v, r in ((champion.version, champion), (challenger.version, challenger))}
    for answers in rounds:
        assert [a["parameters"]["variant"] == "challenger" for a in answers] == expected  # sticky by user
        for a in answers:
            assert a["model_version"] == (challenger.version if a["parameters"]["variant"] == "challenger"
                                          else champion.version)
            np.testing.assert_allclose(a["outputs"][0]["data"], outputs[a["model_version"]], rtol=1e-5, atol=1e-4)
    _apply_slot(server, MODEL, {"version": challenger.version, "challenger": None, "shadow": 0.0, "canary": 0.0})
    wait_for_version(server.url, "eta", prep_time["eta"])  # unaffected
    with httpx.Client(base_url=server.url, timeout=30) as http:
        after = [_infer(http, rows, user_id=u) for u in users]
    assert {(a["model_version"], a["parameters"]["variant"]) for a in after} == {(challenger.version, "champion")}
    assert _replicas(server) == replicas  # reconfigured in place, not replaced
