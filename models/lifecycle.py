"""The one lifecycle of every Courier model: train -> export -> parity -> manifest -> gate -> register.

Each model module (models/<name>/train.py) supplies only what differs: a `build(stage)` function
that fits the network on a `DataWindow`, exports it to ONNX into the staging folder, evaluates it
(through ONNX Runtime, as served) and writes the manifest, returning a `Staged` (metrics, the
parity batch's PyTorch and ONNX outputs, and `score(artifact_dir)`: the model's comparison metric
of any artifact on this candidate's test rows). The lifecycle does the rest, the same way for all:

    staging folder -> build (seeded, deterministic torch) -> gate (models/gate.py) -> gate.json ->
    rename to `<artifacts>/<name>/<version>` -> register with lineage -> alias

Aliases: the first gated version of a model becomes `champion` (bootstrap); later ones become
`challenger` unless `promote`. A refused candidate is kept, with its gate.json, under
`<artifacts>/<name>/.refused/<version>` for inspection and is never registered; the run raises
`GateRefused` (the command lines exit 1 and print which check failed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.artifact import staging_dir
from models.gate import GateRefused, GateReport, GateRules, run_gate
from models.registry import CHALLENGER, CHAMPION, RegisteredModel, Registry, RegistryError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REFUSED = ".refused"


# --- the data window --------------------------------------------------------------------------

@dataclass
class DataWindow:
    """Which rows a run uses and how it splits them by time into train / validation / test.

    Rows with start <= event_timestamp < end are used (None: from the data's start / to its end).
    The split is either by days (`test_days`, `validation_days` before `end`: `make train`), or by
    shares of the window's rows (`test_share`, `validation_share`, latest last: retraining, where
    the live city's logged rows are the newest and must reach the training set too).
    """

    start: pd.Timestamp | None = None
    end: pd.Timestamp | None = None
    test_days: float = 3.0
    validation_days: float = 2.0
    test_share: float | None = None
    validation_share: float | None = None
    validation_start: pd.Timestamp | None = None  # set by split()
    test_start: pd.Timestamp | None = None

    @classmethod
    def recent(cls, days: float, end: pd.Timestamp | None = None, test_share: float = 0.2,
               validation_share: float = 0.15) -> DataWindow:
        """The last `days` before `end` (None: the data's end), split by shares of rows."""
        return cls(start=None, end=end, test_share=test_share, validation_share=validation_share,
                   test_days=float(days), validation_days=0.0)

    @property
    def days(self) -> float | None:
        """The window's length in days for a recent window (None for a by-days split)."""
        return self.test_days if self.test_share is not None else None

    def resolve(self, data_start: pd.Timestamp, data_end: pd.Timestamp) -> DataWindow:
        """Fill the open ends from the data's [start, end); a recent window starts `days` before its end."""
        end = _utc(self.end) if self.end is not None else _utc(data_end)
        if self.test_share is not None:
            start = end - pd.Timedelta(days=self.days)
            start = max(start, _utc(data_start))
        else:
            start = _utc(self.start) if self.start is not None else _utc(data_start)
        return DataWindow(start, end, self.test_days, self.validation_days, self.test_share, self.validation_share)

    def select(self, frame: pd.DataFrame, column: str = "event_timestamp") -> pd.DataFrame:
        """The rows inside [start, end)."""
        t = frame[column]
        keep = np.ones(len(frame), dtype=bool)
        if self.start is not None:
            keep &= (t >= self.start).to_numpy()
        if self.end is not None:
            keep &= (t < self.end).to_numpy()
        return frame[keep]

    def cut(self, times: pd.Series) -> tuple[pd.Timestamp, pd.Timestamp]:
        """(validation_start, test_start) for these row times; remembered on the window."""
        if self.test_share is not None:
            ordered = np.sort(times.to_numpy())
            if len(ordered) == 0:
                raise ValueError(f"no rows in the window {self.to_dict()}: widen --days or simulate more data")
            def at(share: float) -> pd.Timestamp:
                return _utc(pd.Timestamp(ordered[min(len(ordered) - 1, int(len(ordered) * share))]))

            test_start = at(1.0 - self.test_share)
            validation_start = at(1.0 - self.test_share - self.validation_share)
        else:
            test_start = self.end - pd.Timedelta(days=self.test_days)
            validation_start = test_start - pd.Timedelta(days=self.validation_days)
        self.validation_start, self.test_start = validation_start, test_start
        return validation_start, test_start

    def split(self, frame: pd.DataFrame, column: str = "event_timestamp") -> tuple[pd.DataFrame, ...]:
        """(train, validation, test) of the rows in the window; the error says what to do when one is empty."""
        frame = self.select(frame, column)
        validation_start, test_start = self.cut(frame[column])
        t = frame[column]
        parts = (frame[t < validation_start], frame[(t >= validation_start) & (t < test_start)], frame[t >= test_start])
        for name, part in zip(("train", "validation", "test"), parts, strict=True):
            if len(part) == 0:
                raise ValueError(f"the {name} split of the window {self.to_dict()} is empty: simulate more days "
                                 "(`make data`), or widen the window (--days)")
        return tuple(part.reset_index(drop=True) for part in parts)

    def to_dict(self) -> dict[str, str | float | None]:
        """JSON-able form for the lineage."""
        out: dict[str, str | float | None] = {
            k: (v.isoformat() if isinstance(v, pd.Timestamp) else v)
            for k, v in (("start", self.start), ("end", self.end), ("validation_start", self.validation_start),
                         ("test_start", self.test_start))}
        if self.test_share is not None:
            out.update(days=self.days, test_share=self.test_share, validation_share=self.validation_share)
        else:
            out.update(test_days=self.test_days, validation_days=self.validation_days)
        return out


def _utc(t: Any) -> pd.Timestamp:
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def time_window(frame: pd.DataFrame, column: str = "event_timestamp") -> dict[str, str]:
    """{"start", "end"} of a frame's rows (ISO 8601), as manifests record windows."""
    return {"start": frame[column].min().isoformat(), "end": frame[column].max().isoformat()}


def shuffled(frame: pd.DataFrame, column: str, seed: int) -> pd.DataFrame:
    """`frame` with `column` permuted across rows: labels that carry no signal (a deliberately bad model)."""
    out = frame.copy()
    out[column] = np.random.default_rng(seed).permutation(out[column].to_numpy())
    return out


# --- what a model module hands over -----------------------------------------------------------

@dataclass
class Staged:
    """A trained model written into its staging folder, with what the gate and the registry need."""

    version: str
    metrics: dict[str, Any]
    parity: tuple[np.ndarray, np.ndarray]  # (PyTorch output, ONNX output) on a held-out batch
    score: Callable[[Path], float]  # the comparison metric of an artifact on this candidate's test rows
    lineage: dict[str, Any]  # n rows, windows, hyper-parameters: the registry run's params
    n_train: int
    n_validation: int
    model: Any = None  # the torch module (eval mode)
    frames: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a run produced: the registered version, where its artifact is, and its numbers."""

    version: str
    artifact_dir: Path
    metrics: dict
    train_seconds: float
    n_train: int
    n_validation: int
    model: Any = None  # the trained torch module (eval mode), for parity checks
    frames: dict = field(default_factory=dict)  # "train", "validation", "test" DataFrames
    defaults: dict = field(default_factory=dict)
    registered: RegisteredModel | None = None
    gate: GateReport | None = None
    artifacts: Path | None = None  # the artifact root (and of the registry's SQLite file by default)

    @property
    def target(self) -> Path:
        """The artifact directory `<artifacts>/<model>/<version>`."""
        return self.artifact_dir


# --- the lifecycle ----------------------------------------------------------------------------

@contextmanager
def torch_settings(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic, fixed-thread torch for one run; the process's settings come back."""
    import torch

    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)  # reproducible sums and no oversubscription of 2 cores
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def code_version() -> dict[str, str]:
    """The training code's git commit (or "unknown") and whether the work tree had changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"code_version": commit, "code_dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an image)
        return {"code_version": "unknown", "code_dirty": "unknown"}


def champion_of(registry: Registry, name: str) -> RegisteredModel | None:
    """The model's champion, or None before the first one."""
    try:
        return registry.resolve(name, CHAMPION)
    except RegistryError:
        return None


def train(name: str, feature_service: str, rules: GateRules, build: Callable[[Path], Staged], artifacts: Path,
          registry: Registry | None = None, store: Any = None, promote: bool = False, seed: int = 7,
          threads: int = 1, hyper_parameters: Any = None) -> TrainResult:
    """Build a candidate in a staging folder, gate it, and register it (module doc); raises GateRefused."""
    started = time.perf_counter()
    artifacts = Path(artifacts)
    registry = registry or Registry(artifacts=artifacts)
    stage = staging_dir(artifacts, name)
    try:
        with torch_settings(seed, threads):
            staged = build(stage)
        champion = champion_of(registry, name)
        report = run_gate(rules, staged.version, staged.metrics, staged.parity, staged.score, stage, champion,
                          store, feature_service)
        report.write(stage)
        print(report.summary(), flush=True)
        if not report.passed:
            refused = artifacts / name / REFUSED / staged.version
            refused.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(refused, ignore_errors=True)
            os.replace(stage, refused)  # kept for inspection, out of the registry
            raise GateRefused(report)
        target = artifacts / name / staged.version
        os.replace(stage, target)  # the version appears complete or not at all
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # no half-written version left behind
        raise
    params = {"feature_service": feature_service, **code_version(), **_flat(staged.lineage),
              "parity_max_abs_diff": report.check("parity").figure, "parity_tolerance": rules.atol,
              "gate_champion": report.champion or "none", "seed": seed}
    if hyper_parameters is not None:
        params.update({f"hp_{k}": v for k, v in _flat(_plain(hyper_parameters)).items()})
    metrics = {k: float(v) for k, v in staged.metrics.items()
               if isinstance(v, int | float | np.number) and math.isfinite(float(v))}
    metrics.update(report.metrics())
    registered = registry.register(target, params=params, metrics=metrics,
                                   tags={"gate": "passed", "gate_champion": report.champion or "none"})
    alias = CHAMPION if promote or champion is None else CHALLENGER
    registered = registry.set_alias(name, alias, registered.number)
    print(f"registered {name} {registered.version} as number {registered.number} ({alias}) in {registry.uri}",
          flush=True)
    return TrainResult(staged.version, target, staged.metrics, time.perf_counter() - started, staged.n_train,
                       staged.n_validation, staged.model, staged.frames, staged.defaults, registered, report,
                       artifacts)


def serving_store(data_dir: Path, store: Any = None, online: str = "sqlite") -> Any:
    """The feature store serving reads (for the gate's feature-service check): `store`, else the one
    `make features` applied for `data_dir` (registry in `<data_dir>/feast`)."""
    if store is not None:
        return store
    from feature_repo.store import open_store

    return open_store(online, data_dir=Path(data_dir))


def _plain(value: Any) -> dict[str, Any]:
    if is_dataclass(value):
        return {k: (v if not isinstance(v, tuple) else list(v)) for k, v in asdict(value).items()}
    return dict(value)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


# --- the command line every trainer shares ------------------------------------------------------

def arguments(description: str, reports: str, epochs: int, seed: int) -> argparse.ArgumentParser:
    """The options of `python -m models.<name>.train`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("COURIER_DATA_DIR", "data")),
                        help="folder holding offline/ (the simulator's output) and feast/ (`make features`)")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="artifact root (default COURIER_ARTIFACTS or ./artifacts)")
    parser.add_argument("--registry", default=None,
                        help="MLflow tracking URI (default COURIER_REGISTRY or sqlite beside the artifacts)")
    parser.add_argument("--reports", type=Path, default=Path(reports), help="metrics.json and plots go here")
    parser.add_argument("--online", choices=["sqlite", "redis"], default=os.environ.get("COURIER_ONLINE", "sqlite"),
                        help="the online store serving reads (the gate checks the feature service there)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--promote", action="store_true",
                        help="make the new version champion (default: champion only when there is none)")
    return parser


def registry_from(args: argparse.Namespace) -> Registry:
    """The registry the command-line options name."""
    from models.registry import default_artifacts

    artifacts = args.artifacts or default_artifacts()
    args.artifacts = artifacts
    return Registry(args.registry, artifacts)


def main_guarded(run: Callable[[], dict[str, Any]]) -> None:
    """Run a training command: print its JSON summary, or the failed gate check and exit 1."""
    try:
        summary = run()
    except GateRefused as refused:
        print(str(refused), file=sys.stderr)
        print(json.dumps({"registered": False, "gate": refused.report.to_dict()}, indent=2, default=str))
        raise SystemExit(1) from None
    print(json.dumps(summary, indent=2, default=str))


def command_line(description: str, reports: str, config_type: Any, run: Callable[..., TrainResult],
                 keys: list[str] | None = None, argv: list[str] | None = None,
                 extra: Callable[[TrainResult], dict[str, Any]] | None = None) -> None:
    """A trainer's `main`: the shared options, then train, gate and register with `run`; prints the JSON summary
    (`keys` of the metrics, plus `extra(result)`), or the failed gate check and exits 1."""
    parser = arguments(description, reports, config_type.epochs, config_type.seed)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    registry = registry_from(args)

    def summary() -> dict[str, Any]:
        result = run(args.data_dir, args.artifacts, args.reports, config_type(epochs=args.epochs, seed=args.seed),
                     registry=registry, promote=args.promote, online=args.online)
        return {**summary_of(result, keys), **(extra(result) if extra else {})}

    main_guarded(summary)


def summary_of(result: TrainResult, keys: list[str] | None = None) -> dict[str, Any]:
    """The JSON summary a command prints: version, registry number and alias, gate, chosen metrics."""
    metrics = result.metrics if keys is None else {k: result.metrics[k] for k in keys if k in result.metrics}
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
           if not isinstance(v, list | dict)}
    registered = result.registered
    out.update(version=result.version, number=registered.number if registered else None,
               aliases=list(registered.aliases) if registered else [], artifact=str(result.artifact_dir),
               gate={c.name: c.passed for c in result.gate.checks} if result.gate else None,
               seconds=round(result.train_seconds, 1))
    return out
