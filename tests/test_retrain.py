"""Retraining (models/retrain.py): recent window with the live city's logged rows, gated, registered as challenger;
shuffled labels refused with exit 1. Each test has its own artifact root and registry."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.artifact import load_manifest
from models.eta.evaluate import GATE
from models.eta.features import FEATURE_NAMES, build_inputs
from models.eta.logged import load_logged, logged_dir, logged_frame
from models.eta.train import TrainConfig, model_columns
from models.registry import CHALLENGER, CHAMPION, Registry
from models.retrain import main, retrain

LATER = pd.Timedelta(days=2)  # the live city runs after the simulated days


def logged_rows(frame: pd.DataFrame, defaults: dict, shift: pd.Timedelta) -> pd.DataFrame:
    """Rows as the monitor's joiner writes them (monitoring/joiner.py `eta_outcomes`), from real orders `shift` later."""
    later = frame.assign(event_timestamp=frame["event_timestamp"] + shift)
    dense = build_inputs(model_columns(later), defaults)["dense"]
    rows = pd.DataFrame({
        "request_id": [f"req-{i}" for i in range(len(later))],
        "event_timestamp": later["event_timestamp"].astype("datetime64[us, UTC]"),
        "prediction_ts": 0.0, "outcome_ts": 0.0, "model_version": "eta-live",
        "restaurant_id": later["restaurant_id"].astype("int64"),
        "delivery_lat": later["delivery_lat"], "delivery_lon": later["delivery_lon"], "area_id": later["area_id"],
        "eta_minutes": 30.0, "delivery_minutes": later["delivery_minutes"],
        "true_eta_minutes": later["true_eta_minutes"], "error_minutes": 0.0, "degraded": False,
        "expired_features": "", "scenario": "normal",
        **{f"input_{name}": dense[:, i].astype(np.float64) for i, name in enumerate(FEATURE_NAMES)}})
    return rows


def write_logged(data_dir, rows: pd.DataFrame) -> None:
    """Two parquet parts in the joiner's folder (the offline store's logged table)."""
    directory = logged_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for i, part in enumerate((rows.iloc[:half], rows.iloc[half:])):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), directory / f"part-test-{i:06d}.parquet")


@pytest.fixture
def live_city(tmp_path, city_dir, eta_trained):
    """A copy of the small city's offline store plus two days of logged live rows after its end; the feast
    folder is linked so the materialized store stays the one serving reads."""
    data_dir = tmp_path / "city"
    shutil.copytree(city_dir / "offline", data_dir / "offline")
    (data_dir / "feast").symlink_to(city_dir / "feast")
    frames = pd.concat([eta_trained.frames["validation"], eta_trained.frames["test"]], ignore_index=True)
    rows = logged_rows(frames, load_manifest(eta_trained.target).feature_defaults, LATER)
    write_logged(data_dir, rows)
    return data_dir, rows


@pytest.fixture
def private(tmp_path, eta_trained):
    """(artifact root, registry) with the session's ETA model copied in and registered as champion."""
    root = tmp_path / "artifacts"
    shutil.copytree(eta_trained.target, root / "eta" / eta_trained.version)
    registry = Registry(f"sqlite:///{root / 'registry.db'}", artifacts=root)
    registry.set_alias("eta", CHAMPION, registry.register(root / "eta" / eta_trained.version).number)
    return root, registry


def test_logged_rows_become_training_rows_with_the_served_inputs(live_city, eta_trained) -> None:
    """Every logged row comes back; rebuilt through build_inputs it gives the inputs serving logged."""
    data_dir, rows = live_city
    restaurants = pd.read_parquet(data_dir / "offline" / "restaurants.parquet")
    frame = logged_frame(load_logged(data_dir), restaurants)
    assert len(frame) == len(rows) and (frame["order_id"] < 0).all()
    defaults = load_manifest(eta_trained.target).feature_defaults
    rebuilt = build_inputs(model_columns(frame), defaults)["dense"]
    served = rows[[f"input_{name}" for name in FEATURE_NAMES]].to_numpy()
    np.testing.assert_allclose(rebuilt, served, rtol=1e-4, atol=1e-3)
    assert np.array_equal(frame["delivery_minutes"].to_numpy(), rows["delivery_minutes"].to_numpy())


def test_retrain_trains_on_the_recent_window_with_the_logged_rows(live_city, private, feature_store, tmp_path,
                                                                  eta_trained) -> None:
    """The live rows reach training and validation, their newest ones are the recent window where the challenger
    is judged (targets and champion); the output is recalibrated on the live world; registered as challenger,
    with the logged counts in its lineage."""
    data_dir, rows = live_city
    root, registry = private
    result = retrain("eta", data_dir, root, registry, days=6, store=feature_store,
                     config=TrainConfig(epochs=2), reports=tmp_path / "reports",
                     gate=replace(GATE, require_targets=False, margin=0.5))
    sources = {name: result.frames[name]["source"].value_counts().to_dict() for name in ("train", "test", "recent")}
    assert sources["train"].get("logged", 0) > 100 and sources["train"].get("offline", 0) > 100
    assert sources["recent"] == {"logged": len(result.frames["recent"])}  # the latest rows: the live ones
    assert sources["test"] == {"offline": len(result.frames["test"])}  # the simulated days, reported apart
    assert result.frames["recent"]["event_timestamp"].min() >= result.frames["train"]["event_timestamp"].max() - \
        pd.Timedelta(days=6)
    assert 0.5 <= result.metrics["recalibration"]["scale"] <= 2.0
    assert result.metrics["n_test"] == len(result.frames["recent"]) and "simulated_days" in result.metrics
    end = rows["event_timestamp"].max()
    assert result.frames["train"]["event_timestamp"].min() >= end - pd.Timedelta(days=6)
    assert result.registered.aliases == (CHALLENGER,)
    assert registry.resolve("eta", CHAMPION).version == eta_trained.version
    assert result.gate.champion == eta_trained.version and result.gate.passed
    params = registry.lineage(result.registered)["params"]
    n_logged = sum(int(params[f"n_logged.{k}"]) for k in ("train", "validation", "test", "recent"))
    assert n_logged == len(rows) and int(params["n_logged.train"]) == sources["train"]["logged"]
    assert float(params["data_window.days"]) == 6.0


def test_shuffled_labels_are_refused_with_exit_1(live_city, private, tmp_path, capsys) -> None:
    """`python -m models.retrain --model eta --shuffle-labels`: exit 1, the JSON names the failed check, nothing
    new is registered and the champion stays."""
    data_dir, _ = live_city
    root, registry = private
    before = [m.version for m in registry.versions("eta")]
    code = main(["--model", "eta", "--shuffle-labels", "--days", "6", "--epochs", "2", "--data-dir", str(data_dir),
                 "--artifacts", str(root), "--registry", registry.uri, "--reports", str(tmp_path / "reports")])
    out = capsys.readouterr()
    assert code == 1
    summary = json.loads(out.out[out.out.rindex("\n{") + 1:])
    assert summary["refused"] == ["eta"] and "offline_metrics" in summary["models"]["eta"]["failed"]
    assert "offline_metrics" in out.err and "the champion keeps serving" in out.err
    assert [m.version for m in registry.versions("eta")] == before
    assert registry.resolve("eta", CHAMPION).version == before[0]
