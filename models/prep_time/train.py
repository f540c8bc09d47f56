"""Train, evaluate, export, gate and register the prep-time model (Courier's worked example of a new model).

    python -m models.prep_time.train [--data-dir data] [--artifacts artifacts] [--reports reports/prep_time]
                                     [--epochs N] [--seed S] [--promote] [--registry URI]

Steps: orders in the simulation window -> point-in-time join with the prep_time_v1 feature service ->
time split (last 3 days = test, 2 days before = validation) -> a tiny MLP on CPU with a fixed seed ->
ONNX export -> metrics on the test orders through ONNX Runtime -> the lifecycle (models/lifecycle.py):
gate (parity, targets and the champion on the same window, feature service) -> `<artifacts>/prep_time/
<version>` -> registered (champion when there is none, else challenger; `--promote` makes it champion).
Everything model-specific is in `_build`; the rest is the lifecycle every Courier model shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models import lifecycle
from models.artifact import ONNX_FILE, new_version
from models.eta import data as eta_data
from models.gate import GateRules
from models.lifecycle import DataWindow, Staged, TrainResult, serving_store, time_window
from models.prep_time.evaluate import GATE, compute_metrics, write_metrics
from models.prep_time.model import (
    FEATURE_SERVICE,
    FEATURES,
    MODEL_NAME,
    PrepTimeNet,
    export_onnx,
    onnx_predict,
    write_manifest,
)
from models.registry import Registry

ORDER_COLUMNS = ["order_id", "event_timestamp", "restaurant_id", "prep_minutes_observed", "true_prep_minutes"]
LABEL, TRUTH = "prep_minutes_observed", "true_prep_minutes"  # the truth is for the noise floor only, never an input
PARITY_ROWS = 1024


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults train the default city in seconds."""

    epochs: int = 20
    batch_size: int = 512
    learning_rate: float = 5e-3
    hidden: tuple[int, ...] = (16, 16)
    seed: int = 7
    threads: int = 1
    test_days: float = 3.0
    validation_days: float = 2.0


def training_frame(store, orders: pd.DataFrame) -> pd.DataFrame:
    """Orders joined point-in-time with the prep_time_v1 features (the values serving would have read then)."""
    try:
        service = store.get_feature_service(FEATURE_SERVICE)
    except Exception as exc:  # feast raises several kinds here: registry missing, service unknown
        raise RuntimeError(f"feature service {FEATURE_SERVICE!r} is not in the feature registry: run `make features` "
                           f"(python -m feature_repo.store apply) first ({exc.__class__.__name__})") from exc
    joined = store.get_historical_features(entity_df=orders[["order_id", "restaurant_id", "event_timestamp"]],
                                           features=service).to_df()
    return orders.merge(joined[["order_id", *FEATURES]], on="order_id", how="left", validate="one_to_one")


def features_of(frame: pd.DataFrame) -> np.ndarray:
    """The model's input rows (float32, FEATURES order; NaN where a feature was missing or stale)."""
    return frame[FEATURES].to_numpy(dtype=np.float32, na_value=np.nan)


def _frame(data_dir: Path, window: DataWindow, store) -> tuple[pd.DataFrame, DataWindow]:
    simulated = eta_data.simulation_window(data_dir)
    window = window.resolve(simulated.start, simulated.end)
    path = Path(data_dir) / "offline" / "orders.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `make data`")
    orders = window.select(pd.read_parquet(path, columns=ORDER_COLUMNS)).sort_values("event_timestamp")
    if store is None and eta_data.is_project_data(data_dir):
        from feature_repo.store import open_store

        store = open_store(data_dir=Path(data_dir))
    if store is not None:
        return training_frame(store, orders).reset_index(drop=True), window
    store, workdir = eta_data.temporary_store(data_dir)
    with workdir:
        return training_frame(store, orders).reset_index(drop=True), window


def fit(model: PrepTimeNet, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
        config: TrainConfig) -> dict:
    """Adam on MSE; keeps the best validation epoch. Returns its epoch and RMSE."""
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val.astype(np.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    best = {"rmse": float("inf"), "epoch": 0, "state": None}
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(y_t), generator=generator)
        for i in range(0, len(order), config.batch_size):
            rows = order[i:i + config.batch_size]
            loss = torch.nn.functional.mse_loss(model(x_t[rows]), y_t[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            rmse = float(torch.sqrt(torch.mean((model(xv) - yv) ** 2)))
        if rmse < best["rmse"]:
            best = {"rmse": rmse, "epoch": epoch, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best["state"])
    model.eval()
    return {"best_epoch": best["epoch"], "best_validation_rmse": best["rmse"]}


def score_artifact(directory: Path, test: pd.DataFrame) -> float:
    """RMSE (minutes) of the prep-time artifact in `directory` on `test` rows, through ONNX Runtime as served."""
    predicted = onnx_predict(Path(directory) / ONNX_FILE, features_of(test)).astype(np.float64)
    return float(np.sqrt(np.mean(np.square(predicted - test[LABEL].to_numpy(dtype=np.float64)))))


def _build(stage: Path, data_dir: Path, reports: Path, config: TrainConfig, store, window: DataWindow) -> Staged:
    """Everything that is the prep-time model's own: data, fit, export, evaluation, manifest (module doc)."""
    frame, window = _frame(data_dir, window, store)
    train, validation, test = window.split(frame)
    print(f"point-in-time training set: {len(train)} train, {len(validation)} validation, {len(test)} test orders")
    x_train = features_of(train)
    defaults = np.nan_to_num(np.nanmedian(x_train, axis=0), nan=0.0)  # a kitchen without history: the median one
    model = PrepTimeNet(config.hidden)
    model.set_normalisation(x_train, train[LABEL].to_numpy(), defaults)
    history = fit(model, x_train, train[LABEL].to_numpy(), features_of(validation), validation[LABEL].to_numpy(),
                  config)

    onnx_path = export_onnx(model, stage / ONNX_FILE)
    created = datetime.now(UTC)
    version = new_version(MODEL_NAME, onnx_path, created)
    x_test = features_of(test)
    predicted = onnx_predict(onnx_path, x_test)
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test[:PARITY_ROWS])).numpy()
    mean_7d = test["prep_time_mean_7d"].to_numpy(dtype=np.float64, na_value=np.nan)
    baseline = np.where(np.isfinite(mean_7d), mean_7d, defaults[0])
    metrics = compute_metrics(test[LABEL], predicted, baseline, test[TRUTH])
    write_metrics(reports, metrics, {"version": version, "data_window": window.to_dict(), **history})
    named_defaults = dict(zip(FEATURES, defaults.tolist(), strict=True))
    write_manifest(stage, version, time_window(train), metrics, named_defaults, created,
                   extra={"validation_window": time_window(validation), "test_window": time_window(test),
                          "n_train": len(train), "data_window": window.to_dict(), **history,
                          "hidden": list(config.hidden)})
    lineage = {"data_window": window.to_dict(), "n_train": len(train), "n_validation": len(validation),
               "n_test": len(test), "best_epoch": history["best_epoch"]}
    return Staged(version, metrics, (expected, predicted[:PARITY_ROWS]), lambda d: score_artifact(d, test), lineage,
                  len(train), len(validation), model, {"train": train, "validation": validation, "test": test},
                  named_defaults)


def run(data_dir: Path = Path("data"), artifacts: Path = Path("artifacts"), reports: Path = Path("reports/prep_time"),
        config: TrainConfig | None = None, store=None, registry: Registry | None = None,
        window: DataWindow | None = None, promote: bool = False, online: str = "sqlite",
        gate: GateRules = GATE) -> TrainResult:
    """Train, gate and register the prep-time model through the shared lifecycle; raises GateRefused.

    `store`: the Feast store to join features from and to check the feature service in (default: the
    project's); `gate` overrides the rules (tests on a city too small for the targets)."""
    config = config or TrainConfig()
    data_dir = Path(data_dir)
    window = window or DataWindow(test_days=config.test_days, validation_days=config.validation_days)
    return lifecycle.train(MODEL_NAME, FEATURE_SERVICE, gate,
                           lambda stage: _build(stage, data_dir, Path(reports), config, store, window),
                           Path(artifacts), registry, serving_store(data_dir, store, online), promote, config.seed,
                           config.threads, config)


SUMMARY_KEYS = ["rmse", "mae", "baseline_rmse", "noise_floor_rmse", "rmse_vs_baseline", "n_test", "targets_met"]


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; prints a JSON summary, or the failed gate check (exit 1)."""
    lifecycle.command_line(__doc__.splitlines()[0], "reports/prep_time", TrainConfig, run, SUMMARY_KEYS, argv)

if __name__ == "__main__":
    main()
