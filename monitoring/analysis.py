"""Outcome analysis of a model experiment: per-variant live metrics, the tests, and the decision.

From the joined rows the monitor writes (`<data_dir>/offline/logged/`, monitoring/joiner.py), over
a time window (by `prediction_ts`, when the answer was given):

- ETA (`eta_outcomes`), per variant (champion, challenger = canary, shadow): RMSE and MAE with
  percentile-bootstrap 95 % CIs, and the mean signed error (bias).
- ETA challenger vs champion, two comparisons of the mean absolute error (MAE; `DecisionRule.eta_loss`
  "mse" compares squared errors instead):
  * shadow, paired: the requests answered by the champion AND shadowed by the challenger;
    d_i = |e_challenger,i| - |e_champion,i|, mean with a normal CI (CLT) and a two-sided z-test;
  * canary, unpaired: the users on each arm; difference of the means, Welch standard error, z-test.
  Absolute error by default: it is the minutes a customer waits beyond (or short of) the promise, and
  squared errors' heavy tails need far more outcomes to show the same change (measured in the rain
  experiment of docs/lifecycle.md: the paired squared-error difference had a standard deviation of
  28 min^2 against 2.2 min for the absolute one, t = -0.85 against -2.39 on the same 190 pairs).
- Feed (`feed_impressions`, the ranker), per variant: session conversion (a session converts when
  any shown card was ordered) with Wilson CIs, card conversion; canary: the two-proportion z-test
  (pooled standard error) of session conversion, challenger vs champion.
- Ranker shadow, paired on the shown cards (same request and restaurant): the log loss of p_order
  against `ordered`, the per-card difference with a normal CI and a z-test; calibration as orders /
  sum of p_order at position 1 (where the ranker's p(order | shown first) applies) and overall.

The decision (`DecisionRule`, numbers below) judges only comparisons with at least `min_samples`
in each arm (deliveries, shadowed deliveries, sessions, shadowed cards); `improvement` is the
challenger's relative gain (lower MSE or log loss, higher conversion), positive = better:

1. guard rails (error rate and p99 of the challenger, numbers given by the caller, e.g. from
   Prometheus): challenger error rate > champion's + `max_error_rate_increase`, or challenger p99
   > champion's + `max_p99_increase_ms` + `max_p99_increase_ratio` x champion's -> **rollback**,
   whatever the metrics say;
2. any judged comparison significantly worse (p < alpha, improvement < 0) -> **rollback**;
3. a judged comparison significantly better (p < alpha) by at least `min_effect`, none worse, and
   both guard rails measured -> **promote**;
4. every judged comparison at `max_samples` per arm without 3. -> **rollback** (no improvement worth
   having after a full experiment);
5. otherwise (too few samples, not significant yet, guard rails not measured) -> **continue**.

No scipy: the normal distribution is the standard library's (statistics.NormalDist).

    analysis = analyse(Path("data/offline/logged"), since=t0, model="eta", rule=DecisionRule(), guard={...})
    print(analysis.table()); analysis.decision.action  # "promote" | "rollback" | "continue"

    python -m monitoring.analysis --data-dir data --since 2026-12-01T10:00:00Z [--model eta] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import pandas as pd

TABLE_OF_MODEL = {"eta": "eta_outcomes", "ranker": "feed_impressions"}
VARIANTS = ("champion", "challenger", "shadow")
EPS = 1e-6  # p_order clipped to [EPS, 1 - EPS] for the log loss: a 0 or 1 would make it infinite
_NORMAL = NormalDist()


# --- the rule and its inputs ----------------------------------------------------------------------

@dataclass(frozen=True)
class DecisionRule:
    """When an experiment promotes, rolls back or goes on (module doc for the order of the checks)."""

    min_samples: int = 400  # per arm, in each comparison's unit, before it is judged at all
    alpha: float = 0.05  # two-sided significance level of every test
    min_effect: float = 0.02  # relative improvement worth promoting: 2 % lower MSE / log loss, 2 % more conversion
    max_samples: int = 50_000  # per arm: by then a challenger that is not better is rolled back
    max_error_rate_increase: float = 0.001  # absolute: +0.1 percentage point of failed requests
    max_p99_increase_ms: float = 10.0  # challenger p99 may exceed the champion's by this much ...
    max_p99_increase_ratio: float = 0.0  # ... plus this share of the champion's p99 (noisy, loaded machines)
    eta_loss: str = "mae"  # the ETA comparisons' per-request loss: "mae" (|error|) or "mse" (error^2)

    def __post_init__(self) -> None:
        if self.eta_loss not in ("mae", "mse"):
            raise ValueError(f"eta_loss is 'mae' or 'mse', got {self.eta_loss!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_samples < 2 or self.max_samples < self.min_samples:
            raise ValueError(f"need 2 <= min_samples <= max_samples, got {self.min_samples}, {self.max_samples}")
        if min(self.min_effect, self.max_error_rate_increase, self.max_p99_increase_ms,
               self.max_p99_increase_ratio) < 0:
            raise ValueError("min_effect and the guard-rail margins must be >= 0")


@dataclass(frozen=True)
class GuardRails:
    """Serving health of the two versions during the experiment (None: not measured).

    Error rate: failed / answered requests (for a shadow: failed shadow answers / shadowed requests);
    p99 in milliseconds. The caller measures them (e.g. from Prometheus: courier_model_answers_total,
    the shadow failure counter, the latency histograms) and passes numbers."""

    champion_error_rate: float | None = None
    challenger_error_rate: float | None = None
    champion_p99_ms: float | None = None
    challenger_p99_ms: float | None = None

    @classmethod
    def of(cls, guard: GuardRails | dict[str, Any] | None) -> GuardRails:
        """A GuardRails from itself, a dict with the same keys, or None (nothing measured)."""
        if guard is None:
            return cls()
        if isinstance(guard, GuardRails):
            return guard
        unknown = set(guard) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown guard-rail keys {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: None if v is None else float(v) for k, v in guard.items()})

    def breaches(self, rule: DecisionRule) -> list[str]:
        """What the challenger broke, as sentences; [] when nothing (or nothing measured)."""
        found = []
        if self.champion_error_rate is not None and self.challenger_error_rate is not None and \
                self.challenger_error_rate > self.champion_error_rate + rule.max_error_rate_increase:
            found.append(f"guard rail: challenger error rate {self.challenger_error_rate:.4%} > champion's "
                         f"{self.champion_error_rate:.4%} + {rule.max_error_rate_increase:.2%}")
        allowed = rule.max_p99_increase_ms + rule.max_p99_increase_ratio * (self.champion_p99_ms or 0.0)
        if self.champion_p99_ms is not None and self.challenger_p99_ms is not None and \
                self.challenger_p99_ms > self.champion_p99_ms + allowed:
            found.append(f"guard rail: challenger p99 {self.challenger_p99_ms:.1f} ms > champion's "
                         f"{self.champion_p99_ms:.1f} ms + {allowed:g} ms")
        return found

    def measured(self) -> bool:
        """True when both guard rails have both figures."""
        return None not in (self.champion_error_rate, self.challenger_error_rate, self.champion_p99_ms,
                            self.challenger_p99_ms)


# --- the statistics (numpy + the standard library) ------------------------------------------------

def z_of(alpha: float) -> float:
    """The two-sided critical value: 1.96 for alpha 0.05."""
    return _NORMAL.inv_cdf(1 - alpha / 2)


def two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2)) if math.isfinite(z) else 0.0


def wilson(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    z = z_of(alpha)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p) of H0: p1 = p2 with the pooled standard error; z > 0 when p2 > p1."""
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    diff = x2 / n2 - x1 / n1
    if se == 0:
        return (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    z = diff / se
    return z, two_sided_p(z)


def bootstrap_ci(values: np.ndarray, statistic: str, alpha: float = 0.05, n_boot: int = 1000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of "rmse" or "mae" of errors `values`; (nan, nan) for fewer than 2."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    transformed = values * values if statistic == "rmse" else np.abs(values)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # resamples per batch: bounded memory for large windows
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        means[start:start + size] = transformed[rng.integers(0, n, (size, n))].mean(axis=1)
    if statistic == "rmse":
        means = np.sqrt(means)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mean_difference(d: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float, float]:
    """(mean, ci_low, ci_high, two-sided p) of paired differences d (normal approximation)."""
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else math.nan), math.nan, math.nan, math.nan
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    z = z_of(alpha)
    p = two_sided_p(mean / se) if se > 0 else (1.0 if mean == 0 else 0.0)
    return mean, mean - z * se, mean + z * se, p


def welch_difference(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float, float]:
    """(mean(b) - mean(a), ci_low, ci_high, two-sided p) of two independent samples (Welch, normal)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan, math.nan
    diff = float(b.mean() - a.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    z = z_of(alpha)
    p = two_sided_p(diff / se) if se > 0 else (1.0 if diff == 0 else 0.0)
    return diff, diff - z * se, diff + z * se, p


def log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row log loss of probabilities p for 0/1 labels y (p clipped to [EPS, 1 - EPS])."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


# --- the results ---------------------------------------------------------------------------------

@dataclass
class VariantMetrics:
    """Live metrics of one variant over the window (fields of the other model stay None)."""

    variant: str
    versions: list[str]
    n: int  # ETA: deliveries; ranker: sessions
    rmse: float | None = None
    rmse_ci: tuple[float, float] | None = None
    mae: float | None = None
    mae_ci: tuple[float, float] | None = None
    bias: float | None = None
    cards: int | None = None
    conversion: float | None = None  # sessions with an order / sessions
    conversion_ci: tuple[float, float] | None = None
    card_conversion: float | None = None  # ordered cards / cards shown
    log_loss: float | None = None
    calibration_top: float | None = None  # orders at position 1 / sum of p_order at position 1
    calibration_all: float | None = None  # orders / sum of p_order, every shown card


@dataclass
class Comparison:
    """Challenger against champion on one metric: the estimate of (challenger - champion) and its test."""

    name: str  # "eta shadow (paired)", "eta canary", "feed canary", "ranker shadow (paired)"
    metric: str  # "mse", "session conversion", "log loss"
    n_champion: int
    n_challenger: int
    champion: float
    challenger: float
    difference: float  # challenger - champion
    ci: tuple[float, float]
    p_value: float
    improvement: float  # relative gain of the challenger, positive = better
    verdict: str = "too few samples"  # or "better", "worse", "not better by enough", "not significant"

    def judge(self, rule: DecisionRule) -> None:
        """Set the verdict by the rule (module doc)."""
        if min(self.n_champion, self.n_challenger) < rule.min_samples or not math.isfinite(self.p_value):
            self.verdict = "too few samples"
        elif self.p_value < rule.alpha and self.improvement < 0:
            self.verdict = "worse"
        elif self.p_value < rule.alpha and self.improvement >= rule.min_effect:
            self.verdict = "better"
        elif self.p_value < rule.alpha:
            self.verdict = "not better by enough"
        else:
            self.verdict = "not significant"


@dataclass
class Decision:
    """What to do with the challenger, and why."""

    action: Literal["promote", "rollback", "continue"]
    reasons: list[str] = field(default_factory=list)


@dataclass
class Analysis:
    """The outcome of `analyse`: per-variant metrics, the comparisons and the decision."""

    model: str
    since: float
    until: float | None
    rule: DecisionRule
    guard: GuardRails
    variants: list[VariantMetrics]
    comparisons: list[Comparison]
    decision: Decision

    def table(self) -> str:
        """A plain-text report: the variants, the comparisons, the decision."""
        window = f"{_iso(self.since)} .. {_iso(self.until) if self.until else 'now'}"
        lines = [f"{self.model}: {window}"]
        if self.model == "eta":
            lines.append(f"{'variant':<11} {'n':>7} {'RMSE [95% CI]':>24} {'MAE [95% CI]':>24} {'bias':>7}  versions")
            for v in self.variants:
                lines.append(f"{v.variant:<11} {v.n:>7} {_ci(v.rmse, v.rmse_ci):>24} {_ci(v.mae, v.mae_ci):>24} "
                             f"{_num(v.bias):>7}  {', '.join(v.versions)}")
        else:
            lines.append(f"{'variant':<11} {'sessions':>8} {'conversion [95% Wilson]':>26} {'cards':>7} "
                         f"{'log loss':>8} {'calib@1':>7} {'calib':>6}  versions")
            for v in self.variants:
                conversion = "-" if v.conversion is None else _ci(v.conversion, v.conversion_ci, pct=True)
                lines.append(f"{v.variant:<11} {v.n:>8} {conversion:>26} {v.cards or 0:>7} {_num(v.log_loss, 4):>8} "
                             f"{_num(v.calibration_top):>7} {_num(v.calibration_all):>6}  {', '.join(v.versions)}")
        lines.append("")
        for c in self.comparisons:
            lines.append(f"{c.name}: {c.metric} champion {_num(c.champion, 4)} (n={c.n_champion}) vs challenger "
                         f"{_num(c.challenger, 4)} (n={c.n_challenger}); difference {_ci(c.difference, c.ci, 4)}, "
                         f"p={_num(c.p_value, 4)}, improvement {c.improvement:+.1%} -> {c.verdict}")
        if not self.comparisons:
            lines.append("no challenger rows in the window: nothing to compare")
        lines.append("")
        lines.append(f"DECISION: {self.decision.action}")
        lines.extend(f"  - {reason}" for reason in self.decision.reasons)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON-able data (NaN -> None)."""
        return _clean({"model": self.model, "since": self.since, "until": self.until, "rule": asdict(self.rule),
                       "guard": asdict(self.guard), "variants": [asdict(v) for v in self.variants],
                       "comparisons": [asdict(c) for c in self.comparisons],
                       "decision": asdict(self.decision)})


# --- loading ----------------------------------------------------------------------------------

def load_rows(rows_dir: Path, model: str, since: float = 0.0, until: float | None = None) -> pd.DataFrame:
    """The joined rows of `model` ("eta": eta_outcomes, "ranker": feed_impressions) answered in
    [since, until) (by prediction_ts); an empty frame when there are none."""
    if model not in TABLE_OF_MODEL:
        raise ValueError(f"model must be one of {sorted(TABLE_OF_MODEL)}, got {model!r}")
    directory = Path(rows_dir) / TABLE_OF_MODEL[model]
    files = sorted(p for p in directory.glob("part-*.parquet")) if directory.is_dir() else []
    frames = [pd.read_parquet(p) for p in files]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["request_id", "prediction_ts", "model_version", "variant"])
    rows = pd.concat(frames, ignore_index=True)
    if "variant" not in rows:  # rows logged before variants: all the champion's
        rows["variant"] = "champion"
    rows["variant"] = rows["variant"].fillna("champion")
    keep = rows["prediction_ts"] >= since
    if until is not None:
        keep &= rows["prediction_ts"] < until
    return rows[keep].reset_index(drop=True)


# --- the analysis -------------------------------------------------------------------------------

def analyse(rows_dir: Path, since: float, model: str = "eta", rule: DecisionRule | None = None,
            guard: GuardRails | dict[str, Any] | None = None, until: float | None = None,
            n_boot: int = 1000) -> Analysis:
    """Analyse an experiment from the joined rows under `rows_dir` (`<data_dir>/offline/logged`)."""
    return analyse_rows(load_rows(rows_dir, model, since, until), model, rule, guard, since, until, n_boot)


def analyse_rows(rows: pd.DataFrame, model: str = "eta", rule: DecisionRule | None = None,
                 guard: GuardRails | dict[str, Any] | None = None, since: float = 0.0,
                 until: float | None = None, n_boot: int = 1000) -> Analysis:
    """`analyse` on rows already loaded (the columns of monitoring/joiner.py's tables)."""
    rule, guard = rule or DecisionRule(), GuardRails.of(guard)
    if model == "eta":
        variants, comparisons = _eta(rows, rule, n_boot)
    elif model == "ranker":
        variants, comparisons = _ranker(rows, rule)
    else:
        raise ValueError(f"model must be one of {sorted(TABLE_OF_MODEL)}, got {model!r}")
    for comparison in comparisons:
        comparison.judge(rule)
    return Analysis(model, since, until, rule, guard, variants, comparisons, decide(comparisons, guard, rule))


def decide(comparisons: list[Comparison], guard: GuardRails, rule: DecisionRule) -> Decision:
    """The decision of the module doc from judged comparisons and the guard rails."""
    breaches = guard.breaches(rule)
    if breaches:
        return Decision("rollback", breaches)
    judged = [c for c in comparisons if c.verdict != "too few samples"]
    if not judged:
        counts = "; ".join(f"{c.name}: champion {c.n_champion}, challenger {c.n_challenger}" for c in comparisons)
        return Decision("continue", [f"too few samples: need {rule.min_samples} per arm ({counts or 'no challenger rows'})"])
    worse = [c for c in judged if c.verdict == "worse"]
    if worse:
        return Decision("rollback", [f"{c.name}: challenger significantly worse on {c.metric} "
                                     f"({c.improvement:+.1%}, p={c.p_value:.3g})" for c in worse])
    better = [c for c in judged if c.verdict == "better"]
    reasons = [f"{c.name}: {c.verdict} on {c.metric} ({c.improvement:+.1%}, p={c.p_value:.3g})" for c in judged]
    if better and guard.measured():
        return Decision("promote", reasons + ["guard rails within their margins"])
    if better:
        return Decision("continue", [*reasons, ("guard rails not measured: promotion needs the challenger's "
                                                "error rate and p99 next to the champion's")])
    if all(min(c.n_champion, c.n_challenger) >= rule.max_samples for c in judged):
        return Decision("rollback", [*reasons, (f"no improvement of {rule.min_effect:.0%} after "
                                                f"{rule.max_samples} samples per arm")])
    return Decision("continue", reasons)


def _eta(rows: pd.DataFrame, rule: DecisionRule, n_boot: int) -> tuple[list[VariantMetrics], list[Comparison]]:
    variants = []
    for variant in VARIANTS:
        arm = rows[rows["variant"] == variant]
        if arm.empty:
            continue
        errors = arm["error_minutes"].to_numpy(dtype=np.float64)
        variants.append(VariantMetrics(
            variant, sorted(arm["model_version"].astype(str).unique()), len(arm),
            rmse=float(np.sqrt(np.mean(errors ** 2))), rmse_ci=bootstrap_ci(errors, "rmse", rule.alpha, n_boot),
            mae=float(np.mean(np.abs(errors))), mae_ci=bootstrap_ci(errors, "mae", rule.alpha, n_boot, seed=1),
            bias=float(np.mean(errors))))
    comparisons = []
    errors = rows["error_minutes"].astype(float) if len(rows) else None
    loss = rule.eta_loss
    squared = rows.assign(sq=errors ** 2 if loss == "mse" else errors.abs()) if len(rows) else rows
    champion = squared[squared["variant"] == "champion"] if len(rows) else squared
    shadow = squared[squared["variant"] == "shadow"] if len(rows) else squared
    if len(shadow):
        pairs = champion[["request_id", "sq"]].drop_duplicates("request_id").merge(
            shadow[["request_id", "sq"]].drop_duplicates("request_id"), on="request_id", suffixes=("_c", "_s"))
        comparisons.append(_paired("eta shadow (paired)", loss, pairs["sq_c"].to_numpy(), pairs["sq_s"].to_numpy(),
                                   rule))
    challenger = squared[squared["variant"] == "challenger"] if len(rows) else squared
    if len(challenger):
        a, b = champion["sq"].to_numpy(dtype=np.float64), challenger["sq"].to_numpy(dtype=np.float64)
        diff, low, high, p = welch_difference(a, b, rule.alpha)
        base = float(a.mean()) if len(a) else math.nan
        comparisons.append(Comparison("eta canary", loss, len(a), len(b), base, float(b.mean()), diff, (low, high), p,
                                      _relative(-diff, base)))
    return variants, comparisons


def _ranker(rows: pd.DataFrame, rule: DecisionRule) -> tuple[list[VariantMetrics], list[Comparison]]:
    variants, sessions = [], {}
    for variant in VARIANTS:
        arm = rows[rows["variant"] == variant]
        if arm.empty:
            continue
        ordered, p = arm["ordered"].to_numpy(dtype=np.float64), arm["p_order"].to_numpy(dtype=np.float64)
        top = arm[arm["position"] == 1]
        metrics = VariantMetrics(
            variant, sorted(arm["model_version"].astype(str).unique()), int(arm["request_id"].nunique()),
            cards=len(arm), log_loss=float(np.nanmean(log_loss(p, ordered))),
            calibration_top=_ratio(top["ordered"].sum(), top["p_order"].sum()),
            calibration_all=_ratio(ordered.sum(), np.nansum(p)))
        if variant != "shadow":  # a shadow's page was never shown: its conversion is the champion's
            converted = arm.groupby("request_id")["ordered"].max()
            sessions[variant] = (int(converted.sum()), len(converted))
            metrics.conversion = float(converted.mean())
            metrics.conversion_ci = wilson(int(converted.sum()), len(converted), rule.alpha)
            metrics.card_conversion = float(ordered.mean())
        variants.append(metrics)
    comparisons = []
    champion, shadow = rows[rows["variant"] == "champion"], rows[rows["variant"] == "shadow"]
    if len(shadow):
        keys = ["request_id", "restaurant_id"]
        pairs = champion[[*keys, "p_order", "ordered"]].drop_duplicates(keys).merge(
            shadow[[*keys, "p_order"]].drop_duplicates(keys), on=keys, suffixes=("_c", "_s"))
        y = pairs["ordered"].to_numpy(dtype=np.float64)
        comparisons.append(_paired("ranker shadow (paired)", "log loss", log_loss(pairs["p_order_c"], y),
                                   log_loss(pairs["p_order_s"], y), rule))
    if "challenger" in sessions:
        (x1, n1), (x2, n2) = sessions.get("champion", (0, 0)), sessions["challenger"]
        _, p = two_proportion_z(x1, n1, x2, n2)
        p1, p2 = (x1 / n1 if n1 else math.nan), x2 / n2
        se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2) if n1 else math.nan  # unpooled, for the CI
        crit = z_of(rule.alpha)
        comparisons.append(Comparison("feed canary", "session conversion", n1, n2, p1, p2, p2 - p1,
                                      (p2 - p1 - crit * se, p2 - p1 + crit * se), p, _relative(p2 - p1, p1)))
    return variants, comparisons


def _paired(name: str, metric: str, champion: np.ndarray, challenger: np.ndarray, rule: DecisionRule) -> Comparison:
    """A paired comparison of a loss (lower is better): d = challenger - champion per pair."""
    champion, challenger = np.asarray(champion, dtype=np.float64), np.asarray(challenger, dtype=np.float64)
    mean, low, high, p = mean_difference(challenger - champion, rule.alpha)
    base = float(champion.mean()) if len(champion) else math.nan
    return Comparison(name, metric, len(champion), len(challenger), base,
                      float(challenger.mean()) if len(challenger) else math.nan, mean, (low, high), p,
                      _relative(-mean, base))


# --- the timeline for the report --------------------------------------------------------------------

def timeline(rows: pd.DataFrame, model: str, bucket_s: float = 300.0) -> pd.DataFrame:
    """Per time bucket (by prediction_ts) and variant: n and the model's metric (ETA: rmse, mae;
    ranker: conversion of sessions (not for shadow), log loss)."""
    if rows.empty:
        return pd.DataFrame(columns=["bucket", "variant", "n"])
    rows = rows.assign(bucket=(rows["prediction_ts"] // bucket_s) * bucket_s)
    out = []
    for (bucket, variant), group in rows.groupby(["bucket", "variant"]):
        if model == "eta":
            errors = group["error_minutes"].to_numpy(dtype=np.float64)
            out.append({"bucket": bucket, "variant": variant, "n": len(group),
                        "rmse": float(np.sqrt(np.mean(errors ** 2))), "mae": float(np.mean(np.abs(errors)))})
        else:
            converted = group.groupby("request_id")["ordered"].max()
            out.append({"bucket": bucket, "variant": variant, "n": len(converted),
                        "conversion": math.nan if variant == "shadow" else float(converted.mean()),
                        "log_loss": float(np.nanmean(log_loss(group["p_order"], group["ordered"].astype(float))))})
    return pd.DataFrame(out)


# --- helpers --------------------------------------------------------------------------------------

def _relative(gain: float, base: float) -> float:
    return gain / base if base and math.isfinite(base) and math.isfinite(gain) else math.nan


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator and math.isfinite(denominator) else None


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _ci(value: float | None, ci: tuple[float, float] | None, digits: int = 2, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    low, high = ci if ci else (math.nan, math.nan)
    return f"{value * scale:.{digits}f}{unit} [{_num(low * scale, digits)}, {_num(high * scale, digits)}]"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clean(value: Any) -> Any:
    """JSON-able: NaN and inf -> None, tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def parse_time(text: str) -> float:
    """Epoch seconds from epoch seconds or an ISO 8601 time (a time without zone is UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an epoch or ISO 8601 time: {text!r} (e.g. 2026-12-01T10:00:00Z)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def main(argv: list[str] | None = None) -> int:
    """Command line (module doc): print the table and the decision (or --json); exit 0."""
    parser = argparse.ArgumentParser(prog="python -m monitoring.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="joined rows under <data-dir>/offline/logged")
    parser.add_argument("--since", type=parse_time, required=True, help="start of the window: epoch s or ISO 8601")
    parser.add_argument("--until", type=parse_time, default=None, help="end of the window (default: now)")
    parser.add_argument("--model", choices=sorted(TABLE_OF_MODEL), default="eta")
    parser.add_argument("--guard", type=json.loads, default=None,
                        help='guard rails as JSON, e.g. \'{"champion_error_rate": 0.0, "challenger_error_rate": 0.0, '
                             '"champion_p99_ms": 40, "challenger_p99_ms": 42}\'')
    defaults = DecisionRule()
    for name in ("min_samples", "max_samples"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("alpha", "min_effect", "max_error_rate_increase", "max_p99_increase_ms", "max_p99_increase_ratio"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--eta-loss", choices=("mae", "mse"), default=defaults.eta_loss, help="the ETA comparisons' loss")
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON")
    args = parser.parse_args(argv)
    try:
        rule = DecisionRule(**{name: getattr(args, name) for name in DecisionRule.__dataclass_fields__})
        analysis = analyse(args.data_dir / "offline" / "logged", args.since, args.model, rule, args.guard, args.until)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(analysis.to_json(), indent=1) if args.json else analysis.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
