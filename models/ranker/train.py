"""Train, compare class-imbalance treatments, evaluate, export, gate and register the feed ranker.

    python -m models.ranker.train [--data-dir data] [--artifacts artifacts] [--reports reports/ranker]
                                  [--epochs N] [--seed S] [--promote] [--registry URI]

Steps: impressions in [start, end) of simulation.json -> point-in-time join with the
ranker_v1 feature service -> time split (last 3 days = test, 2 days before = validation)
-> one model per class-imbalance treatment (TREATMENTS); the simplest is kept unless another
has a significantly lower validation logloss (paired, > 2 standard errors) -> ONNX export -> metrics and reliability plot on the test impressions (run
through ONNX Runtime) -> staged artifact -> gate -> `<artifacts>/ranker/<version>` -> registered
(models/lifecycle.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from models import lifecycle
from models.artifact import ONNX_FILE, load_manifest, new_version
from models.gate import GateRules
from models.lifecycle import (
    DataWindow,
    Staged,
    TrainResult,
    serving_store,
    shuffled,
    time_window,
    torch_settings,
)
from models.ranker import data as feed_data
from models.ranker.evaluate import GATE, evaluate, fit_baseline, logloss, scores
from models.ranker.export import (
    MODEL_NAME,
    export_onnx,
    onnx_predict,
    onnx_session,
    write_drift_reference,
    write_manifest,
    write_restaurants,
)
from models.ranker.features import (
    FEATURE_SERVICE,
    MAX_POSITION,
    PLATFORM_FEATURES,
    RESTAURANT_STATS,
    UNKNOWN_RESTAURANT,
    USER_FEATURES,
    build_inputs,
    no_history_defaults,
)
from models.ranker.network import RankerNet
from models.registry import Registry
from models.sessions import examine

__all__ = ["TrainConfig", "TrainResult", "Treatment", "fit", "main", "predict", "run", "score_artifact",
           "torch_settings"]
PARITY_ROWS = 4096  # held-out impressions the gate compares ONNX with PyTorch on


@dataclass(frozen=True)
class Treatment:
    """One answer to class imbalance, and the logit offset that undoes its bias on probabilities.

    downsample: keep each negative with probability `negative_rate` (redrawn every epoch, so
    all negatives are used over the epochs); the model then learns odds / negative_rate, and
    log(negative_rate) added to the logit restores calibrated probabilities.
    positive_weight: weight positives k times in the loss; the model learns k x odds, undone by -log k.
    """

    name: str
    negative_rate: float = 1.0
    positive_weight: float = 1.0

    @property
    def offset(self) -> float:
        """Log-odds correction applied after training."""
        return math.log(self.negative_rate) - math.log(self.positive_weight)


SIGNIFICANCE = 2.0  # standard errors a treatment must gain over the simplest one to replace it
# simplest first: the first is kept unless another is significantly better on validation logloss
TREATMENTS = (
    Treatment("plain_bce"),
    Treatment("downsample_negatives_10pct", negative_rate=0.1),
    Treatment("class_weight_10x", positive_weight=10.0),
)


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults train the default city in well under two minutes on 2 cores."""

    epochs: int = 8
    batch_size: int = 1024
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    hidden: tuple[int, ...] = (64, 32)
    id_dim: int = 8
    # share of training rows whose restaurant id is hidden (bucket 0): the cold-start answer is learnt
    id_dropout: float = 0.1
    # share of training rows also shown as a new user (no history), and as a brand-new restaurant
    # (no id, no statistics): the defaults and missing flags then mean something to the network
    missing_share: float = 0.1
    position_lr_factor: float = 30.0
    seed: int = 7
    threads: int = 1
    test_days: float = 3.0
    validation_days: float = 2.0
    treatments: tuple[Treatment, ...] = TREATMENTS


def with_missing(frame: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Training rows plus two copies of `share` of them: without user history, and as new restaurants."""
    if share <= 0:
        return frame
    new_user = frame.sample(frac=share, random_state=seed)
    new_user[[*USER_FEATURES, "cuisine_affinity"]] = np.nan
    new_restaurant = frame.sample(frac=share, random_state=seed + 1)
    new_restaurant[[*RESTAURANT_STATS, *PLATFORM_FEATURES]] = np.nan
    new_restaurant["restaurant_id"] = -1  # bucket 0: no id embedding either
    return pd.concat([frame, new_user, new_restaurant], ignore_index=True)


def _tensors(inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(inputs["dense"]), torch.from_numpy(inputs["restaurant_bucket"]),
            torch.from_numpy(inputs["position"]))


def predict(model: RankerNet, inputs: dict[str, np.ndarray], offset: float | None = None) -> np.ndarray:
    """Probabilities from the torch model, in chunks; `offset` overrides the model's logit offset."""
    dense, bucket, position = _tensors(inputs)
    out = []
    with torch.no_grad():
        for i in range(0, len(dense), 65536):
            rows = slice(i, i + 65536)
            q = torch.exp(model.log_q(dense[rows], bucket[rows], position[rows])).double().numpy()
            c = math.exp(float(model.offset) if offset is None else offset)
            out.append(q * c / (1 - q + q * c))
    return np.concatenate(out) if out else np.zeros(0)


def fit(model: RankerNet, train: dict[str, np.ndarray], y_train: np.ndarray, validation: dict[str, np.ndarray],
        y_validation: np.ndarray, treatment: Treatment, config: TrainConfig) -> dict:
    """AdamW on (weighted) BCE with the treatment's sampling; keeps the best validation epoch.

    Validation logloss is measured on calibrated probabilities (treatment offset applied).
    The returned model carries the offset in its `offset` buffer, so its output is calibrated.
    """
    dense, bucket, position = _tensors(train)
    target = torch.from_numpy(y_train.astype(np.float32))
    positives = torch.from_numpy(np.flatnonzero(y_train == 1))
    negatives = torch.from_numpy(np.flatnonzero(y_train == 0))
    n_per_epoch = len(positives) + round(len(negatives) * treatment.negative_rate)
    # the 20 slot parameters trade off against the whole MLP: a faster rate lets them keep up
    slots = [model.slot_steps]
    others = [p for p in model.parameters() if all(p is not s for s in slots)]
    rates = [config.learning_rate, config.learning_rate * config.position_lr_factor]
    optimizer = torch.optim.AdamW([{"params": others, "lr": rates[0]}, {"params": slots, "lr": rates[1],
                                                                       "weight_decay": 0.0}],
                                  weight_decay=config.weight_decay)
    steps = max(1, -(-n_per_epoch // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=rates, pct_start=0.1,
                                                   epochs=config.epochs, steps_per_epoch=steps)
    generator = torch.Generator().manual_seed(config.seed)
    best = {"validation_logloss": float("inf"), "epoch": -1, "state": None}
    history = []
    progress = tqdm(range(config.epochs), desc=f"ranker {treatment.name}", unit="epoch")
    for epoch in progress:
        model.train()
        kept = negatives
        if treatment.negative_rate < 1.0:  # a fresh sample of negatives every epoch
            keep = torch.rand(len(negatives), generator=generator) < treatment.negative_rate
            kept = negatives[keep]
        rows_all = torch.cat([positives, kept])
        rows_all = rows_all[torch.randperm(len(rows_all), generator=generator)]
        total = 0.0
        for i in range(0, len(rows_all), config.batch_size):
            rows = rows_all[i:i + config.batch_size]
            b = bucket[rows]
            drop = torch.rand(len(rows), generator=generator) < config.id_dropout
            b = torch.where(drop, torch.full_like(b, UNKNOWN_RESTAURANT), b)
            loss = model.loss(dense[rows], b, position[rows], target[rows], treatment.positive_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        model.eval()
        v_loss = logloss(y_validation, predict(model, validation, treatment.offset))
        history.append({"epoch": epoch + 1, "train_loss": total / len(rows_all), "validation_logloss": v_loss})
        if v_loss < best["validation_logloss"]:
            best = {"validation_logloss": v_loss, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        progress.set_postfix(val_logloss=f"{v_loss:.5f}", best=best["epoch"])
    model.load_state_dict(best["state"])
    model.offset.fill_(treatment.offset)  # calibrated probabilities out of the box
    model.eval()
    return {"best_epoch": best["epoch"], "best_validation_logloss": best["validation_logloss"],
            "rows_per_epoch": n_per_epoch, "history": history}


def compare_treatments(x_train: dict, y_train: np.ndarray, x_validation: dict, y_validation: np.ndarray,
                       config: TrainConfig) -> tuple[RankerNet, Treatment, list[dict]]:
    """Train one model per treatment from the same seed; keep the first unless another is significantly better."""
    results = []
    for treatment in config.treatments:
        torch.manual_seed(config.seed)
        model = RankerNet(hidden=config.hidden, id_dim=config.id_dim)
        model.set_normalisation(x_train["dense"])
        started = time.perf_counter()
        history = fit(model, x_train, y_train, x_validation, y_validation, treatment, config)
        p = predict(model, x_validation)
        figures = scores(y_validation, p, "validation_")
        losses = _row_losses(y_validation, p)
        results.append({"treatment": treatment.name, "negative_rate": treatment.negative_rate,
                        "positive_weight": treatment.positive_weight, "logit_offset": treatment.offset,
                        **figures, "mean_predicted_vs_rate": float(p.mean() / max(y_validation.mean(), 1e-9)),
                        "best_epoch": history["best_epoch"], "rows_per_epoch": history["rows_per_epoch"],
                        "fit_seconds": round(time.perf_counter() - started, 1), "model": model,
                        "treatment_object": treatment, "losses": losses})
    # the first (simplest) treatment stays unless another beats it by more than noise: a paired
    # difference of validation logloss below -SIGNIFICANCE standard errors
    best = results[0]
    for r in results[1:]:
        diff = r["losses"] - results[0]["losses"]
        r["logloss_minus_first"] = float(diff.mean())
        r["logloss_minus_first_stderr"] = float(diff.std() / math.sqrt(len(diff)))
        if (r["logloss_minus_first"] < -SIGNIFICANCE * r["logloss_minus_first_stderr"]
                and r["validation_logloss"] < best["validation_logloss"]):
            best = r
    results[0].update(logloss_minus_first=0.0, logloss_minus_first_stderr=0.0)
    table = [{k: v for k, v in r.items() if k not in ("model", "treatment_object", "losses")} | {"kept": r is best}
             for r in results]
    return best["model"], best["treatment_object"], table


def _row_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def run(data_dir: Path = Path("data"), artifacts: Path = Path("artifacts"), reports: Path = Path("reports/ranker"),
        config: TrainConfig | None = None, store=None, registry: Registry | None = None,
        window: DataWindow | None = None, promote: bool = False, shuffle_labels: bool = False,
        online: str = "sqlite", gate: GateRules = GATE) -> TrainResult:
    """Train, gate and register the ranker (models/lifecycle.py); raises GateRefused.

    `store` defaults to the project's Feast store (or a private one); `window` to the whole
    simulation split by days; `gate` overrides the model's gate rules (tests on a city too small for the
    targets); `shuffle_labels` permutes the training labels (a deliberately bad model).
    """
    config = config or TrainConfig()
    data_dir = Path(data_dir)
    window = window or DataWindow(test_days=config.test_days, validation_days=config.validation_days)
    return lifecycle.train(
        MODEL_NAME, FEATURE_SERVICE, gate,
        lambda stage: _build(stage, data_dir, Path(reports), config, store, window, shuffle_labels),
        Path(artifacts), registry, serving_store(data_dir, store, online), promote, config.seed, config.threads,
        config)


def score_artifact(directory: Path, test: pd.DataFrame) -> float:
    """Log loss of the ranker artifact in `directory` on `test` impressions at their logged positions (ONNX)."""
    manifest = load_manifest(directory)
    inputs = build_inputs(feed_data.model_columns(test), manifest.feature_defaults, test["position"].to_numpy())
    return logloss(test["ordered"].to_numpy(), onnx_predict(onnx_session(Path(directory) / ONNX_FILE), inputs))


def _build(stage: Path, data_dir: Path, reports: Path, config: TrainConfig, store, window: DataWindow,
           shuffle_labels: bool) -> Staged:
    simulated = feed_data.simulation_window(data_dir)
    window = window.resolve(simulated.start, simulated.end)
    impressions = window.select(feed_data.load_impressions(data_dir, simulated))
    join_started = time.perf_counter()
    with feed_data.feature_store(data_dir, store, FEATURE_SERVICE) as feast:
        frame = feed_data.training_frame(feast, impressions)
    join_seconds = time.perf_counter() - join_started
    train, validation, test = window.split(frame)
    true_labels = train["ordered"].to_numpy()  # the popularity baselines are references: true labels
    if shuffle_labels:
        train = shuffled(train, "ordered", config.seed)
    print(f"point-in-time training set: {len(train)} train, {len(validation)} validation, {len(test)} test "
          f"impressions (positive rate {train['ordered'].mean():.4f}; join {join_seconds:.1f} s)")

    defaults = no_history_defaults(float(train["ordered"].mean()), float(train["price_level"].median()))
    columns = {name: feed_data.model_columns(part) for name, part in
               (("train", train), ("validation", validation), ("test", test))}
    train_rows = with_missing(train, config.missing_share, config.seed)
    x_train = build_inputs(feed_data.model_columns(train_rows), defaults, train_rows["position"].to_numpy())
    x_validation = build_inputs(columns["validation"], defaults, validation["position"].to_numpy())
    y_validation = validation["ordered"].to_numpy()
    fit_started = time.perf_counter()
    model, treatment, comparison = compare_treatments(x_train, train_rows["ordered"].to_numpy(), x_validation,
                                                      y_validation, config)
    fit_seconds = time.perf_counter() - fit_started

    onnx_path = export_onnx(model, stage / ONNX_FILE)
    created = datetime.now(UTC)
    version = new_version(MODEL_NAME, onnx_path, created)
    session = onnx_session(onnx_path)
    x_test = build_inputs(columns["test"], defaults, test["position"].to_numpy())
    predicted = onnx_predict(session, x_test)
    expected = predict(model, {k: v[:PARITY_ROWS] for k, v in x_test.items()})
    at_top = onnx_predict(session, build_inputs(columns["test"], defaults))  # serving position
    variants = {  # the test impressions as if ...
        "cold_start": test.assign(restaurant_id=-1),  # ... no restaurant had been seen in training
        "new_restaurant": test.assign(restaurant_id=-1, **{c: np.nan for c in RESTAURANT_STATS + PLATFORM_FEATURES}),
        "new_user": test.assign(**{c: np.nan for c in [*USER_FEATURES, "cuisine_affinity"]}),
    }
    baseline = fit_baseline(train["conversion_7d"].fillna(defaults["conversion_7d"]).to_numpy(),
                            train["position"].to_numpy(), true_labels)
    y_test = test["ordered"].to_numpy()
    context = {"version": version, "test_window": time_window(test), "validation_window": time_window(validation),
               "training_window": time_window(train), "kept_treatment": treatment.name,
               "n_train": len(train), "n_validation": len(validation), "data_window": window.to_dict(),
               "shuffled_labels": shuffle_labels,
               "position_handling": "training-only input: p = examine(position) * sigmoid(relevance), "
                                    "examine learnt per slot (monotone, 1 at the top); metrics at the "
                                    "logged positions, serving scores at position 1"}
    # the baseline without its position term: conversion_7d alone, calibrated (ranking = popularity)
    conversion = train["conversion_7d"].fillna(defaults["conversion_7d"]).to_numpy()
    alone = fit_baseline(conversion, np.ones(len(train)), true_labels)
    alone_p = alone.predict(test["conversion_7d"].fillna(defaults["conversion_7d"]).to_numpy(), np.ones(len(test)))
    extra = {
        "popularity_only_auc": scores(y_test, alone_p)["auc"],
        "popularity_only_logloss": logloss(y_test, alone_p),
        "imbalance_comparison": comparison,
        "kept_treatment": treatment.name,
        # cold start: every restaurant never seen (id unknown; with / without statistics), every user new
        **{f"{name}_{k}": v for name, frame_ in variants.items() for k, v in scores(
            y_test, onnx_predict(session, build_inputs(feed_data.model_columns(frame_), defaults,
                                                       test["position"].to_numpy()))).items()},
        # the learnt position bias next to the simulator's true one (examine at slots 1..20)
        "position_examine_learned": [round(float(v), 4) for v in
                                     torch.exp(model.log_examine().detach())[1:].tolist()],
        "position_examine_true": [round(float(v), 4) for v in examine(np.arange(1, MAX_POSITION + 1))],
    }
    metrics = evaluate(test, predicted, at_top, baseline, reports, context, extra)
    write_drift_reference(stage, at_top)
    restaurants = pd.read_parquet(data_dir / "offline" / "restaurants.parquet")
    restaurants = restaurants[restaurants["event_timestamp"] <= train["event_timestamp"].max()]
    write_restaurants(stage, restaurants, ["restaurant_id", "lat", "lon", "cuisine", "price_level"])
    seen = np.unique(x_train["restaurant_bucket"])
    write_manifest(stage, version, time_window(train), {k: v for k, v in metrics.items()
                                                         if k != "imbalance_comparison"}, defaults, created,
                   extra={"validation_window": time_window(validation), "test_window": time_window(test),
                          "n_train": len(train), "n_validation": len(validation), "data_window": window.to_dict(),
                          "kept_treatment": treatment.name, "logit_offset": treatment.offset,
                          "imbalance_comparison": comparison, "fit_seconds": round(fit_seconds, 1),
                          "hidden": list(config.hidden), "id_dim": config.id_dim,
                          "id_dropout": config.id_dropout, "restaurant_buckets_trained": len(seen),
                          "baseline": {"intercept": baseline.intercept, "conversion": baseline.conversion,
                                       "log_position": baseline.log_position}})
    lineage = {"data_window": window.to_dict(), "n_train": len(train), "n_validation": len(validation),
               "n_test": len(test), "n_logged": 0, "shuffled_labels": shuffle_labels,
               "kept_treatment": treatment.name}
    return Staged(version, metrics, (expected, predicted[:PARITY_ROWS]),
                  lambda directory: score_artifact(directory, test), lineage, len(train), len(validation), model,
                  {"train": train, "validation": validation, "test": test}, defaults)


SUMMARY_KEYS = ["auc", "logloss", "normalized_entropy", "calibration_error", "baseline_auc", "baseline_logloss",
                "oracle_auc", "oracle_logloss", "logloss_vs_oracle", "auc_lift_vs_baseline",
                "serving_position_spearman", "cold_start_auc", "new_restaurant_auc", "new_user_auc",
                "kept_treatment", "targets_met"]


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; prints a JSON summary (with the imbalance treatments), or the failed gate check."""
    lifecycle.command_line(__doc__.splitlines()[0], "reports/ranker", TrainConfig, run, SUMMARY_KEYS, argv,
                           extra=lambda result: {"imbalance": {r["treatment"]: round(r["validation_logloss"], 5)
                                                               for r in result.metrics["imbalance_comparison"]}})

if __name__ == "__main__":
    main()
