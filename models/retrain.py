"""Retrain a challenger on recent data, gate it against the champion on the same window, register it.

    python -m models.retrain [--model eta|ranker|retrieval|all] [--days N] [--shuffle-labels]
                             [--data-dir data] [--artifacts artifacts] [--registry URI] [--epochs N]

For each model: the most recent `--days` of the offline store (for ETA also the live city's joined
prediction/outcome rows, `<data-dir>/offline/logged/eta_outcomes/*.parquet`: the served inputs and
the delivered minutes), split by time into the oldest 65 % for training, 15 % validation and the
latest 20 % as the test window; trained through the shared lifecycle (models/lifecycle.py), gated
(the champion's artifact is scored on the SAME test rows) and registered as `challenger` (as
`champion` when the model has none yet). `--shuffle-labels` permutes the training labels: the
deliberately bad model the gate must stop. Exit 1 when any model is refused; the last line printed
is a JSON summary per model (version, registry number, aliases, each gate check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from models.gate import GateRefused
from models.lifecycle import DataWindow, TrainResult
from models.registry import Registry, default_artifacts

MODELS = ("eta", "retrieval", "ranker")
DEFAULT_DAYS = 14.0
TEST_SHARE, VALIDATION_SHARE = 0.2, 0.15


def retrain(model: str, data_dir: Path, artifacts: Path, registry: Registry, days: float = DEFAULT_DAYS,
            shuffle_labels: bool = False, store: Any = None, config: Any = None, reports: Path | None = None,
            online: str = "sqlite", gate: Any = None) -> TrainResult:
    """Train one model on the recent window, gate it and register it (module doc); raises GateRefused.

    `config` is the model's TrainConfig (None: its defaults), `gate` its GateRules (None: the model's own).
    """
    window = DataWindow.recent(days, test_share=TEST_SHARE, validation_share=VALIDATION_SHARE)
    reports = Path(reports) if reports is not None else Path("reports") / "retrain" / model
    common = {"store": store, "registry": registry, "window": window, "shuffle_labels": shuffle_labels,
              "online": online, **({"gate": gate} if gate is not None else {})}
    if model == "eta":
        from models.eta import train as module

        return module.run(data_dir, artifacts, reports, config, include_logged=True, **common)
    if model == "ranker":
        from models.ranker import train as module
    elif model == "retrieval":
        from models.retrieval import train as module
    else:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)} or all")
    return module.run(data_dir, artifacts, reports, config, **common)


def summary(result: TrainResult) -> dict[str, Any]:
    """What the command prints for one registered challenger."""
    registered = result.registered
    return {"registered": True, "version": result.version, "number": registered.number if registered else None,
            "aliases": list(registered.aliases) if registered else [],
            "n_train": result.n_train, "n_logged": _logged(result),
            "gate": result.gate.to_dict() if result.gate else None, "seconds": round(result.train_seconds, 1)}


def _config(model: str, epochs: int | None) -> Any:
    """The model's TrainConfig with `epochs` (None: the defaults)."""
    if epochs is None:
        return None
    from importlib import import_module

    return import_module(f"models.{model}.train").TrainConfig(epochs=epochs)


def _logged(result: TrainResult) -> int:
    train = result.frames.get("train")
    return int((train["source"] == "logged").sum()) if train is not None and "source" in train else 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (1 when a model is refused)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--days", type=float, default=DEFAULT_DAYS, help="length of the recent window, days")
    parser.add_argument("--shuffle-labels", action="store_true",
                        help="train on permuted labels: a deliberately bad model the gate must refuse (exit 1)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("COURIER_DATA_DIR", "data")))
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root (COURIER_ARTIFACTS, artifacts)")
    parser.add_argument("--registry", default=None, help="MLflow tracking URI (COURIER_REGISTRY, sqlite beside "
                                                         "the artifacts)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: each model's own)")
    parser.add_argument("--reports", type=Path, default=Path("reports/retrain"), help="per-model reports go here")
    parser.add_argument("--online", choices=["sqlite", "redis"], default=os.environ.get("COURIER_ONLINE", "sqlite"),
                        help="the online store serving reads (the gate checks the feature service there)")
    args = parser.parse_args(argv)
    if args.days <= 0:
        parser.error("--days must be positive")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    artifacts = args.artifacts or default_artifacts()
    registry = Registry(args.registry, artifacts)
    models = MODELS if args.model == "all" else (args.model,)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for model in models:
        print(f"== retraining {model} on the last {args.days:g} days"
              f"{' with SHUFFLED labels' if args.shuffle_labels else ''}", flush=True)
        try:
            results[model] = summary(retrain(model, args.data_dir, artifacts, registry, args.days,
                                             args.shuffle_labels, config=_config(model, args.epochs),
                                             reports=args.reports / model, online=args.online))
        except GateRefused as refused:
            print(str(refused), file=sys.stderr, flush=True)
            results[model] = {"registered": False, "version": refused.report.version,
                              "failed": [c.name for c in refused.report.failed], "gate": refused.report.to_dict()}
    refused = [m for m, r in results.items() if not r["registered"]]
    print(json.dumps({"models": results, "refused": refused, "seconds": round(time.perf_counter() - started, 1)},
                     indent=2, default=str))
    if refused:
        print(f"refused by the gate: {', '.join(refused)} (see each model's failed checks above); the champion "
              "keeps serving", file=sys.stderr)
    return 1 if refused else 0


if __name__ == "__main__":
    raise SystemExit(main())
