"""The gate (models/gate.py): each check refuses what it must, on constructed cases and on real artifacts."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from models.eta.evaluate import GATE as ETA_GATE
from models.eta.train import score_artifact
from models.gate import (
    FEATURES,
    METRICS,
    PARITY,
    GateRules,
    check_feature_service,
    check_metrics,
    check_parity,
    run_gate,
)

RULES = GateRules("eta", metric="rmse", higher_is_better=False, margin=0.02, relative=True, atol=1e-3, rtol=0.0)


def test_parity_passes_within_the_tolerance_and_refuses_beyond_it() -> None:
    """ONNX within atol of PyTorch passes; one row 2x atol off refuses, naming the figure; shape and NaN refuse."""
    torch_out = np.linspace(10, 60, 500).astype(np.float32)
    assert check_parity(RULES, torch_out, torch_out + 5e-4).passed
    off = torch_out.copy()
    off[123] += 2e-3
    refused = check_parity(RULES, torch_out, off)
    assert not refused.passed and refused.name == PARITY
    assert refused.figure == pytest.approx(2e-3, rel=1e-2) and refused.limit == 1e-3
    assert "does not compute what was trained" in refused.message
    assert not check_parity(RULES, torch_out, torch_out[:-1]).passed
    with_nan = torch_out.copy()
    with_nan[0] = np.nan
    assert not check_parity(RULES, torch_out, with_nan).passed


def test_parity_relative_tolerance_scales_with_the_output() -> None:
    """rtol: a difference allowed for a large output is refused for a small one."""
    rules = replace(RULES, atol=1e-6, rtol=1e-3)
    assert check_parity(rules, np.array([100.0]), np.array([100.05])).passed
    assert not check_parity(rules, np.array([0.01]), np.array([0.0101])).passed


def test_metrics_check_needs_the_targets_and_the_champion_on_the_same_window() -> None:
    """Targets missed refuse; worse than the champion beyond the margin refuses; within the margin passes."""
    met = {"targets_met": True}
    assert check_metrics(RULES, met, 3.30, None, None).passed  # bootstrap: no champion
    missed = check_metrics(RULES, {"targets_met": False}, 3.30, None, None)
    assert not missed.passed and "misses its offline targets" in missed.message
    assert check_metrics(RULES, met, 3.30 * 1.019, 3.30, "eta-champion").passed
    worse = check_metrics(RULES, met, 3.30 * 1.03, 3.30, "eta-champion")
    assert not worse.passed and worse.limit == pytest.approx(3.366) and "worse than the champion" in worse.message
    assert "eta-champion" in worse.message
    # higher is better, absolute margin (retrieval's recall)
    recall = GateRules("retrieval", "recall_at_10", True, margin=0.02, relative=False, atol=1e-4)
    assert check_metrics(recall, met, 0.705, 0.72, "r1").passed
    assert not check_metrics(recall, met, 0.69, 0.72, "r1").passed
    # rules that do not require the targets (a tiny test city) still compare with the champion
    relaxed = replace(RULES, require_targets=False)
    assert check_metrics(relaxed, {"targets_met": False}, 3.3, None, None).passed
    assert not check_metrics(relaxed, {"targets_met": False}, 4.0, 3.3, "c").passed


def test_the_champion_is_measured_on_the_candidates_window(eta_trained, tmp_path) -> None:
    """run_gate scores candidate and champion artifacts with the same function on the same rows: a real
    champion beats a constant 30-minute candidate on the candidate's test window, so the gate refuses it."""
    from conftest import constant_eta_onnx

    test = eta_trained.frames["test"]
    candidate = tmp_path / "candidate"
    shutil.copytree(eta_trained.target, candidate)
    constant_eta_onnx(candidate / "model.onnx", minutes=30.0)
    seen = []

    def score(directory: Path) -> float:
        seen.append(Path(directory))
        return score_artifact(directory, test)

    champion = SimpleNamespace(version=eta_trained.version, path=eta_trained.target)
    parity = (np.zeros(4), np.zeros(4))
    report = run_gate(replace(ETA_GATE, require_targets=False), "eta-candidate", {"targets_met": True}, parity,
                      score, candidate, champion, store=None, service="eta_v1")
    assert seen == [candidate, eta_trained.target]
    metrics = report.check(METRICS)
    champion_rmse = score_artifact(eta_trained.target, test)
    constant_rmse = float(np.sqrt(np.mean((30.0 - test["delivery_minutes"]) ** 2)))
    assert metrics.figure == pytest.approx(constant_rmse, rel=1e-5) and metrics.limit == pytest.approx(champion_rmse * 1.02)
    assert not metrics.passed and report.champion == eta_trained.version
    # the champion's own artifact against itself passes the comparison (equal is not worse)
    again = run_gate(replace(ETA_GATE, require_targets=False), "eta-same", {"targets_met": True}, parity,
                     lambda d: score_artifact(d, test), eta_trained.target, champion, None, "eta_v1")
    assert again.check(METRICS).passed


def test_an_unreadable_champion_refuses_instead_of_waving_through(eta_trained, tmp_path) -> None:
    """A champion whose artifact is gone makes the metrics check fail with what to do."""
    gone = SimpleNamespace(version="eta-gone", path=tmp_path / "missing")
    report = run_gate(RULES, "eta-x", {"targets_met": True}, (np.zeros(2), np.zeros(2)),
                      lambda d: score_artifact(d, eta_trained.frames["test"]), eta_trained.target, gone, None, "eta_v1")
    assert not report.passed and not report.check(METRICS).passed and "cannot score the champion" in \
        report.check(METRICS).message


def test_feature_service_must_be_applied_and_online(feature_store, city_dir, tmp_path) -> None:
    """The materialized store serves eta_v1 (and ranker_v1 with its on-demand view); an unknown service, no
    store, and a store applied but never materialized are refused, each saying to run `make features`."""
    from feature_repo.store import apply, open_store

    served = check_feature_service(feature_store, "eta_v1")
    assert served.passed and served.name == FEATURES and served.figure == served.limit == 4
    assert check_feature_service(feature_store, "ranker_v1").passed
    unknown = check_feature_service(feature_store, "eta_v9")
    assert not unknown.passed and "make features" in unknown.message
    assert not check_feature_service(None, "eta_v1").passed
    fresh = open_store("sqlite", data_dir=tmp_path)
    apply(fresh, data_dir=city_dir)
    unmaterialized = check_feature_service(fresh, "eta_v1")
    assert not unmaterialized.passed and "never materialized" in unmaterialized.message


def test_report_lists_every_check_and_round_trips_to_gate_json(tmp_path) -> None:
    """A report with a failed check: passed False, failed names it, gate.json holds each check's figures."""
    report = run_gate(RULES, "eta-v", {"targets_met": False}, (np.ones(3), np.ones(3)), lambda d: 3.3, tmp_path,
                      None, None, "eta_v1")
    assert [c.name for c in report.checks] == [PARITY, METRICS, FEATURES]
    assert not report.passed and [c.name for c in report.failed] == [METRICS, FEATURES]
    written = json.loads(report.write(tmp_path).read_text())
    assert written["passed"] is False and written["version"] == "eta-v"
    assert {c["name"]: c["passed"] for c in written["checks"]} == {PARITY: True, METRICS: False, FEATURES: False}
    assert report.metrics()["gate_passed"] == 0.0 and report.metrics()["gate_parity_passed"] == 1.0
    assert "FAIL] offline_metrics" in report.summary()
