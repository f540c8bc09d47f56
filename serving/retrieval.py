"""Candidate generation: hard filters (open now, within reach), then two-tower retrieval.

The restaurant directory (place, opening hours, sponsorship) is read from the online
store and kept for at most `directory_max_age_s` (an explicit freshness bound); the
restaurant embeddings come with the model artifact and are searched by brute force:
a few hundred to a few thousand dot products take microseconds in numpy, less than any
index's own overhead at this size (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from feature_repo.store import open_store
from models.marketplace import DELIVERY_RADIUS_KM
from models.retrieval.features import build_user_inputs, hard_filter
from serving.features import OnlineFeatures, StoreUnavailable
from serving.metrics import ServingMetrics
from serving.onnx_model import OnnxModel, ServedOnnxModel
from serving.paths import resolve
from serving.variants import CHAMPION, Variants, VersionedDeployment, describe

logger = logging.getLogger("ray.serve")
DIRECTORY_FEATURES = ["lat", "lon", "opens_hour", "closes_hour", "cuisine", "sponsored"]


@dataclass
class Directory:
    """Every retrievable restaurant, as arrays aligned with the embedding matrix."""

    ids: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    opens: np.ndarray
    closes: np.ndarray
    sponsored: np.ndarray
    read_at: float


class RetrievalPipeline(ServedOnnxModel):
    """Narrows the city's restaurants to the few hundred worth ranking for one user, here, now."""

    def __init__(self, model_dir: str, online_store: str = "sqlite", data_dir: str | None = None,
                 redis: str | None = None, feast_project: str | None = None, feature_timeout_ms: float = 100,
                 directory_max_age_s: float = 60, radius_km: float = DELIVERY_RADIUS_KM,
                 export_metrics: bool = False, store: Any = None, metrics: ServingMetrics | None = None):
        """`store`: an open Feast store to share; `metrics`: the host's ServingMetrics (one per process)."""
        self.model = OnnxModel(resolve(model_dir))
        self.embeddings = np.load(self.model.directory / "restaurant_embeddings.npy").astype(np.float32)
        self.ids = np.load(self.model.directory / "restaurant_ids.npy").astype(np.int64)
        self.store = store if store is not None else open_store(
            online_store, data_dir=resolve(data_dir) if data_dir else None, redis=redis, project=feast_project)
        self.user_features = OnlineFeatures(self.store, self.model.manifest.feature_service,
                                            deadline_s=feature_timeout_ms / 1000)
        self.user_features.warm_up({"user_id": 1})
        self.defaults = self.model.manifest.feature_defaults
        self.directory_max_age_s, self.radius_km = directory_max_age_s, radius_km
        self.metrics = metrics or ServingMetrics(export=export_metrics)
        self.metrics.model_loaded("retrieval", self.model.version, self.model.manifest.created_at)
        self._lock = threading.Lock()
        self.directory = self._read_directory()

    def _read_directory(self) -> Directory:
        """The restaurant directory from the online store, aligned with the embedding rows."""
        wanted = [f"restaurant_profile:{name}" for name in DIRECTORY_FEATURES]
        present = {f.name for f in self.store.get_feature_view("restaurant_profile").features}
        raw = self.store.get_online_features(features=[w for w in wanted if w.split(":")[1] in present],
                                             entity_rows=[{"restaurant_id": int(r)} for r in self.ids]).to_dict()

        def column(name: str, fill: float) -> np.ndarray:
            values = raw.get(name, [None] * len(self.ids))
            return np.array([fill if v is None else v for v in values], dtype=np.float64)

        lat = column("lat", np.nan)  # a restaurant without a profile row can never pass the filters
        return Directory(self.ids, lat, column("lon", np.nan), column("opens_hour", 0), column("closes_hour", 0),
                         column("sponsored", 0).astype(bool), time.monotonic())

    def _fresh_directory(self) -> Directory:
        """The directory; past its freshness bound a background re-read starts (never on the request path)."""
        if time.monotonic() - self.directory.read_at > self.directory_max_age_s and self._lock.acquire(blocking=False):
            threading.Thread(target=self._refresh, name="directory-refresh", daemon=True).start()
        return self.directory

    def _refresh(self) -> None:
        try:
            self.directory = self._read_directory()
        except Exception:  # a stale directory beats no feed; the next request past the bound tries again
            logger.warning("restaurant directory refresh failed; keeping the last one", exc_info=True)
        finally:
            self._lock.release()

    def candidates(self, user_id: int, user_lat: float, user_lon: float, request_time: float,
                   k: int) -> dict[str, Any]:
        """Top-k restaurants (open now, within reach) by embedding score, with their sponsorship."""
        timings: dict[str, float] = {}
        directory = self._fresh_directory()
        with self.metrics.stage("feed", "hard_filters", timings):
            # the offline index's filter (models/retrieval/features.py), not a second copy of the rule
            eligible = np.flatnonzero(hard_filter(directory.lat, directory.lon, directory.opens, directory.closes,
                                                  user_lat, user_lon, request_time, self.radius_km))
        fallback = None
        with self.metrics.stage("feed", "user_features", timings):
            try:
                # freshness judged at the feed's time, as the training join judged it at each impression's
                values = self.user_features.read({"user_id": int(user_id)}, now=request_time).values
            except StoreUnavailable as exc:
                fallback = f"online store unavailable ({exc}); user treated as new"
                self.metrics.fallbacks.inc(tags={"endpoint": "feed", "reason": "online_store_unavailable"})
                values = {}
        known_user = any(v is not None for v in values.values())
        with self.metrics.stage("feed", "retrieval", timings):
            columns = {name: [value] for name, value in values.items()}
            columns.update(user_lat=[user_lat], user_lon=[user_lon], request_time=[request_time])
            user = self.model.run(build_user_inputs(columns, self.defaults))["user_embedding"].reshape(-1)
            scores = self.embeddings[eligible] @ user
            top = np.argsort(-scores)[:k] if len(scores) > k else np.argsort(-scores)
            chosen = eligible[top]
        return {
            "restaurant_ids": directory.ids[chosen].tolist(),
            "retrieval_scores": scores[top].tolist(),
            "sponsored": directory.sponsored[chosen].tolist(),
            "eligible": len(eligible),
            "known_user": known_user,
            "model_version": self.model.version,
            "fallback": fallback,
            "timings_ms": timings,
        }


@serve.deployment(name="Retrieval")
class Retrieval(VersionedDeployment):
    """Candidate generation as a Ray Serve deployment (also serves the user tower over OIP v2).

    Its user_config has only `version`: the embeddings index the whole catalogue, so a version
    change is a swap, never a split."""

    def __init__(self, artifacts: str = "artifacts", registry: str | None = None, **pipeline: Any):
        """`pipeline`: RetrievalPipeline's arguments (online_store, data_dir, directory_max_age_s, ...)."""
        self.metrics = ServingMetrics()
        self.pipeline = pipeline
        self.store = None
        self.variants: Variants[RetrievalPipeline] = Variants("retrieval", self._load, describe, artifacts, registry,
                                                              self.metrics)

    def _load(self, path: Path) -> RetrievalPipeline:
        if self.store is None:
            self.store = open_store(self.pipeline.get("online_store", "sqlite"),
                                    data_dir=resolve(self.pipeline["data_dir"]) if self.pipeline.get("data_dir") else None,
                                    redis=self.pipeline.get("redis"), project=self.pipeline.get("feast_project"))
        return RetrievalPipeline(str(path), metrics=self.metrics, store=self.store, **self.pipeline)

    def candidates(self, user_id: int, user_lat: float, user_lon: float, request_time: float,
                   k: int) -> dict[str, Any]:
        """RetrievalPipeline.candidates by the served version."""
        answer = self.variants.served.champion.candidates(user_id, user_lat, user_lon, request_time, k)
        self.metrics.answered("retrieval", answer["model_version"], CHAMPION)
        return {**answer, "variant": CHAMPION}
