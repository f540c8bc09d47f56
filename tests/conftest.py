"""Shared fixtures: one small simulated city and its Feast store, built once per test session."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from feature_repo.store import apply, materialize, open_store
from models.simulator import SimulationConfig, simulate
from serving.launch import free_port  # tests import it from here

# The suite checks answers under concurrency, not shedding: every Courier it starts gets a patient HAProxy
# queue (an explicit environment value wins over serving/ray_env.yaml). The shipped bounds are tested in
# tests/test_haproxy_admission.py (the real HAProxy) and measured by `make overload`.
PATIENT_HAPROXY = {"COURIER_HAPROXY_QUEUE_TIMEOUT_MS": "60000", "COURIER_HAPROXY_MAX_QUEUED": "100000"}
for _name, _value in PATIENT_HAPROXY.items():
    os.environ.setdefault(_name, _value)

# A fixed end keeps the small city identical from run to run (the simulator is deterministic).
CITY_END = "2026-11-20T12:00:00"
SMALL_CITY = SimulationConfig(seed=11, days=8, scale=0.3, end=CITY_END)


@pytest.fixture(scope="session")
def city_dir(tmp_path_factory) -> Path:
    """A data dir with the small city's offline store in offline/ (parquet)."""
    data_dir = tmp_path_factory.mktemp("city")
    simulate(SMALL_CITY, data_dir / "offline")
    return data_dir


@pytest.fixture(scope="session")
def city_summary(city_dir) -> dict:
    """The simulator's summary (window, row counts)."""
    return json.loads((city_dir / "offline" / "simulation.json").read_text())


@pytest.fixture(scope="session")
def feature_store(city_dir, city_summary):
    """The small city's Feast store: registry and SQLite online store in the tmp data dir, materialized."""
    store = open_store("sqlite", data_dir=city_dir)
    apply(store, data_dir=city_dir)
    materialize(store, datetime.fromisoformat(city_summary["end"]))
    return store


def small_city(rules):
    """A model's gate rules without its quality targets, which the tests' tiny city cannot reach (parity, the
    champion comparison and the feature service are still checked)."""
    from dataclasses import replace

    return replace(rules, require_targets=False)


@pytest.fixture(scope="session")
def artifact_root(tmp_path_factory) -> Path:
    """The session's artifact root: every trained fixture's `<model>/<version>` and the registry's SQLite file."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def model_registry(artifact_root):
    """The session's model registry (MLflow on `<artifact_root>/registry.db`), never the environment's."""
    from models.registry import Registry

    return Registry(f"sqlite:///{artifact_root / 'registry.db'}", artifacts=artifact_root)


@pytest.fixture(scope="session")
def eta_trained(tmp_path_factory, city_dir, feature_store, artifact_root, model_registry):
    """A small ETA model trained on the small city through its Feast store, gated and registered (champion).

    A models.lifecycle.TrainResult: `.version`, `.target` (the artifact dir), `.registered`
    (RegisteredModel), `.artifacts` (the session's artifact root), `.model`, `.frames`, `.metrics`.
    """
    from models.eta.evaluate import GATE
    from models.eta.train import TrainConfig, run

    reports = tmp_path_factory.mktemp("reports") / "eta"
    result = run(city_dir, artifact_root, reports, TrainConfig(epochs=6, test_days=2, validation_days=1),
                 store=feature_store, registry=model_registry, gate=small_city(GATE))
    result.frames.update(data_dir=city_dir, reports=reports, root=artifact_root)
    return result


@pytest.fixture(scope="session")
def eta_artifacts(eta_trained) -> Path:
    """The session's artifact root: eta/, ranker/, retrieval/ and registry.db."""
    return eta_trained.frames["root"]


def distinct_ports(n: int) -> list[int]:
    """n free TCP ports, all different (the kernel may hand one out twice in a row)."""

    ports: list[int] = []
    while len(ports) < n:
        ports.append(free_port(avoid=ports))
    return ports


def served_artifacts(*trained) -> Path:
    """One artifact root holding every trained model's version (`<root>/<model>/<version>`).

    The trained fixtures may live under different roots; then a root of links to their version
    directories is made beside the first one (serving reads versions by name, never `current`)."""
    roots = {Path(t.target).parent.parent for t in trained}
    if len(roots) == 1:
        return roots.pop()
    merged = Path(trained[0].target).parent.parent.parent / "served-artifacts"
    for t in trained:
        link = merged / Path(t.target).parent.name / Path(t.target).name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(t.target).resolve(), target_is_directory=True)
    return merged


def serve_overrides(data_dir: Path, eta_trained, retrieval_trained, ranker_trained,
                    feed_args: dict | None = None, slots: dict | None = None, **more) -> list[str]:
    """`serving.launch` arguments pointing the project's serve config at the test's city and models.

    Every model is pinned to its trained version (`--slot <model>.version=...`), so no registry is
    needed; `slots` adds slot fields ({"eta": {"challenger": "...", "shadow": 0.5}})."""
    from serving.config import load_serve_config

    feed = dict(load_serve_config()["applications"][0]["args"]["feed"])
    feed.update(**(feed_args or {}))
    artifacts = served_artifacts(eta_trained, retrieval_trained, ranker_trained)
    sets = {"artifacts": str(artifacts), "data_dir": str(data_dir), "feed": feed, **more}
    pinned = {"eta": {"version": Path(eta_trained.target).name},
              "ranker": {"version": Path(ranker_trained.target).name},
              "retrieval": {"version": Path(retrieval_trained.target).name}}
    for model, fields in (slots or {}).items():
        pinned[model].update(fields)
    return [*(arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")),
            *(arg for model, fields in pinned.items() for field, value in fields.items()
              for arg in ("--slot", f"{model}.{field}={json.dumps(value)}"))]


@pytest.fixture(scope="session")
def known(city_dir) -> dict:
    """A real order of the small city, as a /v1/eta body."""
    import pandas as pd

    order = pd.read_parquet(city_dir / "offline" / "orders.parquet").iloc[-1]
    return {"restaurant_id": int(order.restaurant_id), "delivery_lat": float(order.delivery_lat),
            "delivery_lon": float(order.delivery_lon), "order_time": "2026-11-18T19:00:00Z"}


@pytest.fixture(scope="session")
def served_log_stream() -> str:
    """The session server's prediction log: a stream of its own on the local Redis, deleted afterwards."""
    import uuid

    import redis

    stream = f"courier-test:{uuid.uuid4().hex[:8]}:predictions"
    yield stream
    redis.Redis(host="127.0.0.1", port=6379).delete(stream)


@pytest.fixture(scope="session")
def served(tmp_path_factory, city_dir, feature_store, eta_trained, retrieval_trained, ranker_trained,
           served_log_stream):
    """The real Ray Serve app (serving.launch with the project's serve config) on free ports."""
    from serving.launch import BackgroundServer

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    overrides = ["--num-cpus", "2", *serve_overrides(city_dir, eta_trained, retrieval_trained, ranker_trained,
                                                     prediction_log={"stream": served_log_stream, "maxlen": 100000})]
    with BackgroundServer(*distinct_ports(2), log, extra=overrides) as server:
        yield server


@pytest.fixture(scope="session")
def ranker_trained(tmp_path_factory, city_dir, feature_store, artifact_root, model_registry):
    """A small feed ranker trained on the small city, gated and registered (champion); as `eta_trained`."""
    from models.ranker.evaluate import GATE
    from models.ranker.train import TrainConfig, run

    reports = tmp_path_factory.mktemp("reports") / "ranker"
    result = run(city_dir, artifact_root, reports, TrainConfig(epochs=3, test_days=2, validation_days=1),
                 store=feature_store, registry=model_registry, gate=small_city(GATE))
    result.frames.update(data_dir=city_dir, reports=reports, root=artifact_root)
    return result


@pytest.fixture(scope="session")
def retrieval_trained(tmp_path_factory, city_dir, feature_store, artifact_root, model_registry):
    """A small two-tower retrieval model trained on the small city, gated and registered; as `eta_trained`."""
    from models.retrieval.evaluate import GATE
    from models.retrieval.train import TrainConfig, run

    reports = tmp_path_factory.mktemp("reports") / "retrieval"
    result = run(city_dir, artifact_root, reports, TrainConfig(epochs=10, test_days=2, validation_days=1),
                 store=feature_store, registry=model_registry, gate=small_city(GATE))
    result.frames.update(data_dir=city_dir, reports=reports, root=artifact_root)
    return result


# --- the Helm chart (tests/test_chart*.py) ------------------------------------------------------

@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary, extracted by scripts/tools.sh when it is not on PATH."""
    from charts.checks.render import helm_binary

    return helm_binary()


@pytest.fixture(scope="session")
def render(helm):
    """render(scenario, *sets) -> the rendered objects; sets are --set-json items ('a.b=1')."""
    from chart_support import rendered_objects

    return rendered_objects


@pytest.fixture(scope="session")
def render_error(helm):
    """render_error(scenario, *sets) -> helm's error output, asserting the render failed."""
    from chart_support import render_scenario

    def _error(scenario: str = "defaults", *sets: str) -> str:
        _, stderr, code = render_scenario(scenario, sets)
        assert code != 0, f"expected {scenario} {sets} to fail, it rendered"
        return stderr
    return _error


# --- the monitor (tests/test_monitor.py, tests/test_drift_alert.py) ---------------------------------

class ArtifactPath(type(Path())):
    """An artifact directory (a Path: `fake_eta / "manifest.json"` works) that also says how it is registered:
    `.version`, `.target` (itself), `.registered` (RegisteredModel), `.artifacts` (the root), `.registry`."""


def constant_eta_onnx(path: Path, minutes: float = 30.0) -> Path:
    """A stand-in ETA model with the real inputs and output that answers `minutes` for every row."""
    import onnx
    from onnx import TensorProto, helper

    from models.eta.features import N_DENSE

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["dense", "axis"], ["summed"], keepdims=0),
         helper.make_node("Mul", ["summed", "zero"], ["nothing"]),
         helper.make_node("Add", ["nothing", "minutes"], ["eta_minutes"])],
        "constant_eta",
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", N_DENSE]),
         helper.make_tensor_value_info("areas", TensorProto.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("eta_minutes", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor("axis", TensorProto.INT64, [1], [1]), helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("minutes", TensorProto.FLOAT, [], [minutes])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.fixture
def fake_eta(tmp_path) -> ArtifactPath:
    """A registered ETA artifact (champion) with what the monitor reads: a manifest (offline RMSE 3.5), a
    reference and a stand-in ONNX answering 30 minutes, in `<tmp>/artifacts` with its own registry."""
    import numpy as np

    from models.artifact import ModelManifest, save_manifest
    from models.eta.export import INPUT_SPECS, OUTPUT_SPECS
    from models.eta.features import LIVE_FEATURES
    from models.registry import CHAMPION, Registry
    from monitoring.reference import write_reference

    version = "eta-20260101000000-abcdef"
    root = tmp_path / "artifacts"
    directory = root / "eta" / version
    save_manifest(directory, ModelManifest("eta", version, "eta_v1", INPUT_SPECS, OUTPUT_SPECS,
                                           {"start": "2025-12-10T00:00:00+00:00", "end": "2025-12-31T00:00:00+00:00"},
                                           metrics={"rmse": 3.5}, feature_defaults=dict.fromkeys(LIVE_FEATURES, 0.0),
                                           created_at="2026-01-01T00:00:00+00:00"))
    constant_eta_onnx(directory / "model.onnx")
    rng = np.random.default_rng(1)
    write_reference(directory, {"distance_km": rng.uniform(0, 5, 5000), "congestion_ratio": rng.uniform(0, 1, 5000)},
                    {"eta_minutes": rng.normal(30, 5, 5000)})
    registry = Registry(f"sqlite:///{root / 'registry.db'}", artifacts=root)
    registered = registry.register(directory, params={"stand_in": "constant 30 minutes"}, metrics={"rmse": 3.5})
    path = ArtifactPath(directory)
    path.version, path.target, path.artifacts, path.registry = version, directory, root, registry
    path.registered = registry.set_alias("eta", CHAMPION, registered.number)
    return path
