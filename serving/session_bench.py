"""Measure ONNX Runtime session options on the served ETA model (`make bench-onnx`).

Runs each candidate configuration in this process, interleaved round by round so that
machine noise hits them alike, and prints a Markdown table of per-call latency for a
single request (batch 1) and a batch of 256.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.artifact import ONNX_FILE
from serving.onnx_model import OnnxModel, session_options
from serving.paths import resolve

CANDIDATES = {
    "1 thread, no spin, ALL (shipped)": dict(threads=1, spin="0", level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    "1 thread, spin": dict(threads=1, spin="1", level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    "2 threads, no spin": dict(threads=2, spin="0", level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    "2 threads, spin (ORT default)": dict(threads=2, spin="1", level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    "1 thread, no spin, BASIC": dict(threads=1, spin="0", level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
}


def _session(path: Path, threads: int, spin: str, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = session_options(threads)
    options.graph_optimization_level = level
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _inputs(model: OnnxModel, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {}
    for spec in model.input_specs():
        shape = [batch if d == -1 else d for d in spec["shape"]]
        arrays[spec["name"]] = (rng.integers(0, 100, shape).astype(np.int64) if spec["datatype"] == "INT64"
                                else rng.normal(size=shape).astype(np.float32))
    return arrays


def measure(model_dir: Path, rounds: int, calls: int) -> dict[str, dict[int, np.ndarray]]:
    """Per-call latencies (µs) for every candidate and batch size."""
    model = OnnxModel(model_dir)
    rng = np.random.default_rng(0)
    sessions = {name: _session(model.directory / ONNX_FILE, **opts) for name, opts in CANDIDATES.items()}
    batches = {1: _inputs(model, 1, rng), 256: _inputs(model, 256, rng)}
    results = {name: {b: [] for b in batches} for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for batch, inputs in batches.items():
                session.run(None, inputs)  # warm
                for _ in range(calls):
                    start = time.perf_counter_ns()
                    session.run(None, inputs)
                    results[name][batch].append((time.perf_counter_ns() - start) / 1000)
    return {name: {b: np.asarray(v) for b, v in per.items()} for name, per in results.items()}


def main(argv: list[str] | None = None) -> None:
    """Print the comparison table (Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="an ETA artifact directory (default: the registry's champion)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args(argv)
    if args.model_dir is None:
        from models.registry import Registry

        args.model_dir = Registry().resolve("eta", "champion").path
    results = measure(resolve(args.model_dir), args.rounds, args.calls)
    shipped = next(iter(results))
    print(f"ONNX Runtime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.rounds} interleaved rounds x {args.calls} calls\n")
    print("| session options | batch 1 p50 µs | batch 1 p99 µs | batch 256 p50 µs | batch 256 p99 µs | batch-1 p50 vs shipped |")
    print("|---|---|---|---|---|---|")
    base = np.median(results[shipped][1])
    for name, per in results.items():
        cells = [f"{np.percentile(per[b], q):.1f}" for b in (1, 256) for q in (50, 99)]
        print(f"| {name} | {' | '.join(cells)} | {np.median(per[1]) / base:.2f}x |")


if __name__ == "__main__":
    main()
