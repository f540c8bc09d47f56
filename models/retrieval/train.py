"""Train, evaluate, export, gate and register the two-tower retrieval model.

    python -m models.retrieval.train [--data-dir data] [--artifacts artifacts] [--reports reports/retrieval]
                                     [--epochs N] [--seed S] [--promote] [--registry URI]

Steps: orders in [start, end) of simulation.json (order stream + feed orders) -> point-in-time
join with retrieval_v1 -> time split (feed orders of the last 3 days = test, 2 days before =
validation, every order before = training) -> softmax over each order's hard-filtered
candidates -> user tower to ONNX, restaurant embeddings precomputed -> recall@K on the test
orders (user tower run through ONNX Runtime, as served) vs popularity -> artifact
staged artifact -> gate -> `<artifacts>/retrieval/<version>` -> registered (models/lifecycle.py).
"""

from __future__ import annotations

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
from models.eta.features import epoch_seconds
from models.gate import GateRules
from models.lifecycle import DataWindow, Staged, TrainResult, serving_store, shuffled, time_window
from models.ranker import data as feed_data
from models.ranker.export import onnx_session
from models.ranker.features import UNKNOWN_RESTAURANT, USER_FEATURES
from models.registry import Registry
from models.retrieval import data as retrieval_data
from models.retrieval.evaluate import (
    GATE,
    RECALL_KS,
    TARGET_SHARE,
    expected_hits,
    oracle_scores,
    plot_recall,
    recall_table,
    summarise,
    targets,
    write_metrics,
)
from models.retrieval.export import (
    MODEL_NAME,
    export_user_tower,
    user_embeddings,
    write_index,
    write_manifest,
)
from models.retrieval.features import (
    FEATURE_SERVICE,
    build_restaurant_inputs,
    build_user_inputs,
    hard_filter,
    radius_of_city,
    user_defaults,
)
from models.retrieval.index import EMBEDDINGS_FILE, RESTAURANTS_FILE
from models.retrieval.network import TwoTower

__all__ = ["TrainConfig", "TrainResult", "fit", "main", "run", "score_artifact", "user_columns"]
PARITY_ROWS = 2048  # held-out users the gate compares ONNX with PyTorch on


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults train the default city in well under a minute on one core."""

    epochs: int = 12
    batch_size: int = 512
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    hidden: tuple[int, ...] = (64,)
    id_dim: int = 16
    # share of restaurants whose id is hidden in each batch: the cold-start embedding is learnt
    id_dropout: float = 0.1
    # share of training orders also shown without user history (new users)
    missing_share: float = 0.1
    seed: int = 7
    threads: int = 1
    test_days: float = 3.0
    validation_days: float = 2.0


@dataclass
class _Split:
    """One set of orders as arrays: user tower inputs, target column, candidate masks."""

    frame: pd.DataFrame
    user_dense: np.ndarray
    target: np.ndarray
    mask: np.ndarray


def user_columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The columns `build_user_inputs` reads, from an orders frame."""
    columns = {name: frame[name].to_numpy() for name in USER_FEATURES}
    columns.update(user_lat=frame["user_lat"].to_numpy(), user_lon=frame["user_lon"].to_numpy(),
                   request_time=epoch_seconds(frame["event_timestamp"]))
    return columns


def _split(frame: pd.DataFrame, restaurants: pd.DataFrame, defaults: dict) -> _Split:
    rows = pd.Index(restaurants["restaurant_id"]).get_indexer(frame["restaurant_id"])
    frame = frame[rows >= 0].reset_index(drop=True)  # orders of restaurants unknown at training time
    rows = rows[rows >= 0]
    columns = user_columns(frame)
    mask = hard_filter(restaurants["lat"].to_numpy(), restaurants["lon"].to_numpy(),
                       restaurants["opens_hour"].to_numpy(), restaurants["closes_hour"].to_numpy(),
                       columns["user_lat"], columns["user_lon"], columns["request_time"], radius_of_city())
    mask[np.arange(len(rows)), rows] = True  # the ordered restaurant was a candidate by construction
    return _Split(frame, build_user_inputs(columns, defaults)["user_dense"], rows.astype(np.int64), mask)


def _loss(model: TwoTower, part: _Split, rows: torch.Tensor | slice, restaurant_dense: torch.Tensor,
          bucket: torch.Tensor) -> torch.Tensor:
    logits = model.scores(torch.from_numpy(part.user_dense[rows]), restaurant_dense, bucket)
    logits = logits.masked_fill(~torch.from_numpy(part.mask[rows]), float("-inf"))
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(part.target[rows]))


def fit(model: TwoTower, train: _Split, validation: _Split, restaurant_inputs: dict, config: TrainConfig) -> dict:
    """AdamW on the candidate softmax with restaurant-id dropout; keeps the best validation epoch."""
    restaurant_dense = torch.from_numpy(restaurant_inputs["restaurant_dense"])
    bucket = torch.from_numpy(restaurant_inputs["restaurant_bucket"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = max(1, -(-len(train.target) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, pct_start=0.1,
                                                   epochs=config.epochs, steps_per_epoch=steps)
    generator = torch.Generator().manual_seed(config.seed)
    best = {"validation_loss": float("inf"), "epoch": -1, "state": None}
    history = []
    progress = tqdm(range(config.epochs), desc="training retrieval", unit="epoch")
    for epoch in progress:
        model.train()
        order = torch.randperm(len(train.target), generator=generator).numpy()
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            rows = np.sort(order[i:i + config.batch_size])
            drop = torch.rand(len(bucket), generator=generator) < config.id_dropout
            loss = _loss(model, train, rows, restaurant_dense, torch.where(drop, UNKNOWN_RESTAURANT, bucket))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        model.eval()
        with torch.no_grad():
            v_loss = float(_loss(model, validation, slice(None), restaurant_dense, bucket))
        history.append({"epoch": epoch + 1, "train_loss": total / len(order), "validation_loss": v_loss})
        if v_loss < best["validation_loss"]:
            best = {"validation_loss": v_loss, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        progress.set_postfix(val_loss=f"{v_loss:.4f}", best=best["epoch"])
    model.load_state_dict(best["state"])
    model.eval()
    return {"best_epoch": best["epoch"], "best_validation_loss": best["validation_loss"], "history": history}


def _popularity_scores(popularity: pd.DataFrame, frame: pd.DataFrame) -> np.ndarray:
    """[N, R] orders_7d of every restaurant at the latest daily snapshot before each order."""
    snapshots = epoch_seconds(popularity.index)
    which = np.searchsorted(snapshots, epoch_seconds(frame["event_timestamp"]), side="right") - 1
    values = popularity.to_numpy(dtype=np.float64)
    return np.where(which[:, None] >= 0, values[np.maximum(which, 0)], 0.0)


def run(data_dir: Path = Path("data"), artifacts: Path = Path("artifacts"), reports: Path = Path("reports/retrieval"),
        config: TrainConfig | None = None, store=None, registry: Registry | None = None,
        window: DataWindow | None = None, promote: bool = False, shuffle_labels: bool = False,
        online: str = "sqlite", gate: GateRules = GATE) -> TrainResult:
    """Train, gate and register the retrieval model (models/lifecycle.py); raises GateRefused.

    `store` defaults to the project's Feast store (or a private one); `window` to the whole
    simulation split by days; `gate` overrides the model's gate rules (tests on a city too small for the
    targets); `shuffle_labels` permutes which restaurant each training order went to.
    """
    config = config or TrainConfig()
    data_dir = Path(data_dir)
    window = window or DataWindow(test_days=config.test_days, validation_days=config.validation_days)
    return lifecycle.train(
        MODEL_NAME, FEATURE_SERVICE, gate,
        lambda stage: _build(stage, data_dir, Path(reports), config, store, window, shuffle_labels),
        Path(artifacts), registry, serving_store(data_dir, store, online), promote, config.seed, config.threads,
        config)


def score_artifact(directory: Path, test: pd.DataFrame, k: int = 10) -> float:
    """recall@k of the retrieval artifact in `directory` on held-out `test` orders, through its own index.

    Orders of a restaurant the artifact's index does not hold count as misses: it could not retrieve them.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    restaurants = pd.read_parquet(directory / RESTAURANTS_FILE)
    embeddings = np.load(directory / EMBEDDINGS_FILE)
    part = _split(test, restaurants, manifest.feature_defaults)
    if len(test) == 0:
        raise ValueError("no held-out orders to score retrieval on")
    scores = user_embeddings(onnx_session(directory / ONNX_FILE), {"user_dense": part.user_dense}) @ embeddings.T
    return float(expected_hits(scores, part.mask, part.target, np.array([k]))[:, 0].sum() / len(test))


def _build(stage: Path, data_dir: Path, reports: Path, config: TrainConfig, store, window: DataWindow,
           shuffle_labels: bool) -> Staged:
    simulated = feed_data.simulation_window(data_dir)
    window = window.resolve(simulated.start, simulated.end)
    orders = window.select(retrieval_data.load_orders(data_dir, simulated))
    with feed_data.feature_store(data_dir, store, FEATURE_SERVICE) as feast:
        orders = retrieval_data.with_user_features(feast, orders)
    feed = orders["source"] == "feed"
    # the cut is placed on the feed orders (the evaluated ones); the order stream before it trains too
    validation_start, test_start = window.cut(orders.loc[feed, "event_timestamp"])
    t = orders["event_timestamp"]
    frames = {"train": orders[t < validation_start], "validation": orders[feed & (t >= validation_start) & (t < test_start)],
              "test": orders[feed & (t >= test_start)], "test_orders": orders[~feed & (t >= test_start)]}
    for name, part in frames.items():
        if len(part) == 0:
            raise ValueError(f"the {name} split of the window {window.to_dict()} is empty: simulate more days "
                             "(`make data`), or widen the window (--days)")
    if shuffle_labels:
        frames["train"] = shuffled(frames["train"], "restaurant_id", config.seed)
    restaurants = retrieval_data.restaurant_directory(data_dir, frames["train"]["event_timestamp"].max())
    defaults = user_defaults()
    splits = {name: _split(part, restaurants, defaults) for name, part in frames.items()}
    fit_rows = splits["train"]
    if config.missing_share > 0:  # a copy of some orders as new users: the defaults are learnt
        new_users = frames["train"].sample(frac=config.missing_share, random_state=config.seed)
        new_users[USER_FEATURES] = np.nan
        fit_rows = _split(pd.concat([frames["train"], new_users], ignore_index=True), restaurants, defaults)
    print(f"point-in-time training set: {len(splits['train'].target)} training orders "
          f"({int((frames['train']['source'] == 'feed').sum())} from the feed), "
          f"{len(splits['validation'].target)} validation and {len(splits['test'].target)} test feed orders, "
          f"{len(restaurants)} restaurants")

    restaurant_inputs = build_restaurant_inputs({c: restaurants[c].to_numpy() for c in restaurants.columns})
    model = TwoTower(config.hidden, id_dim=config.id_dim)
    model.user.norm.fit(fit_rows.user_dense)
    model.restaurant.norm.fit(restaurant_inputs["restaurant_dense"])
    fit_started = time.perf_counter()
    history = fit(model, fit_rows, splits["validation"], restaurant_inputs, config)
    fit_seconds = time.perf_counter() - fit_started

    onnx_path = export_user_tower(model.user, stage / ONNX_FILE)
    with torch.no_grad():
        embeddings = model.restaurant(torch.from_numpy(restaurant_inputs["restaurant_dense"]),
                                      torch.from_numpy(restaurant_inputs["restaurant_bucket"])).numpy()
        expected = model.user(torch.from_numpy(splits["test"].user_dense[:PARITY_ROWS])).numpy()
    write_index(stage, restaurants, embeddings)
    created = datetime.now(UTC)
    version = new_version(MODEL_NAME, onnx_path, created)
    session = onnx_session(onnx_path)
    popularity = retrieval_data.popularity_by_day(data_dir, restaurants["restaurant_id"].to_numpy())
    truth = retrieval_data.truth(data_dir, restaurants)
    max_k = max(RECALL_KS)
    metrics, curves = {}, {}
    for name, prefix, kind in (("test", "", "feed"), ("test_orders", "orders_", "orders")):
        part = splits[name]
        scores = user_embeddings(session, {"user_dense": part.user_dense}) @ embeddings.T
        curves[name] = {
            "": recall_table(scores, part.mask, part.target, max_k),
            "baseline_": recall_table(_popularity_scores(popularity, part.frame), part.mask, part.target, max_k),
            "oracle_": recall_table(oracle_scores(part.frame, *truth, kind), part.mask, part.target, max_k),
        }
        metrics.update(summarise(curves[name], prefix))
    # the same held-out orders as if every user were new (no history row: the defaults)
    new_users = _split(splits["test"].frame.assign(**{c: np.nan for c in USER_FEATURES}), restaurants, defaults)
    scores = user_embeddings(session, {"user_dense": new_users.user_dense}) @ embeddings.T
    new_curve = recall_table(scores, new_users.mask, new_users.target, max_k)
    metrics.update({f"new_user_recall_at_{k}": float(new_curve[k - 1]) for k in RECALL_KS})
    metrics.update(targets(metrics))
    metrics["mean_candidates"] = float(splits["test"].mask.sum(axis=1).mean())
    metrics["n_test"] = len(splits["test"].target)
    metrics["orders_n_test"] = len(splits["test_orders"].target)
    plot_recall(reports, {"two-tower": curves["test"][""], "popularity (orders_7d)": curves["test"]["baseline_"],
                          "oracle (true relevance)": curves["test"]["oracle_"]},
                f"Retrieval recall@K, held-out feed orders (mean {metrics['mean_candidates']:.0f} candidates)")
    context = {"version": version, "test_window": time_window(frames["test"]),
               "validation_window": time_window(frames["validation"]), "training_window": time_window(frames["train"]),
               "best_epoch": history["best_epoch"], "fit_seconds": round(fit_seconds, 1),
               "n_train": len(splits["train"].target), "data_window": window.to_dict(),
               "shuffled_labels": shuffle_labels,
               "target": f"recall_at_10 >= baseline + {TARGET_SHARE} * (oracle - baseline)"}
    write_metrics(reports, metrics, context)
    write_manifest(stage, version, time_window(frames["train"]), metrics, defaults, created,
                   extra={"validation_window": context["validation_window"], "test_window": context["test_window"],
                          "n_train": context["n_train"], "best_epoch": history["best_epoch"],
                          "data_window": window.to_dict(),
                          "best_validation_loss": history["best_validation_loss"],
                          "fit_seconds": context["fit_seconds"], "hidden": list(config.hidden),
                          "id_dim": config.id_dim, "id_dropout": config.id_dropout,
                          "radius_km": radius_of_city(), "serving_k": 100})
    lineage = {"data_window": window.to_dict(), "n_train": len(splits["train"].target),
               "n_validation": len(splits["validation"].target), "n_test": len(splits["test"].target),
               "n_logged": 0, "shuffled_labels": shuffle_labels, "best_epoch": history["best_epoch"]}
    test_frame = splits["test"].frame
    parity = (expected, user_embeddings(session, {"user_dense": splits["test"].user_dense[:PARITY_ROWS]}))
    return Staged(version, metrics, parity, lambda directory: score_artifact(directory, test_frame), lineage,
                  len(splits["train"].target), len(splits["validation"].target), model,
                  {**{k: s.frame for k, s in splits.items()}, "restaurants": restaurants}, defaults)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; prints a JSON summary, or the failed gate check (exit 1)."""
    lifecycle.command_line(__doc__.splitlines()[0], "reports/retrieval", TrainConfig, run, None, argv)

if __name__ == "__main__":
    main()
