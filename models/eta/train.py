"""Train, evaluate, export and publish the ETA model.

    python -m models.eta.train [--data-dir data] [--artifacts artifacts] [--reports reports/eta]
                               [--epochs N] [--seed S]

Steps: orders in [start, end) of simulation.json -> point-in-time join with the eta_v1
feature service -> time split (last 3 days = test, 2 days before = validation) -> train
on CPU with a fixed seed -> ONNX export -> metrics and plots on the test orders (run
through ONNX Runtime, as served) -> artifact `<artifacts>/eta/<version>` -> `current`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from models.artifact import ONNX_FILE, publish
from models.eta import data as eta_data
from models.eta.evaluate import evaluate, fit_baseline
from models.eta.export import (
    MODEL_NAME,
    export_onnx,
    new_version,
    onnx_predict,
    onnx_session,
    staging_dir,
    write_drift_reference,
    write_manifest,
    write_restaurants,
)
from models.eta.features import (
    LIVE_FEATURES,
    PREP_FEATURES,
    build_inputs,
    epoch_seconds,
    feature_defaults,
)
from models.eta.network import EtaNet


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults train the default city in about a minute on 2 cores."""

    epochs: int = 40
    batch_size: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    hidden: tuple[int, ...] = (64, 64)
    area_dim: int = 4
    seed: int = 7
    threads: int = 2
    test_days: float = 3.0
    validation_days: float = 2.0
    # share of training rows also shown without prep stats, so the fallback (defaults) is learnt
    missing_prep_share: float = 0.1


@dataclass
class TrainResult:
    """What a run produced: where, which version, and its numbers."""

    version: str
    artifact_dir: Path
    current: Path
    metrics: dict
    train_seconds: float
    n_train: int
    n_validation: int
    model: EtaNet | None = None  # the trained torch module (eval mode), for parity checks
    # "train", "validation", "test" DataFrames, for tests and notebooks
    frames: dict = field(default_factory=dict)


def model_columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The columns `build_inputs` reads, from a training frame (order time as UTC epoch seconds)."""
    columns = {
        name: frame[name].to_numpy()
        for name in ["lat", "lon", "delivery_lat", "delivery_lon", *LIVE_FEATURES]
    }
    columns["order_time"] = epoch_seconds(frame["event_timestamp"])
    columns["area_id"] = frame["area_id"].to_numpy(dtype=object)
    return columns


def with_missing_prep(frame: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Training rows plus a copy of `share` of them without prep stats (new kitchens, fallback)."""
    if share <= 0:
        return frame
    copy = frame.sample(frac=share, random_state=seed)
    copy[PREP_FEATURES] = np.nan
    return pd.concat([frame, copy], ignore_index=True)


def fit(
    model: EtaNet,
    train: dict[str, np.ndarray],
    y_train: np.ndarray,
    validation: dict[str, np.ndarray],
    y_validation: np.ndarray,
    config: TrainConfig,
) -> dict:
    """AdamW on MSE, one-cycle schedule; keeps the best validation epoch. Returns history."""
    dense, areas, target = (
        torch.from_numpy(train["dense"]),
        torch.from_numpy(train["areas"]),
        torch.from_numpy(y_train.astype(np.float32)),
    )
    v_dense, v_areas = torch.from_numpy(validation["dense"]), torch.from_numpy(validation["areas"])
    v_target = torch.from_numpy(y_validation.astype(np.float32))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, -(-len(target) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.learning_rate,
        pct_start=0.1,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
    )
    generator = torch.Generator().manual_seed(config.seed)
    best = {"validation_rmse": float("inf"), "epoch": -1, "state": None}
    history = []
    progress = tqdm(range(config.epochs), desc="training eta", unit="epoch")
    for epoch in progress:
        model.train()
        order = torch.randperm(len(target), generator=generator)
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            rows = order[i : i + config.batch_size]
            loss = torch.nn.functional.mse_loss(model(dense[rows], areas[rows]), target[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        model.eval()
        with torch.no_grad():
            v_rmse = float(torch.sqrt(torch.mean((model(v_dense, v_areas) - v_target) ** 2)))
        t_rmse = (total / len(target)) ** 0.5
        history.append({"epoch": epoch + 1, "train_rmse": t_rmse, "validation_rmse": v_rmse})
        if v_rmse < best["validation_rmse"]:
            best = {
                "validation_rmse": v_rmse,
                "epoch": epoch + 1,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        progress.set_postfix(
            train_rmse=f"{t_rmse:.3f}", val_rmse=f"{v_rmse:.3f}", best=best["epoch"]
        )
    model.load_state_dict(best["state"])
    model.eval()
    return {
        "best_epoch": best["epoch"],
        "best_validation_rmse": best["validation_rmse"],
        "history": history,
    }


def _window(frame: pd.DataFrame) -> dict[str, str]:
    return {
        "start": frame["event_timestamp"].min().isoformat(),
        "end": frame["event_timestamp"].max().isoformat(),
    }


@contextmanager
def _torch_settings(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic, fixed-thread torch for one run; the process's settings come back."""
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    # fixed threads: reproducible sums and no oversubscription of 2 cores
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def run(
    data_dir: Path = Path("data"),
    artifacts: Path = Path("artifacts"),
    reports: Path = Path("reports/eta"),
    config: TrainConfig | None = None,
    store=None,
) -> TrainResult:
    """The whole pipeline; `store` defaults to the project's Feast store (or a private one)."""
    config = config or TrainConfig()
    with _torch_settings(config.seed, config.threads):
        return _run(Path(data_dir), Path(artifacts), Path(reports), config, store)


def _point_in_time_frame(data_dir: Path, orders: pd.DataFrame, store) -> pd.DataFrame:
    """The joined frame from `store`, else the project's store, else a throw-away one."""
    if store is not None:
        return eta_data.training_frame(store, orders)
    if eta_data.is_project_data(data_dir):
        return eta_data.training_frame(eta_data.project_store(), orders)
    store, workdir = eta_data.temporary_store(data_dir)
    with workdir:
        return eta_data.training_frame(store, orders)


def _run(data_dir: Path, artifacts: Path, reports: Path, config: TrainConfig, store) -> TrainResult:
    started = time.perf_counter()
    window = eta_data.simulation_window(data_dir)
    orders = eta_data.load_orders(data_dir, window)
    frame = _point_in_time_frame(data_dir, orders, store)
    train, validation, test = eta_data.split_by_time(
        frame, window.end, config.test_days, config.validation_days
    )
    print(
        f"point-in-time training set: {len(train)} train, {len(validation)} validation, "
        f"{len(test)} test orders"
    )

    defaults = feature_defaults(train)
    train_rows = with_missing_prep(train, config.missing_prep_share, config.seed)
    x_train = build_inputs(model_columns(train_rows), defaults)
    x_validation = build_inputs(model_columns(validation), defaults)
    y_train = train_rows["delivery_minutes"].to_numpy()

    model = EtaNet(hidden=config.hidden, area_dim=config.area_dim)
    model.set_normalisation(x_train["dense"], y_train)
    fit_started = time.perf_counter()
    history = fit(
        model, x_train, y_train, x_validation, validation["delivery_minutes"].to_numpy(), config
    )
    fit_seconds = time.perf_counter() - fit_started

    stage = staging_dir(artifacts)
    try:
        onnx_path = export_onnx(model, stage / ONNX_FILE)
        created = datetime.now(UTC)
        version = new_version(onnx_path, created)
        predicted = onnx_predict(
            onnx_session(onnx_path), build_inputs(model_columns(test), defaults)
        )
        baseline = fit_baseline(train, defaults["prep_time_mean_7d"])
        context = {
            "version": version,
            "test_window": _window(test),
            "validation_window": _window(validation),
            "training_window": _window(train),
            "best_epoch": history["best_epoch"],
        }
        metrics = evaluate(test, predicted, baseline, reports, context)
        # the training rows as built, without the missing-prep copies serving does not see; per
        # UTC hour of the order too: demand, load and ETAs follow the time of day (the meal curve)
        write_drift_reference(
            stage,
            x_train["dense"][: len(train)],
            predicted,
            epoch_seconds(train["event_timestamp"]),
            epoch_seconds(test["event_timestamp"]),
        )

        restaurants = pd.read_parquet(data_dir / "offline" / "restaurants.parquet")
        restaurants = restaurants[restaurants["event_timestamp"] <= train["event_timestamp"].max()]
        write_restaurants(
            stage,
            restaurants.sort_values("event_timestamp").drop_duplicates(
                "restaurant_id", keep="last"
            ),
        )
        write_manifest(
            stage,
            version,
            _window(train),
            metrics,
            defaults,
            created,
            extra={
                "validation_window": _window(validation),
                "test_window": _window(test),
                "n_train": len(train),
                "n_validation": len(validation),
                "best_epoch": history["best_epoch"],
                "best_validation_rmse": history["best_validation_rmse"],
                "fit_seconds": round(fit_seconds, 1),
                "hidden": list(config.hidden),
                "area_dim": config.area_dim,
                "baseline": {
                    "speed_kmh": baseline.speed_kmh,
                    "wait_minutes": baseline.wait_minutes,
                },
            },
        )
        target = artifacts / MODEL_NAME / version
        os.replace(stage, target)  # the version appears complete or not at all
        current = publish(artifacts, MODEL_NAME, version)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # no half-written version left behind
        raise
    return TrainResult(
        version,
        target,
        current,
        metrics,
        time.perf_counter() - started,
        len(train),
        len(validation),
        model,
        {"train": train, "validation": validation, "test": test},
    )


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; prints a short summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("COURIER_DATA_DIR", "data")),
        help="folder holding offline/ (the simulator's output)",
    )
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifact root")
    parser.add_argument(
        "--reports", type=Path, default=Path("reports/eta"), help="metrics.json and plots go here"
    )
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    result = run(
        args.data_dir, args.artifacts, args.reports, TrainConfig(epochs=args.epochs, seed=args.seed)
    )
    m = result.metrics
    print(
        json.dumps(
            {
                "version": result.version,
                "rmse": round(m["rmse"], 3),
                "mae": round(m["mae"], 3),
                "mape": round(m["mape"], 4),
                "baseline_rmse": round(m["baseline_rmse"], 3),
                "noise_floor_rmse": round(m["noise_floor_rmse"], 3),
                "rmse_vs_noise_floor": round(m["rmse_vs_noise_floor"], 3),
                "rmse_vs_baseline": round(m["rmse_vs_baseline"], 3),
                "n_test": m["n_test"],
                "targets_met": m["targets_met"],
                "seconds": round(result.train_seconds, 1),
            },
            indent=2,
        )
    )
    print(f"published {result.current} -> {result.version}; reports in {args.reports}")


if __name__ == "__main__":
    main()
