"""The shared lifecycle (models/lifecycle.py): gate, register with lineage, bootstrap champion, challenger.

Each test trains the small ETA model (2 epochs) into its own artifact root and registry, so the
session's registry (tests/conftest.py) is never touched.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from models.artifact import load_manifest
from models.eta.evaluate import GATE
from models.eta.train import TrainConfig, run
from models.gate import GATE_FILE, GateRefused
from models.lifecycle import REFUSED, DataWindow
from models.registry import CHALLENGER, CHAMPION, Registry

TINY = TrainConfig(epochs=2, test_days=2, validation_days=1)
# no quality targets on the tiny city, and a wide margin: these tests are about registration, not quality
LENIENT = replace(GATE, require_targets=False, margin=0.5)


@pytest.fixture
def private(tmp_path):
    """(artifact root, registry) of one test."""
    root = tmp_path / "artifacts"
    return root, Registry(f"sqlite:///{root / 'registry.db'}", artifacts=root)


def test_first_version_is_champion_then_challenger_then_promoted(private, city_dir, feature_store, tmp_path) -> None:
    """Bootstrap: the first gated version becomes champion; the next is challenger (champion unchanged);
    --promote makes the third champion. Each is `<root>/eta/<version>` with gate.json; no staging left."""
    root, registry = private
    first = run(city_dir, root, tmp_path / "r1", TINY, feature_store, registry, gate=LENIENT)
    assert first.registered.aliases == (CHAMPION,) and first.registered.number == "1"
    second = run(city_dir, root, tmp_path / "r2", replace(TINY, seed=8), feature_store, registry, gate=LENIENT)
    assert second.registered.aliases == (CHALLENGER,)
    assert registry.resolve("eta", CHAMPION).version == first.version
    third = run(city_dir, root, tmp_path / "r3", replace(TINY, seed=9), feature_store, registry, gate=LENIENT,
                promote=True)
    assert registry.resolve("eta", CHAMPION).version == third.version
    assert registry.resolve("eta", CHALLENGER).version == second.version
    assert [m.version for m in registry.versions("eta")] == [first.version, second.version, third.version]
    for result in (first, second, third):
        assert result.target == root / "eta" / result.version and result.artifacts == root
        assert load_manifest(result.target).version == result.version
        assert json.loads((result.target / GATE_FILE).read_text())["passed"] is True
    assert not [p for p in (root / "eta").iterdir() if p.name.startswith(".staging")]
    # the second and third were compared with the champion of their time, on their own test window
    assert second.gate.champion == first.version and third.gate.champion == first.version
    assert not (root / "eta" / "current").exists()


def test_registration_records_the_lineage(private, city_dir, feature_store, tmp_path) -> None:
    """The registry run holds data window, feature service, code version, offline metrics, parity, gate,
    hyper-parameters and row counts (with how many came from the live logs)."""
    root, registry = private
    result = run(city_dir, root, tmp_path / "r", TINY, feature_store, registry, gate=LENIENT)
    lineage = registry.lineage(result.registered)
    params, metrics = lineage["params"], lineage["metrics"]
    assert params["feature_service"] == "eta_v1" and lineage["tags"]["feature_service"] == "eta_v1"
    assert params["code_version"] == "unknown" or len(params["code_version"]) == 40
    assert params["code_dirty"] in {"true", "false", "unknown"}
    window = {k: params[f"data_window.{k}"] for k in ("start", "end", "validation_start", "test_start")}
    assert pd.Timestamp(window["start"]) < pd.Timestamp(window["validation_start"]) < \
        pd.Timestamp(window["test_start"]) < pd.Timestamp(window["end"])
    assert int(params["n_train"]) == result.n_train and int(params["n_logged.train"]) == 0
    assert float(params["parity_max_abs_diff"]) <= 1e-3 and params["gate_champion"] == "none"
    assert params["hp_epochs"] == "2" and params["hp_hidden"] == "[64, 64]"
    assert metrics["rmse"] == pytest.approx(result.metrics["rmse"]) and metrics["gate_passed"] == 1.0
    assert metrics["gate_parity_passed"] == metrics["gate_offline_metrics_passed"] == 1.0


def test_a_refused_candidate_is_kept_out_of_the_registry(private, city_dir, feature_store, tmp_path) -> None:
    """Shuffled labels: GateRefused naming offline_metrics; the champion stays; the candidate sits under
    .refused/<version> with its gate.json and no registry version."""
    root, registry = private
    champion = run(city_dir, root, tmp_path / "r1", TINY, feature_store, registry, gate=LENIENT)
    with pytest.raises(GateRefused) as refused:
        run(city_dir, root, tmp_path / "r2", TINY, feature_store, registry, shuffle_labels=True,
            gate=replace(GATE, require_targets=False))
    report = refused.value.report
    assert [c.name for c in report.failed] == ["offline_metrics"] and "offline_metrics" in str(refused.value)
    assert report.champion == champion.version
    assert [m.version for m in registry.versions("eta")] == [champion.version]
    kept = root / "eta" / REFUSED / report.version
    assert json.loads((kept / GATE_FILE).read_text())["passed"] is False
    assert not (root / "eta" / report.version).exists()


def test_window_split_by_shares_puts_the_latest_rows_in_test() -> None:
    """A recent window keeps the last `days`, and splits its rows 65/15/20 by time, latest last."""
    times = pd.Series(pd.date_range("2026-01-01", periods=1000, freq="h", tz="UTC"))
    frame = pd.DataFrame({"event_timestamp": times, "i": range(1000)})
    window = DataWindow.recent(10, test_share=0.2, validation_share=0.15).resolve(times.min(), times.max())
    train, validation, test = window.split(frame)
    assert len(train) + len(validation) + len(test) == 10 * 24
    assert len(test) == pytest.approx(48, abs=1) and len(validation) == pytest.approx(36, abs=1)
    assert train["event_timestamp"].max() < validation["event_timestamp"].min()
    assert validation["event_timestamp"].max() < test["event_timestamp"].min()
    assert window.to_dict()["days"] == 10


def test_session_models_are_registered_champions(eta_trained, ranker_trained, retrieval_trained,
                                                 model_registry, artifact_root) -> None:
    """The trained fixtures share one artifact root and registry; each is its model's champion with gate.json."""
    for trained in (eta_trained, ranker_trained, retrieval_trained):
        assert trained.artifacts == artifact_root and trained.target.parent.parent == artifact_root
        assert trained.registered.version == trained.version and trained.registered.path == trained.target
        assert model_registry.resolve(trained.registered.name, CHAMPION).version == trained.version
        assert json.loads((trained.target / GATE_FILE).read_text())["passed"] is True
