"""The monitor: PSI, the join and its counters, the offline log, drift, freshness, the CLI.

Real parts: Redis at 127.0.0.1:6379 with stream keys of each test's own (deleted afterwards), a
Feast SQLite store in a tmp dir, prometheus_client's registry and HTTP server.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
import redis
import yaml

from models.eta.features import FEATURE_NAMES
from monitoring.drift import DriftMonitor
from monitoring.joiner import SCHEMAS, Joiner, ParquetLog
from monitoring.metrics import MonitorMetrics
from monitoring.monitor import Monitor, MonitorSettings
from monitoring.reference import (
    REFERENCE_FILE,
    Artifacts,
    build_entry,
    build_reference,
    expected_shares,
    hour_of_day,
    psi,
    write_reference,
)
from monitoring.streams import StreamConsumer
from serving.launch import free_port

PROJECT = Path(__file__).resolve().parent.parent


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def client():
    """The local Redis; the test's keys are deleted afterwards."""
    r = redis.Redis(host="127.0.0.1", port=6379)
    try:
        r.ping()
    except redis.ConnectionError:
        pytest.fail("the monitor tests need Redis on 127.0.0.1:6379 (`make services` starts one)")
    yield r
    for key in r.scan_iter(match=f"courier-test-monitor:{os.getpid()}:*"):
        r.delete(key)


@pytest.fixture
def keys() -> dict[str, str]:
    """Stream keys and a group of this test's own."""
    prefix = f"courier-test-monitor:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return {"predictions": f"{prefix}:predictions", "outcomes": f"{prefix}:outcomes", "group": "monitor-test"}


ETA_VERSION = "eta-20260101000000-abcdef"


@pytest.fixture
def monitor_artifacts(tmp_path) -> Path:
    """An artifact root with one ETA version holding what the monitor reads: a manifest (offline RMSE
    3.5, feature service eta_v1) and a drift reference. No `current` link: versions are found by name."""
    directory = tmp_path / "artifacts" / "eta" / ETA_VERSION
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"name": "eta", "version": ETA_VERSION,
                                                         "feature_service": "eta_v1", "metrics": {"rmse": 3.5}}))
    rng = np.random.default_rng(1)
    write_reference(directory, {"distance_km": rng.uniform(0, 5, 5000), "congestion_ratio": rng.uniform(0, 1, 5000)},
                    {"eta_minutes": rng.normal(30, 5, 5000)})
    return tmp_path / "artifacts"


def settings_for(keys: dict[str, str], **changes) -> MonitorSettings:
    """The project's monitor settings on the test's streams, with small windows and batches."""
    raw = yaml.safe_load((PROJECT / "monitoring" / "config.yaml").read_text())
    raw["streams"].update(predictions=keys["predictions"], outcomes=keys["outcomes"], group=keys["group"],
                          block_ms=50)
    raw["drift"].update(min_count=50, window=200)
    for path, value in changes.items():
        section, name = path.split("__")
        raw[section][name] = value
    return MonitorSettings.model_validate(raw)


def eta_record(rid: str, eta: float, version: str = "eta-20260101000000-abcdef", distance: float = 2.0,
               congestion: float = 0.5, order_time: float | None = 1795000000.0) -> dict:
    """A /v1/eta prediction record as serving logs it."""
    inputs = {name: 0.0 for name in FEATURE_NAMES} | {"distance_km": distance, "congestion_ratio": congestion}
    return {"request_id": rid, "ts": time.time(), "endpoint": "eta", "model": "eta", "model_version": version,
            "variant": None, "restaurant_id": 7, "delivery_lat": 52.37, "delivery_lon": 4.9,
            "order_time": order_time, "area_id": "871969b0cffffff", "inputs": inputs, "eta_minutes": eta,
            "degraded": False, "expired_features": ["restaurant_load_15m"]}


def delivery(rid: str, minutes: float) -> dict:
    """A delivery outcome as the live city reports it."""
    return {"request_id": rid, "ts": time.time(), "kind": "delivery", "delivered_minutes": minutes,
            "true_eta_minutes": minutes - 1, "scenario": "normal"}


def feed_record(rid: str, cards: list[tuple[int, float]], version: str = "ranker-v") -> dict:
    """A /v1/feed prediction record: cards as (restaurant_id, p_order) in page order."""
    return {"request_id": rid, "ts": time.time(), "endpoint": "feed", "model": "ranker", "model_version": version,
            "model_versions": {"retrieval": "retrieval-v", "ranker": version, "eta": "eta-v"}, "variant": None,
            "user_id": 3, "user_lat": 52.36, "user_lon": 4.88, "request_time": 1795000000.0, "cold_start": False,
            "degraded": False, "cards": [{"restaurant_id": r, "position": i, "p_order": p, "eta_minutes": 25.0,
                                          "sponsored": i == 3} for i, (r, p) in enumerate(cards, start=1)]}


def xadd(client: redis.Redis, key: str, record: dict) -> None:
    client.xadd(key, {"r": orjson.dumps(record)})


# --- PSI and the reference ----------------------------------------------------------------------

def test_psi_is_zero_for_the_same_data_and_matches_a_hand_computed_shift() -> None:
    """0..999 in 10 quantile bins of 0.1; values 0..499 fill the first five at 0.2 and leave five empty."""
    entry = build_entry(np.arange(1000), bins=10)
    assert entry["shares"] == pytest.approx([0.1] * 10) and entry["missing_share"] == 0.0
    assert psi(entry, np.arange(1000)) == pytest.approx(0.0, abs=1e-12)
    # (0.2 - 0.1) ln(0.2 / 0.1) for five bins + (1e-4 - 0.1) ln(1e-4 / 0.1) for the five empty ones
    by_hand = 5 * 0.1 * math.log(2) + 5 * (0.1 - 1e-4) * math.log(0.1 / 1e-4)
    assert psi(entry, np.arange(500)) == pytest.approx(by_hand, rel=1e-9)
    # a mild shift: 100 values move from the last bin into the first
    mild = np.concatenate([np.arange(900), np.arange(100)])
    assert psi(entry, mild) == pytest.approx(0.1 * math.log(2) + (0.1 - 1e-4) * math.log(0.1 / 1e-4), rel=1e-9)


def test_reference_bins_are_open_ended_and_handle_constant_and_missing_values() -> None:
    """Values beyond the training range land in the end bins; a constant gets two bins; NaN/None its own."""
    entry = build_entry(np.arange(1000), bins=10)
    assert psi(entry, [-1e9] * 100 + [1e9] * 100) > 1  # counted in the first and last bins, not lost
    constant = build_entry([3.0] * 80 + [None] * 20)
    assert constant["edges"] == [3.0] and constant["shares"] == [0.8, 0.0]
    assert constant["missing_share"] == pytest.approx(0.2)
    assert psi(constant, [3.0] * 8 + [float("nan")] * 2) == pytest.approx(0.0, abs=1e-12)
    assert psi(constant, [4.0] * 10) > 1
    empty = build_reference({"x": [None, None]})["x"]
    assert empty["edges"] == [] and empty["missing_share"] == 1.0
    assert math.isnan(psi(entry, []))


def two_hour_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n values at 03:00 UTC, uniform on [0, 1), and n at 19:00, uniform on [2, 3): (values, hours)."""
    values = np.concatenate([rng.uniform(0, 1, n), rng.uniform(2, 3, n)])
    return values, np.repeat([3, 19], n)


def test_an_hour_conditioned_reference_compares_a_window_with_the_hours_it_covers() -> None:
    """A window of the 19:00 distribution: PSI ~0 against the hour-mixture, large against all hours pooled."""
    rng = np.random.default_rng(5)
    values, hours = two_hour_sample(rng, 5000)
    entry = build_entry(values, bins=10, hours=hours)
    assert set(entry["by_hour"]) == {"3", "19"}  # hours with rows only
    for hour in ["3", "19"]:
        by_hour = entry["by_hour"][hour]
        assert by_hour["count"] == 5000 and sum(by_hour["shares"]) + by_hour["missing_share"] == pytest.approx(1)
    # the same global edges: 03:00 fills the five lower bins, 19:00 the five upper ones
    assert entry["by_hour"]["3"]["shares"][5:] == [0.0] * 5 and entry["by_hour"]["19"]["shares"][:5] == [0.0] * 5
    live = rng.uniform(2, 3, 1000)
    at_19 = np.full(1000, 19)
    assert psi(entry, live, at_19) < 0.02
    assert psi(entry, live) > 2  # the global shares: five bins at 0.1 the window leaves empty
    # a window covering both hours, as much of each: the mixture is the global distribution again
    both, both_hours = two_hour_sample(rng, 500)
    assert psi(entry, both, both_hours) < 0.02 and psi(entry, both) < 0.02
    # a reference written before the hourly shares: the global shares, hours or not
    old = {k: v for k, v in entry.items() if k != "by_hour"}
    assert psi(old, live, at_19) == pytest.approx(psi(entry, live), rel=1e-12)
    # an hour the reference has too few rows of (< 50) is described by the global shares
    sparse_values, sparse_hours = np.concatenate([values, rng.uniform(2, 3, 20)]), np.append(hours, [12] * 20)
    sparse = build_entry(sparse_values, bins=10, hours=sparse_hours)
    assert sparse["by_hour"]["12"]["count"] == 20
    assert psi(sparse, live, np.full(1000, 12)) == pytest.approx(psi(sparse, live), rel=1e-12)
    with pytest.raises(ValueError, match="one hour per value"):
        psi(entry, live, at_19[:10])
    with pytest.raises(ValueError, match="integers 0-23"):
        build_entry(values, hours=hours.astype(float))


def test_the_hour_mixture_weights_each_hour_by_its_share_of_the_window() -> None:
    """Hourly shares (0.75, 0.25) at 00:00 and (0.25, 0.75) at 01:00, mixed 3:1 by the window, by hand."""
    entry = build_entry([0, 0, 0, 1] + [0, 1, 1, 1], bins=2, hours=[0] * 4 + [1] * 4)
    assert entry["edges"] == [0.0] and entry["shares"] == [0.5, 0.5]
    assert entry["by_hour"]["0"]["shares"] == [0.75, 0.25] and entry["by_hour"]["1"]["shares"] == [0.25, 0.75]
    # e = 3/4 * (0.75, 0.25) + 1/4 * (0.25, 0.75), then the (empty) missing-value bin
    assert expected_shares(entry, [0, 0, 0, 1], min_hour_count=1) == pytest.approx([0.625, 0.375, 0.0])
    # an hour without reference rows (05:00) and an unknown one (-1) weigh in with the global shares
    assert expected_shares(entry, [0, 0, 5, -1], min_hour_count=1) == pytest.approx(
        [0.5 * 0.75 + 0.5 * 0.5, 0.5 * 0.25 + 0.5 * 0.5, 0.0])
    # four rows per hour are under the default minimum (50): every hour falls back to the global shares
    assert expected_shares(entry, [0, 0, 0, 1]) == pytest.approx([0.5, 0.5, 0.0])
    assert expected_shares(entry) == pytest.approx([0.5, 0.5, 0.0])
    # the window (0, 0, 1, 1) against (0.625, 0.375); the missing bins are both at the 1e-4 floor
    by_hand = (0.5 - 0.625) * math.log(0.5 / 0.625) + (0.5 - 0.375) * math.log(0.5 / 0.375)
    assert psi(entry, [0, 0, 1, 1], [0, 0, 0, 1], min_hour_count=1) == pytest.approx(by_hand, rel=1e-12)
    assert psi(entry, [0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # the UTC hour of epoch seconds
    assert hour_of_day(0.0) == 0 and hour_of_day(25 * 3600 + 59 * 60) == 1 and hour_of_day(-1.0) == 23
    assert hour_of_day(None) == -1 and hour_of_day([3600.0 * 19, math.nan]).tolist() == [19, -1]


def test_trained_artifacts_carry_their_drift_reference(eta_trained, ranker_trained) -> None:
    """reference.json: the ETA inputs of the training rows and the test predictions; the ranker's p_order."""
    from models.eta.features import build_inputs
    from models.eta.train import model_columns

    eta = json.loads((eta_trained.artifact_dir / REFERENCE_FILE).read_text())
    for name in ["distance_km", "open_orders_15m", "congestion_ratio", "prep_time_mean_7d", "log1p_area_orders_15m"]:
        entry = eta["features"][name]
        assert entry["count"] == eta_trained.n_train
        assert sum(entry["shares"]) + entry["missing_share"] == pytest.approx(1.0)
    assert eta["predictions"]["eta_minutes"]["count"] == len(eta_trained.frames["test"])
    # the training rows as the model got them: their PSI against the reference is zero
    manifest = json.loads((eta_trained.artifact_dir / "manifest.json").read_text())
    dense = build_inputs(model_columns(eta_trained.frames["train"]), manifest["feature_defaults"])["dense"]
    for i, name in enumerate(FEATURE_NAMES):
        assert psi(eta["features"][name], dense[:, i]) == pytest.approx(0.0, abs=1e-9), name
    # ... and per UTC hour of the order: the rows of the busiest hour match that hour's shares
    hours = hour_of_day(model_columns(eta_trained.frames["train"])["order_time"])
    busiest = np.bincount(hours).argmax()
    for i, name in enumerate(FEATURE_NAMES):
        by_hour = eta["features"][name]["by_hour"]
        assert sum(h["count"] for h in by_hour.values()) == eta_trained.n_train
        assert by_hour[str(busiest)]["count"] == (hours == busiest).sum()
        at_busiest = hours == busiest
        assert psi(eta["features"][name], dense[at_busiest, i], hours[at_busiest]) == pytest.approx(0.0, abs=1e-9)
    test_hours = hour_of_day(model_columns(eta_trained.frames["test"])["order_time"])
    by_hour = eta["predictions"]["eta_minutes"]["by_hour"]
    assert {int(h): e["count"] for h, e in by_hour.items()} == {
        int(h): int(n) for h, n in enumerate(np.bincount(test_hours, minlength=24)) if n}
    ranker = json.loads((ranker_trained.artifact_dir / REFERENCE_FILE).read_text())
    p_order = ranker["predictions"]["p_order"]
    assert p_order["count"] == len(ranker_trained.frames["test"]) and 0 <= p_order["edges"][0] <= 1


# --- the join, its counters and the offline log ------------------------------------------------

def test_eta_and_feed_counters_add_up(tmp_path) -> None:
    """Errors, squares and absolute errors per version; impressions, orders and the top slot per position."""
    metrics = MonitorMetrics()
    joiner = Joiner(metrics, tmp_path / "logged", expire_s=60)
    pairs = [("a", 20.0, 23.0), ("b", 30.0, 28.0), ("c", 25.0, 25.5)]
    for rid, predicted, delivered in pairs:
        joiner.add_prediction(eta_record(rid, predicted))
        joiner.add_outcome(delivery(rid, delivered))
    v = {"model_version": "eta-20260101000000-abcdef", "variant": "champion"}  # no variant logged: the champion
    assert metrics.value("courier_eta_outcomes_total", v) == 3
    assert metrics.value("courier_eta_error_minutes_total", v) == pytest.approx(3 - 2 + 0.5)
    assert metrics.value("courier_eta_abs_error_minutes_total", v) == pytest.approx(3 + 2 + 0.5)
    assert metrics.value("courier_eta_squared_error_minutes2_total", v) == pytest.approx(9 + 4 + 0.25)
    joiner.add_prediction(feed_record("f1", [(11, 0.3), (12, 0.1), (13, 0.05)]))
    joiner.add_outcome({"request_id": "f1", "ts": time.time(), "kind": "feed", "ordered": [11, 13],
                        "scenario": "normal"})
    joiner.add_prediction(feed_record("f2", [(12, 0.2), (11, 0.1)]))
    joiner.add_outcome({"request_id": "f2", "ts": time.time(), "kind": "feed", "ordered": [], "scenario": "normal"})
    r = {"model_version": "ranker-v", "variant": "champion"}
    assert metrics.value("courier_feed_impressions_total", r | {"position": "1"}) == 2
    assert metrics.value("courier_feed_impressions_total", r | {"position": "3"}) == 1
    assert metrics.value("courier_feed_orders_total", r | {"position": "1"}) == 1
    assert metrics.value("courier_feed_orders_total", r | {"position": "3"}) == 1
    assert metrics.value("courier_feed_orders_total", r | {"position": "2"}) is None
    assert metrics.value("courier_feed_top_predicted_orders_total", r) == pytest.approx(0.5)
    assert metrics.value("courier_feed_top_orders_total", r) == 1
    assert metrics.value("courier_joined_records_total", {"endpoint": "eta"}) == 3
    assert metrics.value("courier_joined_records_total", {"endpoint": "feed"}) == 2


def test_unjoined_halves_expire_and_are_counted(tmp_path) -> None:
    """A prediction without outcome and an outcome without prediction are dropped after expire_s; a
    redelivered record is not counted twice; beyond max_pending the oldest goes."""
    now = [1000.0]
    metrics = MonitorMetrics()
    joiner = Joiner(metrics, None, expire_s=60, max_pending=2, clock=lambda: now[0])
    joiner.add_prediction(eta_record("lonely", 20.0))
    joiner.add_outcome(delivery("orphan", 20.0))
    now[0] += 59
    assert joiner.expire() == 0
    now[0] += 2
    assert joiner.expire() == 2
    assert metrics.value("courier_unjoined_expired_total", {"endpoint": "eta", "kind": "prediction"}) == 1
    assert metrics.value("courier_unjoined_expired_total", {"endpoint": "eta", "kind": "outcome"}) == 1
    assert joiner.add_outcome(delivery("orphan", 20.0)) is False  # too late: it waits again
    joiner.add_prediction(eta_record("x", 20.0))
    assert joiner.add_outcome(delivery("x", 21.0)) is True
    assert joiner.add_outcome(delivery("x", 21.0)) is False  # redelivered after a restart: ignored
    assert metrics.value("courier_eta_outcomes_total", {"model_version": ETA_VERSION, "variant": "champion"}) == 1
    for rid in ("p1", "p2", "p3"):
        joiner.add_prediction(feed_record(rid, [(1, 0.1)]))
    assert list(joiner.predictions) == ["p2", "p3"]
    assert metrics.value("courier_unjoined_expired_total", {"endpoint": "feed", "kind": "prediction"}) == 1


def test_each_prediction_record_of_a_request_becomes_rows_with_its_variant(tmp_path) -> None:
    """A canary answer, a champion answer shadowed before and after its outcome, a shadowed feed: one row
    per record, variant column and labels; a shadow page counts for top-slot calibration, not conversion."""
    metrics = MonitorMetrics()
    joiner = Joiner(metrics, tmp_path / "logged", expire_s=60)
    joiner.add_prediction(eta_record("canary", 20.0, "eta-new") | {"variant": "challenger"})
    joiner.add_outcome(delivery("canary", 22.0))
    joiner.add_prediction(eta_record("early", 30.0) | {"variant": "champion"})
    joiner.add_prediction({"request_id": "early", "endpoint": "eta", "variant": "shadow", "model_version": "eta-new",
                           "eta_minutes": 33.0, "ts": time.time()})  # the shadow comes before the outcome
    assert joiner.add_outcome(delivery("early", 34.0)) is True
    joiner.add_prediction(eta_record("late", 30.0) | {"variant": "champion"})
    joiner.add_outcome(delivery("late", 31.0))
    shadow = {"request_id": "late", "endpoint": "eta", "variant": "shadow", "model_version": "eta-new",
              "eta_minutes": 31.5, "ts": time.time()}
    assert joiner.add_prediction(shadow) is True  # after its outcome was joined: it still joins
    assert joiner.add_prediction(shadow) is False and joiner.stats["duplicates"] == 1  # redelivered
    new = {"model_version": "eta-new"}
    assert metrics.value("courier_eta_outcomes_total", new | {"variant": "challenger"}) == 1
    assert metrics.value("courier_eta_outcomes_total", new | {"variant": "shadow"}) == 2
    assert metrics.value("courier_eta_squared_error_minutes2_total", new | {"variant": "shadow"}) == 1 + 0.25
    assert metrics.value("courier_eta_outcomes_total", {"model_version": ETA_VERSION, "variant": "champion"}) == 2
    assert metrics.value("courier_joined_records_total", {"endpoint": "eta"}) == 5

    joiner.add_prediction(feed_record("f", [(11, 0.3), (12, 0.1)]) | {"variant": "champion"})
    joiner.add_outcome({"request_id": "f", "ts": time.time(), "kind": "feed", "ordered": [11], "scenario": "normal"})
    joiner.add_prediction({"request_id": "f", "endpoint": "feed", "variant": "shadow", "model_version": "ranker-new",
                           "restaurant_ids": [12, 11], "p_order": [0.2, 0.5], "ts": time.time()})
    shadow_labels = {"model_version": "ranker-new", "variant": "shadow"}
    assert metrics.value("courier_feed_impressions_total", shadow_labels | {"position": "1"}) is None
    assert metrics.value("courier_feed_top_predicted_orders_total", shadow_labels) == pytest.approx(0.5)
    assert metrics.value("courier_feed_top_orders_total", shadow_labels) == 1
    joiner.flush()

    eta = pd.read_parquet(tmp_path / "logged" / "eta_outcomes").sort_values(["request_id", "variant"])
    assert eta[["request_id", "variant", "model_version", "error_minutes"]].values.tolist() == [
        ["canary", "challenger", "eta-new", 2.0], ["early", "champion", ETA_VERSION, 4.0],
        ["early", "shadow", "eta-new", 1.0], ["late", "champion", ETA_VERSION, 1.0], ["late", "shadow", "eta-new", -0.5]]
    late_shadow = eta[(eta.request_id == "late") & (eta.variant == "shadow")].iloc[0]
    assert late_shadow.input_distance_km == 2.0 and late_shadow.restaurant_id == 7  # the request's context
    feed = pd.read_parquet(tmp_path / "logged" / "feed_impressions").sort_values(["variant", "position"])
    assert feed[["variant", "model_version", "restaurant_id", "position", "p_order", "ordered"]].values.tolist() == [
        ["champion", "ranker-v", 11, 1, 0.3, 1], ["champion", "ranker-v", 12, 2, 0.1, 0],
        ["shadow", "ranker-new", 11, 1, 0.5, 1], ["shadow", "ranker-new", 12, 2, 0.2, 0]]
    assert set(feed["retrieval_version"]) == {"retrieval-v"}


def test_the_monitor_finds_each_version_by_name_without_a_current_link(client, keys, monitor_artifacts) -> None:
    """No artifacts/<model>/current: the offline RMSE and the reference of every version the log names
    are read from <artifacts>/eta/<model_version>/, including a version that appears later."""
    monitor = Monitor(settings_for(keys), client, monitor_artifacts.parent / "data", monitor_artifacts)
    assert not (monitor_artifacts / "eta" / "current").exists() and monitor.artifacts["eta"].versions() == [ETA_VERSION]
    assert monitor._take("predictions", eta_record("a", 30.0) | {"variant": "champion"})
    assert monitor.metrics.value("courier_eta_offline_rmse_minutes", {"model_version": ETA_VERSION}) == 3.5
    newer = "eta-20260102000000-123456"
    (monitor_artifacts / "eta" / newer).mkdir()
    (monitor_artifacts / "eta" / newer / "manifest.json").write_text(json.dumps({"name": "eta", "version": newer,
                                                                           "metrics": {"rmse": 3.1}}))
    monitor._take("predictions", {"request_id": "b", "endpoint": "eta", "variant": "shadow", "model_version": newer,
                                  "eta_minutes": 29.0})
    assert monitor.metrics.value("courier_eta_offline_rmse_minutes", {"model_version": newer}) == 3.1
    assert monitor.artifacts["eta"].reference(ETA_VERSION)["predictions"]["eta_minutes"]["count"] == 5000
    assert monitor.artifacts["eta"].manifest("../eta") is None  # a version is a folder name, nothing else


def test_monitor_joins_from_redis_in_either_order_and_appends_parquet(client, keys, tmp_path, monitor_artifacts) -> None:
    """Outcome first or prediction first, both join; the offline log holds one row per delivery and per
    card with the stated columns; the metrics are served over HTTP; offline RMSE comes from the manifest."""
    settings = settings_for(keys, offline_log__batch_rows=3)
    monitor = Monitor(settings, client, tmp_path / "data", monitor_artifacts)
    monitor.consumer.ensure_groups()
    xadd(client, keys["outcomes"], delivery("late-pred", 31.0))  # the outcome comes first
    xadd(client, keys["predictions"], eta_record("late-pred", 30.0))
    xadd(client, keys["predictions"], eta_record("early-pred", 20.0))
    xadd(client, keys["outcomes"], delivery("early-pred", 24.0))
    xadd(client, keys["predictions"], feed_record("feed-1", [(5, 0.2), (6, 0.1)]))
    xadd(client, keys["outcomes"], {"request_id": "feed-1", "ts": time.time(), "kind": "feed", "ordered": [6],
                                    "scenario": "rain"})
    client.xadd(keys["outcomes"], {"r": b"not json"})
    while monitor.step():
        pass
    monitor.joiner.flush()
    assert monitor.read == {"predictions": 3, "outcomes": 4, "bad": 1}
    assert client.xpending(keys["outcomes"], keys["group"])["pending"] == 0  # all acknowledged, the bad one too
    version = "eta-20260101000000-abcdef"
    assert monitor.metrics.value("courier_eta_squared_error_minutes2_total",
                                 {"model_version": version, "variant": "champion"}) == 17
    assert monitor.metrics.value("courier_eta_offline_rmse_minutes", {"model_version": version}) == 3.5
    assert monitor.metrics.value("courier_model_age_budget_seconds", {"model": "eta"}) == 604800

    logged = tmp_path / "data" / "offline" / "logged"
    eta = pd.read_parquet(logged / "eta_outcomes")
    assert list(eta.columns) == SCHEMAS["eta_outcomes"].names
    assert sorted(eta["request_id"]) == ["early-pred", "late-pred"]
    row = eta.set_index("request_id").loc["early-pred"]
    assert (row.error_minutes, row.delivery_minutes, row.input_distance_km) == (4.0, 24.0, 2.0)
    assert row.event_timestamp == pd.Timestamp(1795000000.0, unit="s", tz="UTC")
    assert row.expired_features == "restaurant_load_15m"
    feed = pd.read_parquet(logged / "feed_impressions")
    assert list(feed.columns) == SCHEMAS["feed_impressions"].names
    assert feed[["restaurant_id", "position", "ordered"]].values.tolist() == [[5, 1, 0], [6, 2, 1]]
    assert set(feed["scenario"]) == {"rain"}
    assert all(p.name.startswith("part-") for p in logged.rglob("*") if p.is_file())  # no temp file left

    port = free_port()
    server, _ = monitor.metrics.serve(port, addr="127.0.0.1")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
    assert f'courier_eta_outcomes_total{{model_version="{version}",variant="champion"}} 2.0' in text
    assert 'courier_offline_rows_appended_total{table="feed_impressions"} 2.0' in text


def test_an_unwritable_offline_store_keeps_the_rows_and_retries_later(tmp_path) -> None:
    """A write that fails (a file where the table's folder should be) keeps the rows and waits batch_s."""
    now = [0.0]
    blocked = tmp_path / "eta_outcomes"
    blocked.write_text("not a folder")
    log = ParquetLog(blocked, "eta_outcomes", MonitorMetrics(), batch_rows=1, batch_s=5, clock=lambda: now[0])
    log.append([{"request_id": "a"}])
    log.append([{"request_id": "b"}])  # within the back-off: not tried again
    assert [r["request_id"] for r in log.rows] == ["a", "b"] and not log.files
    blocked.unlink()
    now[0] = 6
    log.flush_if_due()
    assert pd.read_parquet(blocked)["request_id"].tolist() == ["a", "b"] and not log.rows


def test_a_restarted_consumer_gets_what_it_had_not_acknowledged(client, keys) -> None:
    """Entries read but not acknowledged (a crash) come back first to the same consumer."""
    streams = {"predictions": keys["predictions"], "outcomes": keys["outcomes"]}
    first = StreamConsumer(client, streams, keys["group"], consumer="c1")
    first.ensure_groups()
    first.ensure_groups()  # idempotent
    xadd(client, keys["predictions"], eta_record("r1", 10.0))
    assert [e.record["request_id"] for e in first.read(block_ms=10)] == ["r1"]  # ... and it dies here
    again = StreamConsumer(client, streams, keys["group"], consumer="c1")
    entries = again.read(block_ms=10)
    assert [e.record["request_id"] for e in entries] == ["r1"]
    again.ack(entries)
    assert again.read(block_ms=10) == []


# --- drift --------------------------------------------------------------------------------------

def test_drift_psi_is_small_for_the_training_distribution_and_large_for_a_shift(monitor_artifacts) -> None:
    """Windows of logged predictions drawn like the reference stay under 0.1; a shifted input exceeds 0.25."""
    metrics = MonitorMetrics()
    drift = DriftMonitor(metrics, {"eta": Artifacts(monitor_artifacts / "eta")}, window=2000, min_count=500,
                         eta_features=["distance_km", "congestion_ratio"])
    rng = np.random.default_rng(2)
    version = "eta-20260101000000-abcdef"
    for i in range(1000):
        drift.observe(eta_record(f"r{i}", float(rng.normal(30, 5)), version, distance=float(rng.uniform(0, 5))))
    drift.update()
    labels = {"model": "eta", "model_version": version}
    assert metrics.value("courier_prediction_psi", labels) < 0.1
    assert metrics.value("courier_feature_psi", labels | {"feature": "distance_km"}) < 0.1
    for i in range(2000):  # the whole window now holds longer trips
        drift.observe(eta_record(f"s{i}", float(rng.normal(30, 5)), version, distance=float(rng.uniform(3, 8))))
    drift.update()
    assert metrics.value("courier_feature_psi", labels | {"feature": "distance_km"}) > 0.25
    assert metrics.value("courier_prediction_psi", labels) < 0.1
    # congestion_ratio is 0.5 in every record: a point mass against a uniform reference
    assert metrics.value("courier_feature_psi", labels | {"feature": "congestion_ratio"}) > 0.25
    drift.observe(feed_record("f", [(1, 0.1)]))  # a ranker version without an artifact: no gauge, no error
    drift.update()
    assert metrics.value("courier_prediction_psi", {"model": "ranker", "model_version": "ranker-v"}) is None


def test_drift_compares_a_window_with_the_training_hours_it_covers(tmp_path) -> None:
    """Night (03:00) and dinner (19:00) differ in ETA and congestion: a healthy dinner window stays near 0."""
    version = "eta-20260102000000-fedcba"
    directory = tmp_path / "eta" / version
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"name": "eta", "version": version}))
    rng = np.random.default_rng(3)
    n = 3000
    hours = np.repeat([3, 19], n)
    congestion = np.concatenate([rng.uniform(0, 0.3, n), rng.uniform(0.6, 1.0, n)])
    eta = np.concatenate([rng.normal(20, 3, n), rng.normal(40, 3, n)])
    write_reference(directory, {"congestion_ratio": congestion}, {"eta_minutes": eta},
                    hours={"features": hours, "predictions": hours})
    metrics = MonitorMetrics()
    drift = DriftMonitor(metrics, {"eta": Artifacts(tmp_path / "eta")}, window=600, min_count=300,
                         eta_features=["congestion_ratio"])
    dinner = datetime(2026, 11, 30, 19, tzinfo=UTC).timestamp()
    window = [(float(rng.normal(40, 3)), float(rng.uniform(0.6, 1.0))) for _ in range(600)]
    for i, (minutes, ratio) in enumerate(window):
        drift.observe(eta_record(f"d{i}", minutes, version, congestion=ratio, order_time=dinner + 5 * i))
    found = drift.update()[("eta", version)]
    labels = {"model": "eta", "model_version": version}
    assert found["eta_minutes"] < 0.1 and metrics.value("courier_prediction_psi", labels) < 0.1
    assert metrics.value("courier_feature_psi", labels | {"feature": "congestion_ratio"}) < 0.1
    # the same window against all hours pooled: what the gauge showed before the hourly reference
    reference = json.loads((directory / REFERENCE_FILE).read_text())
    assert psi(reference["predictions"]["eta_minutes"], [m for m, _ in window]) > 0.25
    assert psi(reference["features"]["congestion_ratio"], [r for _, r in window]) > 0.25
    # the city's dinner turns into night-time values at dinner time: drift
    for i in range(600):
        drift.observe(eta_record(f"n{i}", float(rng.normal(20, 3)), version, congestion=float(rng.uniform(0, 0.3)),
                                 order_time=dinner + 5 * i))
    drift.update()
    assert metrics.value("courier_prediction_psi", labels) > 0.25
    assert metrics.value("courier_feature_psi", labels | {"feature": "congestion_ratio"}) > 0.25


# --- freshness ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fresh_store(tmp_path_factory, city_dir):
    """A Feast store of the small city's definitions with an empty SQLite online store of its own."""
    from feature_repo.store import apply, open_store

    store = open_store("sqlite", data_dir=tmp_path_factory.mktemp("freshness"))
    apply(store, data_dir=city_dir)
    return store


def test_freshness_ages_and_budgets_match_known_timestamps(fresh_store, city_dir) -> None:
    """Newest age = now - newest pushed timestamp; +Inf for an empty view; budgets 2 x cadence or the TTL, / S."""
    from monitoring.freshness import FreshnessProbe, served_views

    now = 1_800_000_000.0
    restaurants = pd.read_parquet(city_dir / "offline" / "restaurants.parquet")["restaurant_id"].unique()
    stamps = [now - 500] * len(restaurants)
    stamps[3] = now - 120  # the newest
    fresh_store.write_to_online_store("restaurant_load_15m", pd.DataFrame({
        "restaurant_id": restaurants, "open_orders_15m": 1,
        "event_timestamp": [datetime.fromtimestamp(s, UTC) for s in stamps]}))
    areas = pd.read_parquet(city_dir / "offline" / "area_congestion.parquet", columns=["area_id"])["area_id"].unique()
    fresh_store.write_to_online_store("area_congestion_15m", pd.DataFrame({
        "area_id": areas[:5], "area_orders_15m": 2, "couriers_on_shift": 3, "congestion_ratio": 0.5,
        "event_timestamp": datetime.fromtimestamp(now - 1000, UTC)}))
    views = served_views(fresh_store, ["eta_v1"])
    assert {v.name for v in views} == {"restaurant_profile", "restaurant_prep_7d", "restaurant_load_15m",
                                       "area_congestion_15m"}
    metrics = MonitorMetrics()
    probe = FreshnessProbe(fresh_store, views, city_dir / "offline", metrics,
                           {"restaurant_id": "restaurants", "area_id": "area_congestion"}, push_cadence_s=300,
                           time_scale=60, clock=lambda: now)
    ages = probe.probe()
    assert ages["restaurant_load_15m"] == 120
    assert ages["area_congestion_15m"] == 1000
    assert ages["restaurant_prep_7d"] == math.inf  # nothing materialized
    value = metrics.value
    assert value("courier_feature_view_newest_age_seconds", {"view": "restaurant_load_15m"}) == 120
    assert value("courier_feature_view_ttl_seconds", {"view": "area_congestion_15m"}) == 900
    assert value("courier_feature_view_freshness_budget_seconds", {"view": "area_congestion_15m"}) == 600 / 60
    # batch views are refreshed on the wall clock: their budget (the TTL) is not compressed
    assert value("courier_feature_view_freshness_budget_seconds", {"view": "restaurant_prep_7d"}) == 7 * 86400
    assert value("courier_feature_view_ttl_seconds", {"view": "restaurant_profile"}) == math.inf


def test_monitor_in_threads_probes_the_served_views_and_stops_cleanly(client, keys, tmp_path, monitor_artifacts,
                                                                      fresh_store, city_dir) -> None:
    """The drill's API: start(port) runs join and freshness in threads behind /metrics; stop() writes the rows."""
    data_dir = tmp_path / "data"
    (data_dir / "offline").mkdir(parents=True)
    for table in ("restaurants", "area_congestion"):  # the entity keys the probe reads
        (data_dir / "offline" / f"{table}.parquet").symlink_to(city_dir / "offline" / f"{table}.parquet")
    monitor = Monitor(settings_for(keys, freshness__every_s=0.2), client, data_dir, monitor_artifacts,
                      time_scale=60, store=fresh_store)
    assert {v.name for v in monitor.freshness.views} == {"restaurant_profile", "restaurant_prep_7d",
                                                         "restaurant_load_15m", "area_congestion_15m"}
    port = free_port()
    monitor.start(port, addr="127.0.0.1")
    try:
        xadd(client, keys["predictions"], eta_record("threaded", 30.0))
        xadd(client, keys["outcomes"], delivery("threaded", 29.0))
        deadline, text = time.monotonic() + 30, ""
        while time.monotonic() < deadline and not ('courier_joined_records_total{endpoint="eta"} 1.0' in text
                                                   and "courier_feature_view_newest_age_seconds{" in text):
            time.sleep(0.1)
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'courier_joined_records_total{endpoint="eta"} 1.0' in text
        assert 'courier_feature_view_freshness_budget_seconds{view="restaurant_load_15m"} 10.0' in text
        assert monitor.alive()
    finally:
        monitor.stop()
    assert not monitor.alive()
    assert pd.read_parquet(data_dir / "offline" / "logged" / "eta_outcomes")["error_minutes"].tolist() == [-1.0]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")


# --- the command line ---------------------------------------------------------------------------

def test_cli_serves_metrics_and_stops_cleanly_on_sigterm(client, keys, tmp_path, monitor_artifacts) -> None:
    """python -m monitoring: joins from its streams, answers /metrics, exits 0 on SIGTERM after writing rows."""
    config = yaml.safe_load((PROJECT / "monitoring" / "config.yaml").read_text())
    config["streams"].update(predictions=keys["predictions"], outcomes=keys["outcomes"], group=keys["group"])
    (tmp_path / "monitor.yaml").write_text(yaml.safe_dump(config))
    serve = yaml.safe_load((PROJECT / "serving" / "serve_config.yaml").read_text())
    serve["applications"][0]["args"].update(artifacts=str(monitor_artifacts), feed=None, prediction_log=None)
    serve["applications"][0]["args"].pop("model_dir", None)  # gone with the registry (issue 12)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve))
    port = free_port()
    xadd(client, keys["predictions"], eta_record("cli", 30.0))
    xadd(client, keys["outcomes"], delivery("cli", 33.0))
    process = subprocess.Popen(
        [sys.executable, "-m", "monitoring", "--data-dir", str(tmp_path / "data"), "--port", str(port),
         "--online-store", "none", "--serve-config", str(tmp_path / "serve.yaml"), "--config",
         str(tmp_path / "monitor.yaml"), "--redis", "127.0.0.1:6379"],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, text, joined = time.monotonic() + 60, "", 'courier_joined_records_total{endpoint="eta"} 1.0'
        while joined not in text and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.HTTPError:
                time.sleep(0.2)
        assert joined in text
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, out
    assert "monitor ready" in out and "monitor stopped" in out
    assert len(pd.read_parquet(tmp_path / "data" / "offline" / "logged" / "eta_outcomes")) == 1
