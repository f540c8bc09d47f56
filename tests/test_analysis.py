"""Outcome analysis on constructed data with a known answer: the statistics, the decision, the CLI, the report.

Rows are built the way monitoring/joiner.py writes them (one test goes through the real Joiner and
its parquet files); errors and conversions are drawn with a fixed seed from distributions whose
difference is known, so the right decision is known too.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from monitoring.analysis import (
    DecisionRule,
    GuardRails,
    analyse,
    analyse_rows,
    bootstrap_ci,
    main,
    mean_difference,
    parse_time,
    two_proportion_z,
    wilson,
)
from monitoring.experiment_report import render
from monitoring.joiner import Joiner
from monitoring.metrics import MonitorMetrics

T0 = 1_800_000_000.0
HEALTHY = {"champion_error_rate": 0.0005, "challenger_error_rate": 0.0006, "champion_p99_ms": 40.0,
           "challenger_p99_ms": 43.0}


def eta_rows(n: int, champion_sd: float, other_sd: float, variant: str, seed: int = 0) -> pd.DataFrame:
    """n champion deliveries with errors N(0, champion_sd); the challenger as `variant`: "shadow" (the
    same n requests, errors N(0, other_sd)) or "challenger" (n other requests, a canary arm)."""
    rng = np.random.default_rng(seed)
    champion = pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "variant": "champion",
                             "model_version": "eta-old", "error_minutes": rng.normal(0, champion_sd, n)})
    ids = champion["request_id"] if variant == "shadow" else [f"c{i}" for i in range(n)]
    other = pd.DataFrame({"request_id": ids, "variant": variant, "model_version": "eta-new",
                          "error_minutes": rng.normal(0, other_sd, n)})
    rows = pd.concat([champion, other], ignore_index=True)
    rows["prediction_ts"] = T0 + np.arange(len(rows)) % n
    return rows


def feed_rows(sessions: int, champion_rate: float, challenger_rate: float, seed: int = 0) -> pd.DataFrame:
    """A canary: `sessions` per arm of 3 cards; a session converts (its first card ordered) with the rate."""
    rng = np.random.default_rng(seed)
    rows = []
    for variant, rate in (("champion", champion_rate), ("challenger", challenger_rate)):
        converted = rng.random(sessions) < rate
        for s in range(sessions):
            for position in (1, 2, 3):
                rows.append({"request_id": f"{variant}-{s}", "variant": variant, "model_version": f"ranker-{variant}",
                             "restaurant_id": position, "position": position, "p_order": rate,
                             "ordered": int(converted[s] and position == 1), "prediction_ts": T0 + s})
    return pd.DataFrame(rows)


# --- the statistics ------------------------------------------------------------------------------

def test_wilson_and_the_two_proportion_z_test_match_the_formulas_by_hand() -> None:
    """Wilson for 50/100 at z = 1.96: 0.5 +- 0.0962; z for 100/1000 vs 130/1000 with the pooled p 0.115."""
    low, high = wilson(50, 100)
    z = 1.959963984540054
    half = z / (1 + z * z / 100) * math.sqrt(0.25 / 100 + z * z / 40000)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and wilson(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)  # no zero-width interval
    assert all(math.isnan(v) for v in wilson(0, 0))
    z_value, p = two_proportion_z(100, 1000, 130, 1000)
    by_hand = 0.03 / math.sqrt(0.115 * 0.885 * (2 / 1000))
    assert z_value == pytest.approx(by_hand, rel=1e-12) and z_value == pytest.approx(2.1027, abs=1e-4)
    assert p == pytest.approx(0.0355, abs=1e-4)
    assert two_proportion_z(10, 100, 10, 100) == (0.0, 1.0)


def test_paired_difference_and_bootstrap_intervals_cover_the_known_values() -> None:
    """Differences 1, 2, 3, 4: mean 2.5, se 0.6455; bootstrap CIs as wide as the
    asymptotic ones of normal errors."""
    mean, low, high, p = mean_difference(np.array([1.0, 2.0, 3.0, 4.0]))
    se = math.sqrt(5 / 3) / 2
    assert mean == 2.5 and (low, high) == pytest.approx((2.5 - 1.959964 * se, 2.5 + 1.959964 * se), abs=1e-6)
    assert p == pytest.approx(math.erfc(2.5 / se / math.sqrt(2)), rel=1e-12)
    # normal errors N(0, s): the RMSE's standard error is about s / sqrt(2n), the MAE's s sqrt((1 - 2/pi) / n)
    rng = np.random.default_rng(7)
    for n in (400, 10_000):
        errors = rng.normal(0, 4, n)
        rmse, mae = math.sqrt(np.mean(errors ** 2)), np.mean(np.abs(errors))
        low, high = bootstrap_ci(errors, "rmse")
        assert low < rmse < high and high - low == pytest.approx(2 * 1.96 * 4 / math.sqrt(2 * n), rel=0.15)
        low, high = bootstrap_ci(errors, "mae")
        assert low < mae < high and high - low == pytest.approx(2 * 1.96 * 4 * math.sqrt((1 - 2 / math.pi) / n),
                                                                 rel=0.15)


# --- the decision --------------------------------------------------------------------------------

def test_a_clearly_better_shadow_challenger_is_promoted() -> None:
    """Shadow errors sd 3 vs the champion's 4 on the same 1,000 deliveries: MAE -25 %, MSE 9 vs 16, -44 %."""
    analysis = analyse_rows(eta_rows(1000, 4.0, 3.0, "shadow"), "eta", DecisionRule(), HEALTHY)
    paired = analysis.comparisons[0]
    assert paired.name == "eta shadow (paired)" and paired.n_champion == paired.n_challenger == 1000
    assert paired.metric == "mae" and paired.verdict == "better"
    assert paired.improvement == pytest.approx(1 - 3 / 4, abs=0.08)
    by_squares = analyse_rows(eta_rows(1000, 4.0, 3.0, "shadow"), "eta", DecisionRule(eta_loss="mse"), HEALTHY)
    assert by_squares.comparisons[0].metric == "mse"
    assert by_squares.comparisons[0].improvement == pytest.approx(1 - 9 / 16, abs=0.08)
    assert paired.ci[1] < 0 and paired.p_value < 1e-6
    assert analysis.decision.action == "promote"
    by_variant = {v.variant: v for v in analysis.variants}
    assert by_variant["champion"].rmse == pytest.approx(4, abs=0.25) and by_variant["shadow"].rmse == pytest.approx(3, abs=0.2)
    low, high = by_variant["shadow"].rmse_ci
    assert low < by_variant["shadow"].rmse < high < by_variant["champion"].rmse_ci[0]


def test_a_clearly_worse_canary_is_rolled_back() -> None:
    """Canary errors sd 6 against the champion's 4 (MAE +50 %, MSE 36 vs 16): significantly worse -> rollback."""
    analysis = analyse_rows(eta_rows(1000, 4.0, 6.0, "challenger"), "eta", DecisionRule(), HEALTHY)
    canary = analysis.comparisons[0]
    assert canary.name == "eta canary" and canary.verdict == "worse" and canary.improvement < -0.3
    assert analysis.decision.action == "rollback"
    assert "significantly worse" in analysis.decision.reasons[0]


def test_too_few_samples_continue_even_when_the_challenger_looks_better() -> None:
    """50 shadowed deliveries (rule: 400 per arm): the point estimate is better, the decision waits."""
    analysis = analyse_rows(eta_rows(50, 4.0, 3.0, "shadow"), "eta", DecisionRule(), HEALTHY)
    assert analysis.comparisons[0].verdict == "too few samples"
    assert analysis.decision.action == "continue"
    assert "too few samples: need 400 per arm" in analysis.decision.reasons[0]


def test_a_guard_rail_breach_rolls_back_a_better_challenger() -> None:
    """The better shadow challenger of the first test, but its p99 is 30 ms over the champion's (margin 10)."""
    rows = eta_rows(1000, 4.0, 3.0, "shadow")
    slow = analyse_rows(rows, "eta", DecisionRule(), HEALTHY | {"challenger_p99_ms": 70.0})
    assert slow.comparisons[0].verdict == "better" and slow.decision.action == "rollback"
    assert slow.decision.reasons == ["guard rail: challenger p99 70.0 ms > champion's 40.0 ms + 10 ms"]
    # a relative margin for loaded machines: 10 ms + 50 % of the champion's 40 ms allows 70, not 71
    lenient = DecisionRule(max_p99_increase_ratio=0.5)
    assert analyse_rows(rows, "eta", lenient, HEALTHY | {"challenger_p99_ms": 70.0}).decision.action == "promote"
    assert analyse_rows(rows, "eta", lenient, HEALTHY | {"challenger_p99_ms": 71.0}).decision.action == "rollback"
    failing = analyse_rows(rows, "eta", DecisionRule(), HEALTHY | {"challenger_error_rate": 0.01})
    assert failing.decision.action == "rollback" and "error rate" in failing.decision.reasons[0]
    # guard rails not measured: never promoted blind
    blind = analyse_rows(rows, "eta", DecisionRule(), None)
    assert blind.decision.action == "continue" and "guard rails not measured" in blind.decision.reasons[-1]
    with pytest.raises(ValueError, match="unknown guard-rail keys"):
        GuardRails.of({"p99": 3})


def test_an_equal_challenger_continues_then_is_rolled_back_at_max_samples() -> None:
    """The same error distribution: not significant, so continue; with max_samples reached, rollback."""
    rows = eta_rows(2000, 4.0, 4.0, "challenger", seed=3)
    assert analyse_rows(rows, "eta", DecisionRule(), HEALTHY).decision.action == "continue"
    capped = analyse_rows(rows, "eta", DecisionRule(max_samples=2000), HEALTHY)
    assert capped.decision.action == "rollback" and "no improvement of 2%" in capped.decision.reasons[-1]


def test_feed_canary_conversion_decides_with_wilson_intervals_and_the_z_test() -> None:
    """Session conversion 20 % vs 26 % over 3,000 sessions per arm: +30 %, z about 5 -> promote; reversed -> rollback."""
    analysis = analyse_rows(feed_rows(3000, 0.20, 0.26), "ranker", DecisionRule(), HEALTHY)
    by_variant = {v.variant: v for v in analysis.variants}
    champion, challenger = by_variant["champion"], by_variant["challenger"]
    assert champion.n == 3000 and champion.cards == 9000
    assert champion.conversion_ci[0] < 0.20 < champion.conversion_ci[1]
    assert challenger.conversion_ci[0] < 0.26 < challenger.conversion_ci[1]
    assert champion.calibration_top == pytest.approx(champion.conversion / 0.20)  # p_order 0.2 on the top card
    canary = analysis.comparisons[0]
    assert canary.name == "feed canary" and canary.verdict == "better" and canary.p_value < 1e-4
    assert analysis.decision.action == "promote"
    assert analyse_rows(feed_rows(3000, 0.26, 0.20), "ranker", DecisionRule(), HEALTHY).decision.action == "rollback"


def test_ranker_shadow_log_loss_prefers_the_calibrated_challenger() -> None:
    """Cards ordered with probability q; the shadow predicts q, the champion a constant 0.5: lower log loss wins."""
    rng = np.random.default_rng(4)
    n = 2000
    q = rng.uniform(0.02, 0.4, n)
    ordered = (rng.random(n) < q).astype(int)
    base = {"request_id": [f"s{i // 4}" for i in range(n)], "restaurant_id": np.arange(n) % 4 + 1,
            "position": np.arange(n) % 4 + 1, "ordered": ordered, "prediction_ts": T0}
    rows = pd.concat([pd.DataFrame(base | {"variant": "champion", "model_version": "ranker-old", "p_order": 0.5}),
                      pd.DataFrame(base | {"variant": "shadow", "model_version": "ranker-new", "p_order": q})])
    analysis = analyse_rows(rows, "ranker", DecisionRule(), HEALTHY)
    paired = analysis.comparisons[0]
    assert paired.name == "ranker shadow (paired)" and paired.n_challenger == n and paired.verdict == "better"
    assert paired.champion == pytest.approx(math.log(2))  # -ln 0.5 whatever happened
    shadow = {v.variant: v for v in analysis.variants}["shadow"]
    assert shadow.conversion is None  # a page never shown has no conversion
    assert shadow.calibration_all == pytest.approx(ordered.sum() / q.sum())
    assert analysis.decision.action == "promote"


# --- through the joiner's parquet, the CLI and the report ----------------------------------------

def write_experiment(logged, n: int = 500) -> None:
    """Shadowed /v1/eta requests through the real Joiner: champion 30 min, shadow 33.5, delivered 34 +- noise."""
    joiner = Joiner(MonitorMetrics(), logged, expire_s=60, batch_rows=100)
    rng = np.random.default_rng(5)
    for i in range(n):
        rid, ts = f"x{i}", T0 + i
        joiner.add_prediction({"request_id": rid, "ts": ts, "endpoint": "eta", "model": "eta",
                               "model_version": "eta-old", "variant": "champion", "order_time": ts,
                               "inputs": {"distance_km": 2.0}, "eta_minutes": 30.0})
        joiner.add_outcome({"request_id": rid, "ts": ts + 1800, "kind": "delivery", "scenario": "rain",
                            "delivered_minutes": 34.0 + float(rng.normal(0, 2))})
        # the shadow answer comes after the outcome was joined: it still joins
        joiner.add_prediction({"request_id": rid, "ts": ts + 0.01, "endpoint": "eta", "variant": "shadow",
                               "model_version": "eta-new", "eta_minutes": 33.5})
    joiner.flush()


def test_analysis_reads_the_joined_parquet_and_the_cli_prints_the_decision(tmp_path, capsys) -> None:
    """500 shadowed deliveries joined by the real Joiner: paired on every request; the window cuts by prediction_ts."""
    logged = tmp_path / "data" / "offline" / "logged"
    write_experiment(logged)
    rows = pd.read_parquet(logged / "eta_outcomes")
    assert sorted(rows["variant"].unique()) == ["champion", "shadow"] and len(rows) == 1000
    shadow = rows[rows["variant"] == "shadow"].iloc[0]
    assert shadow["input_distance_km"] == 2.0 and shadow["scenario"] == "rain"  # the request's context
    rule = DecisionRule(min_samples=100)
    analysis = analyse(logged, T0, "eta", rule, HEALTHY)
    assert analysis.comparisons[0].n_challenger == 500 and analysis.decision.action == "promote"
    assert analyse(logged, T0 + 450, "eta", rule, HEALTHY).comparisons[0].n_challenger == 50
    report = analysis.to_json()
    assert json.loads(json.dumps(report))["decision"]["action"] == "promote"
    assert main(["--data-dir", str(tmp_path / "data"), "--since", "2027-01-15T08:00:00Z", "--min-samples", "100",
                 "--guard", json.dumps(HEALTHY)]) == 0
    out = capsys.readouterr().out
    assert "DECISION: promote" in out and "eta shadow (paired)" in out and "eta-new" in out
    assert parse_time("2027-01-15T08:00:00Z") == T0
    assert parse_time(str(T0)) == T0 and parse_time("1970-01-01T00:01:00") == 60.0


def test_experiment_report_draws_the_variants_and_the_decision(tmp_path) -> None:
    """reports/experiments/<name>.png and .html: the picture, the table, the events."""
    logged = tmp_path / "logged"
    write_experiment(logged)
    analysis = analyse(logged, T0, "eta", DecisionRule(min_samples=100), HEALTHY)
    paths = render("test-exp", logged, [analysis], [{"ts": T0 + 100, "label": "shadow 100 %"}], tmp_path / "out")
    assert paths["png"].stat().st_size > 10_000 and paths["png"].read_bytes()[:4] == b"\x89PNG"
    page = paths["html"].read_text()
    assert "promote" in page and "shadow 100 %" in page and "eta shadow (paired)" in page
    with pytest.raises(ValueError, match="report name"):
        render("../escape", logged, [analysis])
