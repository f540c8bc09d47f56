"""Point-in-time training sets for the ETA model, from the simulator's orders and Feast.

Every feature value of an order is the value the online store would have served at the
order's time (Feast `get_historical_features`), never a later one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from models.eta.features import FEATURE_SERVICE, LIVE_FEATURES, PROFILE_FEATURES

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FEATURE_REPO = PROJECT_ROOT / "feature_repo"
# Columns of orders.parquet the model may read, plus label and ids; `true_*` is for evaluation only.
ORDER_COLUMNS = [
    "order_id",
    "event_timestamp",
    "restaurant_id",
    "area_id",
    "delivery_lat",
    "delivery_lon",
    "delivery_minutes",
]
TRUTH_COLUMNS = ["true_eta_minutes"]  # for the noise floor in evaluation; never an input


@dataclass(frozen=True)
class SimulationWindow:
    """Times of the simulated data: warm-up start, start of meaningful orders, end (all UTC)."""

    warmup_start: pd.Timestamp
    start: pd.Timestamp
    end: pd.Timestamp


def simulation_window(data_dir: Path) -> SimulationWindow:
    """Read `<data_dir>/offline/simulation.json`; the error says how to make it."""
    path = Path(data_dir) / "offline" / "simulation.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing: run `make data` (python -m models.simulator --out {path.parent})"
        )
    raw = json.loads(path.read_text())
    return SimulationWindow(
        *(pd.Timestamp(raw[key]).tz_convert("UTC") for key in ("warmup_start", "start", "end"))
    )


def load_orders(data_dir: Path, window: SimulationWindow) -> pd.DataFrame:
    """Orders in [start, end): warm-up orders dropped (prep stats not yet meaningful)."""
    path = Path(data_dir) / "offline" / "orders.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `make data`")
    orders = pd.read_parquet(path, columns=ORDER_COLUMNS + TRUTH_COLUMNS)
    keep = (orders["event_timestamp"] >= window.start) & (orders["event_timestamp"] < window.end)
    return orders[keep].sort_values("event_timestamp").reset_index(drop=True)


def isolated_store(data_dir: Path, work_dir: Path):
    """A Feast store over `<data_dir>/offline` with its registry and online store under `work_dir`.

    For data that is not the project's own `data/` (tests, experiments): nothing under
    feature_repo/ or data/feast is touched.
    """
    from feature_repo.store import apply, open_store

    store = open_store("sqlite", data_dir=work_dir)
    apply(store, data_dir=data_dir)
    return store


def project_store(data_dir: Path | None = None):
    """The project's feature store, where `make features` applied it (`<data_dir>/feast`, data_dir =
    COURIER_DATA_DIR or data/); errors say to apply first."""
    from feature_repo.store import open_store

    store = open_store(data_dir=Path(data_dir) if data_dir is not None else None)
    try:
        store.get_feature_service(FEATURE_SERVICE)
    # feast raises several kinds here (registry file missing, service unknown)
    except Exception as exc:
        raise RuntimeError(
            f"feature service {FEATURE_SERVICE!r} is not in the feature registry: "
            "run `make features` "
            f"(python -m feature_repo.store apply) first ({exc})"
        ) from exc
    return store


def is_project_data(data_dir: Path) -> bool:
    """True when `data_dir` is the one the project's registry uses (COURIER_DATA_DIR, data/)."""
    default = Path(os.environ.get("COURIER_DATA_DIR", PROJECT_ROOT / "data"))
    return Path(data_dir).resolve() == default.resolve()


def training_frame(store, orders: pd.DataFrame) -> pd.DataFrame:
    """Orders joined point-in-time with the eta_v1 features, in the orders' order."""
    entities = orders[["order_id", "restaurant_id", "area_id", "event_timestamp"]]
    joined = store.get_historical_features(
        entity_df=entities, features=store.get_feature_service(FEATURE_SERVICE)
    ).to_df()
    features = joined[["order_id", *PROFILE_FEATURES, *LIVE_FEATURES]]
    frame = orders.merge(features, on="order_id", how="left", validate="one_to_one")
    if frame["lat"].isna().any():
        missing = frame.loc[frame["lat"].isna(), "restaurant_id"].unique()[:5]
        raise ValueError(
            f"restaurants without a profile row (e.g. {list(missing)}): "
            "regenerate data with `make data`"
        )
    return frame


def split_by_time(
    frame: pd.DataFrame, end: pd.Timestamp, test_days: float = 3.0, validation_days: float = 2.0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, validation, test): test = last `test_days` before `end`, validation before it."""
    test_start = end - pd.Timedelta(days=test_days)
    validation_start = test_start - pd.Timedelta(days=validation_days)
    t = frame["event_timestamp"]
    train, validation, test = (
        frame[t < validation_start],
        frame[(t >= validation_start) & (t < test_start)],
        frame[t >= test_start],
    )
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        if len(part) == 0:
            raise ValueError(
                f"the {name} split is empty: simulate more days (`--days`) than "
                f"{test_days + validation_days:g} days of held-out orders"
            )
    return (
        train.reset_index(drop=True),
        validation.reset_index(drop=True),
        test.reset_index(drop=True),
    )


def temporary_store(data_dir: Path) -> tuple:
    """(store, TemporaryDirectory) over any data dir; keep the directory while using it."""
    tmp = tempfile.TemporaryDirectory(prefix="eta-feast-")
    return isolated_store(data_dir, Path(tmp.name)), tmp
