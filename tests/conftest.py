"""Shared fixtures: one small simulated city and its Feast store, built once per test session."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from feature_repo.store import apply, materialize, open_store
from models.simulator import SimulationConfig, simulate
from serving.launch import free_port  # tests import it from here

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


@pytest.fixture(scope="session")
def eta_trained(tmp_path_factory, city_dir, feature_store):
    """A small ETA model trained for a few epochs on the small city through its Feast store."""
    from models.eta.train import TrainConfig, run

    root = tmp_path_factory.mktemp("artifacts")
    result = run(city_dir, root, root / "reports", TrainConfig(epochs=6, test_days=2, validation_days=1),
                 store=feature_store)
    result.frames["data_dir"] = city_dir
    result.frames["reports"] = root / "reports"
    result.frames["root"] = root
    return result


@pytest.fixture(scope="session")
def eta_artifacts(eta_trained) -> Path:
    """The artifact root of the small model (with eta/current)."""
    return eta_trained.frames["root"]


def serve_overrides(data_dir: Path, eta_artifacts: Path, retrieval_trained, ranker_trained,
                    feed_args: dict | None = None, **more) -> list[str]:
    """`serving.launch --set` arguments pointing the project's serve config at the test's city and models."""
    from serving.config import load_serve_config

    feed = dict(load_serve_config()["applications"][0]["args"]["feed"])
    feed.update(retrieval_model_dir=str(retrieval_trained.current), ranker_model_dir=str(ranker_trained.current),
                **(feed_args or {}))
    sets = {"model_dir": str(eta_artifacts / "eta" / "current"), "data_dir": str(data_dir), "feed": feed, **more}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


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
def served(tmp_path_factory, city_dir, feature_store, eta_artifacts, retrieval_trained, ranker_trained,
           served_log_stream):
    """The real Ray Serve app (serving.launch with the project's serve config) on free ports."""
    from serving.launch import BackgroundServer

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    overrides = ["--num-cpus", "2", *serve_overrides(city_dir, eta_artifacts, retrieval_trained, ranker_trained,
                                                     prediction_log={"stream": served_log_stream, "maxlen": 100000})]
    with BackgroundServer(free_port(), free_port(), log, extra=overrides) as server:
        yield server


@pytest.fixture(scope="session")
def ranker_trained(tmp_path_factory, city_dir, feature_store):
    """A small feed ranker trained for a few epochs on the small city through its Feast store."""
    from models.ranker.train import TrainConfig, run

    root = tmp_path_factory.mktemp("ranker")
    result = run(city_dir, root, root / "reports", TrainConfig(epochs=3, test_days=2, validation_days=1),
                 store=feature_store)
    result.frames.update(data_dir=city_dir, reports=root / "reports", root=root)
    return result


@pytest.fixture(scope="session")
def retrieval_trained(tmp_path_factory, city_dir, feature_store):
    """A small two-tower retrieval model trained for a few epochs on the small city."""
    from models.retrieval.train import TrainConfig, run

    root = tmp_path_factory.mktemp("retrieval")
    result = run(city_dir, root, root / "reports", TrainConfig(epochs=10, test_days=2, validation_days=1),
                 store=feature_store)
    result.frames.update(data_dir=city_dir, reports=root / "reports", root=root)
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

@pytest.fixture
def fake_eta(tmp_path) -> Path:
    """An ETA artifact with just what the monitor reads: a manifest (offline RMSE 3.5) and a reference."""
    version = "eta-20260101000000-abcdef"
    directory = tmp_path / "artifacts" / "eta" / version
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"name": "eta", "version": version, "feature_service": "eta_v1",
                                                         "metrics": {"rmse": 3.5}}))
    import numpy as np

    from monitoring.reference import write_reference

    rng = np.random.default_rng(1)
    write_reference(directory, {"distance_km": rng.uniform(0, 5, 5000), "congestion_ratio": rng.uniform(0, 1, 5000)},
                    {"eta_minutes": rng.normal(30, 5, 5000)})
    (tmp_path / "artifacts" / "eta" / "current").symlink_to(version)
    return tmp_path / "artifacts" / "eta" / "current"
