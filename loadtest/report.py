"""The one module that turns raw request records into numbers, JSON reports and plots.

Every run (open-loop scenarios, Locust, the chaos drill, the benchmark) reports through here:
percentiles come from the raw per-request latencies with numpy, never from histogram buckets.

    summary = summarize(records, offered_rate=150, window=(5, 65))
    write_run_report("steady", summary, records, ...)  # reports/loadtest/steady.json + .png
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.records import CONNECTION_ERROR, TIMEOUT, Records
from serving.paths import PROJECT_ROOT

REPORTS = PROJECT_ROOT / "reports"
PERCENTILES = (50, 95, 99)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (load generator and server share it)."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
        info["load_avg_at_report"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, IndexError, ValueError):
        pass
    return info


def latency_stats(latency_ms: np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99/max/mean in ms from raw latencies (None when there are none)."""
    if len(latency_ms) == 0:
        return {**{f"p{p}_ms": None for p in PERCENTILES}, "max_ms": None, "mean_ms": None}
    values = np.percentile(latency_ms, PERCENTILES)
    out = {f"p{p}_ms": round(float(v), 3) for p, v in zip(PERCENTILES, values)}
    out["max_ms"] = round(float(latency_ms.max()), 3)
    out["mean_ms"] = round(float(latency_ms.mean()), 3)
    return out


def _group(records: Records, seconds: float, offered_rate: float | None) -> dict[str, Any]:
    ok = records.ok
    n = len(records)
    errors = int(n - ok.sum())
    statuses: dict[str, int] = {}
    for code, count in zip(*np.unique(records.status[~ok], return_counts=True)):
        label = {CONNECTION_ERROR: "connection_error", TIMEOUT: "timeout"}.get(int(code), str(int(code)))
        statuses[label] = int(count)
    out: dict[str, Any] = {
        "requests": n,
        "offered_rate": None if offered_rate is None else round(offered_rate, 3),
        "sent_rate": round(n / seconds, 3) if seconds > 0 else None,
        "achieved_rate": round(float(ok.sum()) / seconds, 3) if seconds > 0 else None,
        "errors": errors,
        "error_rate": round(errors / n, 6) if n else 0.0,
        "error_statuses": statuses,
        "retried": int((records.attempts > 1).sum()),
        "first_attempt_errors": int((~((records.first_status >= 200) & (records.first_status < 300))).sum()),
        "degraded": int(records.degraded.sum()),
        **latency_stats(records.latency_ms),
    }
    return out


def summarize(records: Records, *, offered_rate: float | None = None, window: tuple[float, float] | None = None,
              mask: np.ndarray | None = None, seconds: float | None = None) -> dict[str, Any]:
    """Totals and per-endpoint stats of the requests scheduled inside `window` (and `mask`).

    Latency counts every request, failed ones included (an error is not fast); rates are per
    second of the window (or `seconds`, when the mask leaves out part of it). `offered_rate` is
    the scheduled rate (None for closed-loop runs).
    """
    keep = np.ones(len(records), dtype=bool) if mask is None else mask.copy()
    if window is None:
        window = (float(records.scheduled.min()) if len(records) else 0.0,
                  float(records.scheduled.max()) + 1e-9 if len(records) else 0.0)  # the last one included
    keep &= (records.scheduled >= window[0]) & (records.scheduled < window[1])
    selected = records.select(keep)
    seconds = max(seconds if seconds is not None else window[1] - window[0], 1e-9)
    lag = (selected.started - selected.scheduled) * 1000
    share = {name: float(np.mean(selected.endpoint == i)) if len(selected) else 0.0
             for i, name in enumerate(selected.endpoints)}
    summary = {
        "window_s": [round(window[0], 3), round(window[1], 3)],
        **_group(selected, seconds, offered_rate),
        "generator_lag_p99_ms": round(float(np.percentile(lag, 99)), 3) if len(lag) else None,
        "endpoints": {},
    }
    for i, name in enumerate(selected.endpoints):
        part = selected.select(selected.endpoint == i)
        rate = None if offered_rate is None else offered_rate * share[name]
        summary["endpoints"][name] = _group(part, seconds, rate)
    return summary


def timeseries(records: Records, bin_s: float = 1.0, end: float | None = None) -> dict[str, list]:
    """Per-second series: sent, ok answers, errors (by schedule), p50/p99 (by schedule)."""
    if len(records) == 0:
        return {"t": [], "sent": [], "ok": [], "errors": [], "p50_ms": [], "p99_ms": []}
    end = end if end is not None else float(max(records.scheduled.max(), records.finished.max()))
    edges = np.arange(0.0, end + bin_s, bin_s)
    which = np.clip(np.digitize(records.scheduled, edges) - 1, 0, len(edges) - 1)
    done = np.clip(np.digitize(records.finished, edges) - 1, 0, len(edges) - 1)
    lat = records.latency_ms
    ok = records.ok
    out: dict[str, list] = {"t": [], "sent": [], "ok": [], "errors": [], "p50_ms": [], "p99_ms": []}
    for b in range(len(edges) - 1):
        sel = which == b
        out["t"].append(round(float(edges[b]), 3))
        out["sent"].append(round(int(sel.sum()) / bin_s, 3))
        out["ok"].append(round(int((ok & (done == b)).sum()) / bin_s, 3))
        out["errors"].append(round(int((~ok & sel).sum()) / bin_s, 3))
        if sel.any():
            p50, p99 = np.percentile(lat[sel], [50, 99])
            out["p50_ms"].append(round(float(p50), 3))
            out["p99_ms"].append(round(float(p99), 3))
        else:
            out["p50_ms"].append(None)
            out["p99_ms"].append(None)
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value)}")


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def write_run_report(name: str, summary: dict[str, Any], records: Records, *, out_dir: Path | None = None,
                     offered: dict[str, list] | None = None, replicas: Sequence[dict[str, Any]] = (),
                     events: Sequence[dict[str, Any]] = (), windows: Sequence[dict[str, Any]] = (),
                     slo: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                     raw: bool = True, cpu: Sequence[dict[str, Any]] = ()) -> dict[str, Path]:
    """reports/loadtest/<name>.json (summary, series, replicas, events) and <name>.png.

    offered: {"t": [...], "rate": [...]} (the schedule); replicas: [{"t", "counts": {dep: n}}];
    events: [{"t", "label"}] (kills, steps); windows: [{"start", "end", "label"}] (warm-up, recovery);
    cpu: [{"t", "busy_cores", "foreign_cores"}] per second (other people's work on the shared cores).
    `raw` also writes the raw records next to it as <name>.npz.
    """
    out_dir = Path(out_dir or REPORTS / "loadtest")
    series = timeseries(records)
    payload = {
        "name": name,
        "machine": machine(),
        "started_at_unix": round(records.wall_start, 3),
        "summary": summary,
        **({"slo": slo} if slo else {}),
        **(extra or {}),
        "events": list(events),
        "windows": list(windows),
        "replicas": list(replicas),
        "series": series,
        **({"offered": offered} if offered else {}),
        **({"cpu": list(cpu)} if cpu else {}),
    }
    paths = {"json": write_json(out_dir / f"{name}.json", payload)}
    if raw:
        paths["raw"] = out_dir / f"{name}.npz"
        np.savez_compressed(paths["raw"], endpoints=np.array(records.endpoints), endpoint=records.endpoint,
                            scheduled=records.scheduled, started=records.started, finished=records.finished,
                            status=records.status, first_status=records.first_status, attempts=records.attempts,
                            degraded=records.degraded)
    paths["png"] = plot_run(out_dir / f"{name}.png", name, series, offered=offered, replicas=replicas,
                            events=events, windows=windows, slo_ms=(slo or {}).get("p99_ms"), cpu=cpu)
    return paths


def load_raw(path: Path) -> Records:
    data = np.load(path)
    return Records([str(e) for e in data["endpoints"]], data["endpoint"], data["scheduled"], data["started"],
                   data["finished"], data["status"], data["first_status"], data["attempts"], data["degraded"])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(path: Path, title: str, series: dict[str, list], *, offered: dict[str, list] | None = None,
             replicas: Sequence[dict[str, Any]] = (), events: Sequence[dict[str, Any]] = (),
             windows: Sequence[dict[str, Any]] = (), slo_ms: float | None = None,
             cpu: Sequence[dict[str, Any]] = ()) -> Path:
    """Latency (p50/p99 per second) and throughput over time, plus replica counts and CPU when given."""
    plt = _plt()
    panels = 3 if replicas else 2
    fig, axes = plt.subplots(panels, 1, figsize=(11, 3.0 * panels), sharex=True, constrained_layout=True)
    t = np.asarray(series["t"], dtype=float)
    p50 = np.array([np.nan if v is None else v for v in series["p50_ms"]], dtype=float)
    p99 = np.array([np.nan if v is None else v for v in series["p99_ms"]], dtype=float)
    ax = axes[0]
    ax.plot(t, p50, label="p50", lw=1.2)
    ax.plot(t, p99, label="p99", lw=1.2)
    if slo_ms:
        ax.axhline(slo_ms, color="red", ls="--", lw=1, label=f"SLO p99 {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (by send time)")
    ax.set_title(title)
    ax = axes[1]
    if offered:
        ax.step(offered["t"], offered["rate"], where="post", color="gray", lw=1, label="offered (schedule)")
    ax.plot(t, series["ok"], label="answered OK", lw=1.2)
    if any(series["errors"]):
        ax.plot(t, series["errors"], label="errors", color="red", lw=1.2)
    ax.set_ylabel("requests / s")
    if cpu:
        twin = ax.twinx()
        twin.plot([c["t"] for c in cpu], [c["busy_cores"] for c in cpu], color="gray", lw=0.8, ls="--",
                  label="cores busy (all)")
        twin.plot([c["t"] for c in cpu], [c["foreign_cores"] for c in cpu], color="purple", lw=0.8, ls=":",
                  label="cores used by other work")
        twin.set_ylabel("cores")
        twin.set_ylim(0, max(2.0, max(c["busy_cores"] for c in cpu) * 1.1))
        twin.legend(loc="upper left", fontsize=8)
    if replicas:
        ax = axes[2]
        deployments = sorted({d for sample in replicas for d in sample["counts"]})
        end = max(float(t.max()) if len(t) else 0.0, replicas[-1]["t"])  # the last count lasts to the end
        rt = [s["t"] for s in replicas] + [end]
        for dep in deployments:
            counts = [s["counts"].get(dep, 0) for s in replicas]
            ax.step(rt, counts + counts[-1:], where="post", label=dep)
        ax.set_ylabel("running replicas")
        ax.set_ylim(bottom=0)
    for ax in axes:
        for window in windows:
            ax.axvspan(window["start"], window["end"], color="orange", alpha=0.12, lw=0)
        for event in events:
            ax.axvline(event["t"], color="black", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    for event in events:
        axes[0].annotate(event["label"], (event["t"], 1), xycoords=("data", "axes fraction"), rotation=90,
                         fontsize=7, va="top", ha="right")
    if len(t):  # replica events before the run (start-up) are in the JSON, not in the picture
        axes[-1].set_xlim(min(-2.0, float(t.min()) - 2), float(t.max()) + 2)
    axes[-1].set_xlabel("seconds since start")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bench(path: Path, results: dict[str, dict[str, Any]], slo_ms: float) -> Path:
    """p50 and p99 against offered rate, one line per serving variant."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for name, result in results.items():
        points = [p for p in result.get("points", []) if p.get("p99_ms") is not None]
        if not points:
            continue
        rates = [p["offered_rate"] for p in points]
        axes[0].plot(rates, [p["p50_ms"] for p in points], marker="o", ms=3, label=name)
        axes[1].plot(rates, [p["p99_ms"] for p in points], marker="o", ms=3, label=name)
    for ax, label in zip(axes, ("p50", "p99")):
        ax.set_yscale("log")
        ax.set_xlabel("offered rate, req/s (open loop)")
        ax.set_ylabel(f"{label} latency, ms")
        ax.axhline(slo_ms, color="red", ls="--", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ETA pipeline served five ways, same load generator, same machine")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
