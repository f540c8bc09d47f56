"""The gate: the three checks a trained model must pass before the registry takes it.

    (a) parity          ONNX Runtime's output equals PyTorch's on a held-out batch, within the
                        model's stated tolerance: |onnx - torch| <= atol + rtol * |torch| everywhere.
    (b) offline metrics the model's targets are met (its evaluate module's `targets_met`) AND its
                        comparison metric is not worse than the champion's, both measured by the same
                        code on the candidate's test window (the champion's ONNX artifact is run on
                        the candidate's rows), within a stated margin. No champion yet: targets only.
    (c) feature service the service the model needs exists in the applied Feast registry and every
                        feature view in it is online (online=True and materialized; on-demand views
                        are computed at request time).

`GateReport` holds each check's name, verdict, figure, limit and message; it is written to the
artifact (`gate.json`) and to the registry run. A refused model never reaches the registry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GATE_FILE = "gate.json"
PARITY, METRICS, FEATURES = "parity", "offline_metrics", "feature_service"


@dataclass(frozen=True)
class GateRules:
    """One model's stated limits: parity tolerance and how it is compared with the champion.

    `metric` is the comparison figure (e.g. "rmse"); `higher_is_better` its direction; `margin`
    how much worse than the champion it may be, relative (`relative=True`: 0.02 = 2 %) or absolute.
    """

    model: str
    metric: str
    higher_is_better: bool
    margin: float
    relative: bool
    atol: float
    rtol: float = 0.0
    # False only where the data cannot reach the targets (the tests' tiny city); said in every report
    require_targets: bool = True

    def limit(self, champion: float) -> float:
        """The worst figure a candidate may have against a champion scoring `champion`."""
        slack = self.margin * abs(champion) if self.relative else self.margin
        return champion - slack if self.higher_is_better else champion + slack

    def passes(self, candidate: float, champion: float) -> bool:
        """True when `candidate` is not worse than `champion` beyond the margin."""
        limit = self.limit(champion)
        return candidate >= limit if self.higher_is_better else candidate <= limit


@dataclass
class Check:
    """One check's verdict: what was measured against what limit, and what to do when it failed."""

    name: str
    passed: bool
    figure: Any
    limit: Any
    message: str


@dataclass
class GateReport:
    """The gate's verdict on one candidate version."""

    model: str
    version: str
    checks: list[Check] = field(default_factory=list)
    champion: str | None = None  # the champion's artifact version it was compared with
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        """The checks that refused the candidate."""
        return [c for c in self.checks if not c.passed]

    def check(self, name: str) -> Check:
        """The check called `name`."""
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (gate.json)."""
        return {"model": self.model, "version": self.version, "passed": self.passed, "champion": self.champion,
                "seconds": round(self.seconds, 3), "checks": [asdict(c) for c in self.checks]}

    def write(self, directory: Path) -> Path:
        """gate.json in `directory` (the artifact)."""
        path = Path(directory) / GATE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_plain))
        return path

    def summary(self) -> str:
        """One line per check, for people."""
        lines = [f"gate {'PASSED' if self.passed else 'FAILED'} for {self.version}"]
        lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.message}" for c in self.checks]
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        """Numeric figures for the registry run (`gate_<check>_figure`, `gate_<check>_passed`)."""
        out: dict[str, float] = {"gate_passed": float(self.passed)}
        for c in self.checks:
            out[f"gate_{c.name}_passed"] = float(c.passed)
            if isinstance(c.figure, int | float) and np.isfinite(c.figure):
                out[f"gate_{c.name}_figure"] = float(c.figure)
        return out


class GateRefused(RuntimeError):
    """A candidate failed the gate; `report` says which check and why."""

    def __init__(self, report: GateReport):
        self.report = report
        names = ", ".join(c.name for c in report.failed)
        super().__init__(f"{report.version} refused by the gate ({names}):\n{report.summary()}")


def check_parity(rules: GateRules, torch_out: np.ndarray, onnx_out: np.ndarray) -> Check:
    """(a) ONNX equals PyTorch on the held-out batch within atol + rtol * |torch|."""
    expected = np.asarray(torch_out, dtype=np.float64)
    actual = np.asarray(onnx_out, dtype=np.float64)
    if expected.shape != actual.shape or expected.size == 0:
        return Check(PARITY, False, None, rules.atol,
                     f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape} (or the batch is "
                     "empty): re-export the model and check the exporter's warnings")
    diff = np.abs(actual - expected)
    worst = float(diff.max())
    allowed = rules.atol + rules.rtol * np.abs(expected)
    passed = bool(np.all(diff <= allowed)) and bool(np.isfinite(actual).all())
    where = f"{len(expected)} held-out rows, max |onnx - torch| {worst:.3g} (tolerance {rules.atol:g}"
    where += f" + {rules.rtol:g} x |torch|)" if rules.rtol else ")"
    message = where if passed else (f"{where}: the exported graph does not compute what was trained; check the "
                                    "export (opset, dynamic axes, ops ONNX Runtime runs differently)")
    return Check(PARITY, passed, worst, rules.atol, message)


def check_metrics(rules: GateRules, metrics: dict[str, Any], candidate: float, champion: float | None,
                  champion_version: str | None) -> Check:
    """(b) targets met, and not worse than the champion on the same window beyond the margin."""
    targets = bool(metrics.get("targets_met", False))
    required = targets or not rules.require_targets
    versus = rules.passes(candidate, champion) if champion is not None else True
    figure = float(candidate)
    limit = rules.limit(champion) if champion is not None else None
    optional = "" if rules.require_targets else " (not required by these rules)"
    parts = [f"{rules.metric} {figure:.4g}; targets {'met' if targets else 'NOT met'}{optional}"]
    if champion is None:
        parts.append("no champion yet (bootstrap)")
    else:
        margin = f"{rules.margin:.0%}" if rules.relative else f"{rules.margin:g}"
        parts.append(f"champion {champion_version} scores {champion:.4g} on the same window, limit {limit:.4g} "
                     f"(margin {margin})")
    message = "; ".join(parts)
    if not required:
        message += (": the model misses its offline targets (see reports/<model>/metrics.json); check the labels "
                    "and the training window, or train longer")
    elif not versus:
        message += ": the candidate is worse than the champion; keep the champion, or retrain on more data"
    return Check(METRICS, required and versus, figure, limit, message)


def check_feature_service(store: Any, service: str) -> Check:
    """(c) `service` is in the applied Feast registry and each of its views is online (module doc)."""
    if store is None:
        return Check(FEATURES, False, None, service, f"no feature store to check {service!r} against: run "
                     "`make features` (feast apply + materialize) first")
    try:
        found = store.get_feature_service(service)
    except Exception as exc:  # noqa: BLE001 (feast raises several kinds: registry missing, service unknown)
        return Check(FEATURES, False, None, service,
                     f"feature service {service!r} is not in the applied feature registry ({exc.__class__.__name__}):"
                     " run `make features` (python -m feature_repo.store apply), then materialize")
    offline_views = []
    for projection in found.feature_view_projections:
        name = projection.name
        try:
            view = store.get_feature_view(name)
        except Exception:  # noqa: BLE001 (feast's not-found types vary by version; try the on-demand kind)
            try:
                store.get_on_demand_feature_view(name)  # computed at request time: nothing to serve ahead
                continue
            except Exception:  # noqa: BLE001 (neither kind: not applied)
                offline_views.append(f"{name} (not applied)")
                continue
        if not view.online:
            offline_views.append(f"{name} (online=False)")
        elif not view.materialization_intervals:
            offline_views.append(f"{name} (never materialized)")
    n = len(found.feature_view_projections)
    if offline_views:
        return Check(FEATURES, False, n - len(offline_views), n,
                     f"{service}: not served: {', '.join(offline_views)}; run `make features` (apply + materialize)")
    return Check(FEATURES, True, n, n, f"{service}: {n} feature views applied and online")


def run_gate(rules: GateRules, version: str, metrics: dict[str, Any], parity: tuple[np.ndarray, np.ndarray],
             score: Callable[[Path], float], candidate_dir: Path, champion: Any | None, store: Any,
             service: str) -> GateReport:
    """All three checks on a staged candidate; `score(artifact_dir)` is the model's comparison metric of an
    artifact on the candidate's test window, `champion` a RegisteredModel (or None)."""
    started = time.perf_counter()
    report = GateReport(rules.model, version, champion=getattr(champion, "version", None))
    report.checks.append(check_parity(rules, *parity))
    candidate = score(Path(candidate_dir))
    champion_figure = None
    if champion is not None:
        try:
            champion_figure = score(Path(champion.path))
        except Exception as exc:  # noqa: BLE001 (an unreadable champion must not wave a candidate through)
            report.checks.append(Check(METRICS, False, float(candidate), None,
                                       f"cannot score the champion {champion.version} at {champion.path}: {exc}; "
                                       "restore its artifact or re-register a champion"))
            report.checks.append(check_feature_service(store, service))
            report.seconds = time.perf_counter() - started
            return report
    report.checks.append(check_metrics(rules, metrics, candidate, champion_figure, report.champion))
    report.checks.append(check_feature_service(store, service))
    report.seconds = time.perf_counter() - started
    return report


def _plain(value: Any) -> Any:
    """numpy scalars in gate.json."""
    return value.item() if hasattr(value, "item") else str(value)
