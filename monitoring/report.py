"""`make monitor-report`: what the monitoring saw, drawn: live ETA error, drift, freshness, over time.

    python -m monitoring.report                  # from a running Prometheus (`make monitor`), last 30 min
    python -m monitoring.report --from-drill     # from the last drift drill (reports/monitoring/drill.json)

Writes <stem>.png (four panels, phases shaded, alerts marked) and <stem>.html (the picture and a table
of the phases and alerts).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from pathlib import Path
from typing import Any

from serving.paths import PROJECT_ROOT

REPORTS = PROJECT_ROOT / "reports" / "monitoring"
PHASE_COLOURS = {"healthy": "#e8f5e9", "rain": "#fff3e0", "no_pushes": "#ffebee"}


def _series(timeline: list[dict], t0: float) -> list[tuple[str, list[float], list[float]]]:
    """(label, minutes since t0, values) of each series of a Prometheus range result."""
    out = []
    for series in timeline or []:
        label = ",".join(f"{v}" for k, v in sorted(series.get("metric", {}).items()) if k != "__name__") or "all"
        points = [(float(t), float(v)) for t, v in series.get("values", []) if v not in ("NaN", "+Inf", "-Inf")]
        if points:
            out.append((label, [(t - t0) / 60 for t, _ in points], [v for _, v in points]))
    return out


def render(result: dict[str, Any], stem: Path) -> dict[str, Path]:
    """Draw a drill result (or any {"timelines", "window", "phases"}) to stem.png and stem.html."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    timelines, window, phases = result.get("timelines", {}), result["window"], result.get("phases", {})
    t0 = window["start"]
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    panels = [
        ("Live ETA error (minutes, 5 min window)", [("RMSE", "eta_rmse"), ("bias", "eta_bias")], "eta_offline_rmse"),
        ("Drift: population stability index against training", [("prediction", "prediction_psi"),
                                                                  ("feature", "feature_psi")], None),
        ("Freshness: age of the newest value against its budget (s, log scale)", [("", "newest_age_s")],
         "freshness_budget_s"),
        ("Feed: conversion and calibration (5 min)", [("conversion", "conversion"), ("calibration", "calibration")], None),
    ]
    for ax, (title, series, reference) in zip(axes, panels):
        for prefix, key in series:
            for label, xs, ys in _series(timelines.get(key, []), t0):
                ax.plot(xs, ys, label=f"{prefix} {label}".strip())
        if reference == "eta_offline_rmse":
            for _, xs, ys in _series(timelines.get(reference, []), t0):
                ax.plot(xs, [1.2 * y for y in ys], "k--", label="alert: 1.2 x offline RMSE")
        elif reference:
            for label, xs, ys in _series(timelines.get(reference, []), t0):
                ax.plot(xs, ys, ":", label=f"budget {label}")
        if title.startswith("Drift"):
            ax.axhline(0.25, color="k", linestyle="--", label="alert: PSI 0.25")
        if title.startswith("Freshness"):
            ax.set_yscale("log")
        _shade(ax, phases, t0, window["end"])
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", ncol=3)
    axes[-1].set_xlabel("minutes since the start")
    fig.suptitle(result.get("title", "Courier monitoring: the drift drill"), fontsize=12)
    fig.tight_layout()
    png = stem.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    page = stem.with_suffix(".html")
    page.write_text(_html(result, png.name))
    return {"png": png, "html": page}


def _shade(ax: Any, phases: dict[str, dict], t0: float, end: float) -> None:
    """Shade each phase and mark when its alert fired."""
    starts = sorted((p["start"], name) for name, p in phases.items() if "start" in p)
    for i, (start, name) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else end
        ax.axvspan((start - t0) / 60, (stop - t0) / 60, color=PHASE_COLOURS.get(name, "#eeeeee"), alpha=0.6, lw=0)
        fired = phases[name].get("fired_after_s")
        if fired is not None:
            ax.axvline((start + fired - t0) / 60, color="r", lw=1)
            ax.annotate(phases[name].get("alert", ""), ((start + fired - t0) / 60, ax.get_ylim()[1]),
                        fontsize=7, color="r", va="top", rotation=90)


def _html(result: dict[str, Any], png_name: str) -> str:
    rows = []
    for name, phase in result.get("phases", {}).items():
        when = time.strftime("%H:%M:%S", time.gmtime(phase.get("start", 0)))
        alert = phase.get("alert") or "(none expected)"
        fired = phase.get("fired_after_s")
        seen = phase.get("alerts_fired", phase.get("alerts_firing", []))
        outcome = (f"fired after {fired} s" if fired is not None else "did not fire") if phase.get("alert") else \
            ("quiet" if not seen else "ALERTS: " + ", ".join(seen))
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{when} UTC</td><td>{html.escape(alert)}</td>"
                    f"<td>{html.escape(outcome)}</td></tr>")
    verdict = {True: "PASSED", False: "FAILED", None: ""}[result.get("passed")]
    return (f"<!doctype html><meta charset=utf-8><title>Courier monitoring report</title>"
            f"<h1>Courier monitoring report {verdict}</h1><p>speed {result.get('speed', 1):g} world s per wall s</p>"
            f"<table border=1 cellpadding=4><tr><th>phase</th><th>from</th><th>alert</th><th>outcome</th></tr>"
            f"{''.join(rows)}</table><p><img src='{png_name}' style='max-width:100%'></p>")


def from_prometheus(url: str, minutes: float) -> dict[str, Any]:
    """The same timelines from a running Prometheus, for the last `minutes`."""
    import httpx

    from monitoring.drill import TIMELINES

    end = time.time()
    start = end - minutes * 60
    timelines = {}
    for name, expr in TIMELINES.items():
        body = httpx.get(f"{url}/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                              "step": 15}, timeout=30).json()
        timelines[name] = body.get("data", {}).get("result", [])
    return {"title": f"Courier monitoring: the last {minutes:g} minutes ({url})", "window": {"start": start, "end": end},
            "timelines": timelines, "phases": {}}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="a running Prometheus (make monitor)")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--from-drill", action="store_true", help="draw the last drift drill instead")
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    if args.from_drill:
        source = args.out / "drill.json"
        if not source.exists():
            raise SystemExit(f"{source} does not exist: run `make drift-drill` first")
        paths = render(json.loads(source.read_text()), args.out / "drill")
    else:
        import httpx

        try:
            result = from_prometheus(args.prometheus, args.minutes)
        except (OSError, ValueError, httpx.HTTPError) as exc:
            raise SystemExit(f"no Prometheus answers at {args.prometheus} ({exc}): start `make monitor`, "
                             "or draw the last drill with --from-drill") from exc
        paths = render(result, args.out / "monitor")
    print(f"report: {paths['png']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
