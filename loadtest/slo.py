"""The SLO gate: p99 <= 100 ms and error rate <= 0.1% at the target rate, or a non-zero exit.

    python -m loadtest.slo reports/loadtest/steady.json      # exit 0 (pass) or 1 (fail)

`check` is the logic; the numbers (`slo.p99_ms`, `slo.max_error_rate`, `target_rate`) live in
loadtest/config.yaml. A run that did not actually hold the target rate fails too: an
overloaded server that answers few requests quickly must not pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.config import load_config


@dataclass(frozen=True)
class SLO:
    p99_ms: float = 100.0
    max_error_rate: float = 0.001
    min_rate_ratio: float = 0.97  # answered/offered below this means the rate was not held

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None) -> SLO:
        config = config or load_config()
        slo = config.get("slo", {})
        return cls(p99_ms=float(slo.get("p99_ms", 100.0)), max_error_rate=float(slo.get("max_error_rate", 0.001)),
                   min_rate_ratio=float(slo.get("min_rate_ratio", 0.97)))

    def as_dict(self) -> dict[str, float]:
        return {"p99_ms": self.p99_ms, "max_error_rate": self.max_error_rate, "min_rate_ratio": self.min_rate_ratio}


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons}


def check(summary: dict[str, Any], slo: SLO = SLO(), target_rate: float | None = None) -> GateResult:
    """Gate a run summary (see report.summarize): overall and every endpoint must meet the SLO.

    Every run must answer nearly all it sent (`min_rate_ratio`), or the rate was not held;
    with a target rate, the schedule must also have offered at least that rate (closed-loop
    runs pass target_rate=None).
    """
    reasons: list[str] = []
    if not summary.get("requests"):
        return GateResult(False, ["no requests were measured"])
    groups = {"all": summary, **{f"endpoint {k}": v for k, v in summary.get("endpoints", {}).items()}}
    for label, group in groups.items():
        if not group.get("requests"):
            continue
        p99 = group.get("p99_ms")
        if p99 is None or p99 > slo.p99_ms:
            reasons.append(f"{label}: p99 {p99} ms > {slo.p99_ms:g} ms")
        if group["error_rate"] > slo.max_error_rate:
            reasons.append(f"{label}: error rate {group['error_rate']:.4%} > {slo.max_error_rate:.2%} "
                           f"({group['errors']} of {group['requests']}: {group.get('error_statuses')})")
    if target_rate is not None:
        offered = summary.get("offered_rate") or 0.0
        if offered < target_rate * 0.999:
            reasons.append(f"offered {offered:.1f} req/s is below the target rate {target_rate:g} req/s")
    sent = summary.get("sent_rate") or 0.0  # what the (Poisson) schedule really sent in the window
    achieved = summary.get("achieved_rate") or 0.0
    if sent and achieved < slo.min_rate_ratio * sent:
        reasons.append(f"answered {achieved:.1f} req/s of {sent:.1f} sent (< {slo.min_rate_ratio:.0%}): "
                       "the rate was not held")
    return GateResult(not reasons, reasons)


def check_report(path: Path | str, slo: SLO | None = None) -> GateResult:
    """Gate a report JSON written by a run (its `slo` section names the target, if any)."""
    report = json.loads(Path(path).read_text())
    recorded = report.get("slo", {})
    slo = slo or SLO(p99_ms=recorded.get("p99_ms", 100.0), max_error_rate=recorded.get("max_error_rate", 0.001),
                     min_rate_ratio=recorded.get("min_rate_ratio", 0.97))
    return check(report["summary"], slo, recorded.get("target_rate"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Gate a load-test report on the SLO (exit 1 on failure).")
    parser.add_argument("reports", nargs="+", type=Path)
    args = parser.parse_args(argv)
    failed = False
    for path in args.reports:
        result = check_report(path)
        print(f"{path}: {'PASS' if result.passed else 'FAIL'}")
        for reason in result.reasons:
            print(f"  - {reason}")
        failed |= not result.passed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
