"""Point-in-time training sets for the feed models, from the simulator's impressions and Feast.

Every feature of an impression is what the online store would have served at the
impression's time (`get_historical_features` with the model's feature service).
Shared by the ranker and the retrieval model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from models.eta import data as eta_data
from models.eta.data import SimulationWindow, simulation_window, split_by_time  # noqa: F401  (re-exported)
from models.ranker.features import FEATURE_SERVICE, SERVICE_FEATURES

# Columns of impressions.parquet a model may read, plus label and ids.
IMPRESSION_COLUMNS = ["session_id", "user_id", "restaurant_id", "position", "event_timestamp", "user_lat",
                      "user_lon", "ordered"]
# The oracle and its parts: for evaluation only, never an input.
TRUTH_COLUMNS = ["true_p_order", "true_p_order_at_top"]


def load_impressions(data_dir: Path, window: SimulationWindow) -> pd.DataFrame:
    """Impressions in [start, end): warm-up days dropped (their history features are thin)."""
    path = Path(data_dir) / "offline" / "impressions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `make data` (the simulator writes the feed sessions)")
    frame = pd.read_parquet(path, columns=IMPRESSION_COLUMNS + TRUTH_COLUMNS)
    keep = (frame["event_timestamp"] >= window.start) & (frame["event_timestamp"] < window.end)
    frame = frame[keep].sort_values(["event_timestamp", "session_id", "position"], kind="stable")
    frame = frame.reset_index(drop=True)
    frame.insert(0, "impression_id", range(len(frame)))
    return frame


def project_store(service: str, data_dir: Path | None = None):
    """The project's feature store, where `make features` applied it (`<data_dir>/feast`); the error says to
    apply the repository when `service` is unknown."""
    from feature_repo.store import open_store

    store = open_store(data_dir=Path(data_dir) if data_dir is not None else None)
    try:
        store.get_feature_service(service)
    except Exception as exc:  # feast raises several kinds here (registry missing, service unknown)
        raise RuntimeError(f"feature service {service!r} is not in the feature registry: run `make features` "
                           f"(python -m feature_repo.store apply) first ({exc})") from exc
    return store


@contextmanager
def feature_store(data_dir: Path, store, service: str) -> Iterator:
    """`store` if given, else the project's (for the project's data dir), else a throw-away one."""
    if store is not None:
        yield store
    elif eta_data.is_project_data(data_dir):
        yield project_store(service, data_dir)
    else:
        temporary, workdir = eta_data.temporary_store(data_dir)
        with workdir:
            yield temporary


def training_frame(store, impressions: pd.DataFrame) -> pd.DataFrame:
    """Impressions joined point-in-time with the ranker_v1 features, in the impressions' order."""
    entities = impressions[["impression_id", "user_id", "restaurant_id", "user_lat", "user_lon", "event_timestamp"]]
    joined = store.get_historical_features(
        entity_df=entities, features=store.get_feature_service(FEATURE_SERVICE)).to_df()
    features = joined[["impression_id", *SERVICE_FEATURES]]
    frame = impressions.merge(features, on="impression_id", how="left", validate="one_to_one")
    if frame["cuisine"].isna().any():
        missing = frame.loc[frame["cuisine"].isna(), "restaurant_id"].unique()[:5]
        raise ValueError(f"restaurants without a profile row (e.g. {list(missing)}): regenerate data with `make data`")
    return frame


def model_columns(frame: pd.DataFrame) -> dict:
    """The columns `build_inputs` reads, from a joined frame (request time as UTC epoch seconds)."""
    from models.eta.features import epoch_seconds

    columns = {name: frame[name].to_numpy() for name in SERVICE_FEATURES if name != "cuisine"}
    columns["cuisine"] = frame["cuisine"].to_numpy(dtype=object)
    for name in ("restaurant_id", "user_lat", "user_lon"):
        columns[name] = frame[name].to_numpy()
    columns["request_time"] = epoch_seconds(frame["event_timestamp"])
    return columns
