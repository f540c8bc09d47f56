"""An experiment's report: per-variant live metrics over time, the events, and the decision, drawn.

    python -m monitoring.experiment_report --name eta-2026-12-01 --data-dir data --since <iso|epoch> \
        [--model eta --model ranker] [--events events.json] [--bucket-s 60]

Writes reports/experiments/<name>.png (one panel per model: ETA RMSE, or ranker session conversion
and shadow log loss, per variant and time bucket; events such as "shadow 50 %", "canary 10 %",
"promoted" as vertical lines; the decision in the title) and <name>.html (the picture, each
model's analysis table from monitoring/analysis.py, the events). `events.json`: a list of
{"ts": epoch s, "label": "..."}. The experiment orchestrator calls `render` with its analyses.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from monitoring.analysis import Analysis, DecisionRule, analyse, load_rows, parse_time, timeline
from serving.paths import PROJECT_ROOT

REPORTS = PROJECT_ROOT / "reports" / "experiments"
COLOURS = {"champion": "#1f77b4", "challenger": "#d62728", "shadow": "#ff7f0e"}
ACTION_COLOURS = {"promote": "#2e7d32", "rollback": "#c62828", "continue": "#616161"}


def render(name: str, rows_dir: Path, analyses: list[Analysis], events: list[dict[str, Any]] | None = None,
           out_dir: Path = REPORTS, bucket_s: float = 60.0) -> dict[str, Path]:
    """Draw the analyses (one per model, over their windows) to <out_dir>/<name>.png and .html."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"report name {name!r}: use letters, digits, '.', '_' and '-' only (it names files)")
    if not analyses:
        raise ValueError("no analysis to draw: pass at least one monitoring.analysis.Analysis")
    events = sorted(events or [], key=lambda e: float(e["ts"]))
    t0 = min(a.since for a in analyses)
    panels = [(a, metric) for a in analyses for metric in (("rmse",) if a.model == "eta" else ("conversion", "log_loss"))]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels) + 0.6), squeeze=False, sharex=True)
    for ax, (analysis, metric) in zip(axes[:, 0], panels, strict=True):
        rows = load_rows(rows_dir, analysis.model, analysis.since, analysis.until)
        series = timeline(rows, analysis.model, bucket_s)
        for variant, group in series.groupby("variant") if len(series) else []:
            group = group.dropna(subset=[metric]) if metric in group else group.iloc[0:0]
            if len(group):
                ax.plot((group["bucket"] - t0) / 60, group[metric], marker="o", ms=3,
                        color=COLOURS.get(variant), label=f"{variant} ({', '.join(_versions(analysis, variant))})")
        for event in events:
            ax.axvline((float(event["ts"]) - t0) / 60, color="#9e9e9e", ls="--", lw=0.8)
            ax.annotate(str(event["label"]), ((float(event["ts"]) - t0) / 60, 1), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=7, color="#616161")
        label = {"rmse": "live ETA RMSE (min)", "conversion": "session conversion", "log_loss": "log loss (shown cards)"}
        ax.set_ylabel(label[metric])
        decision = analysis.decision
        ax.set_title(f"{analysis.model}: {decision.action.upper()}", loc="left", fontsize=10,
                     color=ACTION_COLOURS[decision.action])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(f"minutes since {_iso(t0)} (buckets of {bucket_s:g} s)")
    fig.suptitle(f"Experiment {name}", fontsize=12)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    page = out_dir / f"{name}.html"
    page.write_text(_html(name, analyses, events, png.name))
    return {"png": png, "html": page}


def _versions(analysis: Analysis, variant: str) -> list[str]:
    return next((v.versions for v in analysis.variants if v.variant == variant), [])


def _html(name: str, analyses: list[Analysis], events: list[dict[str, Any]], png_name: str) -> str:
    parts = [f"<!doctype html><meta charset=utf-8><title>Courier experiment {html.escape(name)}</title>",
             ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
              "pre{background:#f5f5f5;padding:8px;overflow-x:auto}</style>"),
             f"<h1>Experiment {html.escape(name)}</h1><img src='{html.escape(png_name)}' style='max-width:100%'>"]
    for analysis in analyses:
        d = analysis.decision
        parts.append(f"<h2>{html.escape(analysis.model)}: <span style='color:{ACTION_COLOURS[d.action]}'>"
                     f"{d.action}</span></h2><ul>{''.join(f'<li>{html.escape(r)}</li>' for r in d.reasons)}</ul>"
                     f"<pre>{html.escape(analysis.table())}</pre>")
        rule = analysis.rule
        parts.append(f"<p>Rule: at least {rule.min_samples} per arm, alpha {rule.alpha:g}, minimum effect "
                     f"{rule.min_effect:.0%}, rollback without it after {rule.max_samples}; guard rails: error rate "
                     f"+{rule.max_error_rate_increase:.2%}, p99 +{rule.max_p99_increase_ms:g} ms over the champion.</p>")
    if events:
        rows = "".join(f"<tr><td>{_iso(float(e['ts']))}</td><td>{html.escape(str(e['label']))}</td></tr>"
                       for e in events)
        parts.append(f"<h2>Events</h2><table><tr><th>UTC</th><th>event</th></tr>{rows}</table>")
    return "".join(parts)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """Command line (module doc)."""
    parser = argparse.ArgumentParser(prog="python -m monitoring.experiment_report", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the report's file name (letters, digits, . _ -)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--since", type=parse_time, required=True)
    parser.add_argument("--until", type=parse_time, default=None)
    parser.add_argument("--model", action="append", choices=["eta", "ranker"], help="repeatable (default: eta)")
    parser.add_argument("--events", type=Path, default=None, help='JSON list of {"ts": epoch, "label": text}')
    parser.add_argument("--bucket-s", type=float, default=60.0)
    parser.add_argument("--out-dir", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    rows_dir = args.data_dir / "offline" / "logged"
    analyses = [analyse(rows_dir, args.since, model, DecisionRule(), None, args.until) for model in args.model or ["eta"]]
    events = json.loads(args.events.read_text()) if args.events else []
    paths = render(args.name, rows_dir, analyses, events, args.out_dir, args.bucket_s)
    print(f"report: {paths['png']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
