"""Ranking: p(order | impression) for every candidate of a feed in one batched call.

One Feast read for all (user, restaurant) rows, with the request's place as request
data for the on-demand view, then one ONNX Runtime call. Position is fixed at the
serving position (models/ranker/README.md), so scores compare relevance alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import serve

from feature_repo.store import open_store
from models.ranker.features import build_inputs
from serving.features import OnlineFeatures, StoreUnavailable
from serving.metrics import ServingMetrics
from serving.onnx_model import OnnxModel, ServedOnnxModel
from serving.paths import resolve
from serving.variants import Variants, VersionedDeployment, describe

DIRECTORY_COLUMNS = ("lat", "lon", "cuisine", "price_level")


class RankerPipeline(ServedOnnxModel):
    """Scores a user's candidates: the probability that each would be ordered if shown first."""

    def __init__(self, model_dir: str, online_store: str = "sqlite", data_dir: str | None = None,
                 redis: str | None = None, feast_project: str | None = None, feature_timeout_ms: float = 100,
                 export_metrics: bool = False, feature_cache_s: float = 0, store: Any = None,
                 metrics: ServingMetrics | None = None):
        """`feature_cache_s`: reuse a (user or restaurant) feature row read less than this long ago.
        `store`: an open Feast store to share; `metrics`: the host's ServingMetrics (one per process)."""
        self.model = OnnxModel(resolve(model_dir))
        if store is None:
            store = open_store(online_store, data_dir=resolve(data_dir) if data_dir else None, redis=redis,
                               project=feast_project)
        self.features = OnlineFeatures(store, self.model.manifest.feature_service,
                                       deadline_s=feature_timeout_ms / 1000, cache_s=feature_cache_s)
        self.features.warm_up({"user_id": 1, "restaurant_id": 1, "user_lat": 0.0, "user_lon": 0.0})
        self.defaults = self.model.manifest.feature_defaults
        self.metrics = metrics or ServingMetrics(export=export_metrics)
        self.metrics.model_loaded("ranker", self.model.version, self.model.manifest.created_at)
        # restaurant_id -> place, cuisine and price at training time: what ranking needs when the store is down
        directory = pd.read_parquet(self.model.directory / "restaurants.parquet")
        self.directory = directory.set_index("restaurant_id")[list(DIRECTORY_COLUMNS)].to_dict("index")

    def _directory_columns(self, restaurant_ids: list[int]) -> dict[str, list]:
        rows = [self.directory.get(int(r), {}) for r in restaurant_ids]
        return {name: [row.get(name) for row in rows] for name in DIRECTORY_COLUMNS}

    def score(self, user_id: int, user_lat: float, user_lon: float, request_time: float,
              restaurant_ids: list[int]) -> dict[str, Any]:
        """p_order per restaurant, in the order given; feature TTLs are judged at `request_time`."""
        timings: dict[str, float] = {}
        n = len(restaurant_ids)
        if n == 0:
            return {"p_order": [], "model_version": self.model.version, "fallback": None, "timings_ms": timings}
        fallback = None
        with self.metrics.stage("feed", "ranker_features", timings):
            rows = [{"user_id": int(user_id), "restaurant_id": int(r), "user_lat": user_lat, "user_lon": user_lon}
                    for r in restaurant_ids]
            try:
                columns: dict[str, list] = dict(self.features.read_rows(rows, now=request_time).columns)
            except StoreUnavailable as exc:
                fallback = f"online store unavailable ({exc}); ranked on the model's restaurant directory"
                self.metrics.fallbacks.inc(tags={"endpoint": "feed", "reason": "online_store_unavailable"})
                columns = self._directory_columns(restaurant_ids)
        with self.metrics.stage("feed", "ranking", timings):
            columns.update(restaurant_id=list(restaurant_ids), user_lat=[user_lat] * n, user_lon=[user_lon] * n,
                           request_time=[request_time] * n)
            p_order = self.model.run(build_inputs(columns, self.defaults))["p_order"].reshape(-1)
        return {"p_order": np.asarray(p_order, dtype=float).tolist(), "model_version": self.model.version,
                "fallback": fallback, "timings_ms": timings}


@serve.deployment(name="Ranker")
class Ranker(VersionedDeployment):
    """The ranker as a Ray Serve deployment (also served over OIP v2); its versions are its user_config."""

    def __init__(self, artifacts: str = "artifacts", registry: str | None = None, **pipeline: Any):
        """`pipeline`: RankerPipeline's store arguments (online_store, data_dir, redis, ...)."""
        self.metrics = ServingMetrics()
        self.pipeline = pipeline
        self.store = None  # one Feast store for every version this replica loads
        self.variants: Variants[RankerPipeline] = Variants("ranker", self._load, describe, artifacts, registry,
                                                           self.metrics)

    def _load(self, path: Path) -> RankerPipeline:
        if self.store is None:
            self.store = open_store(self.pipeline.get("online_store", "sqlite"),
                                    data_dir=resolve(self.pipeline["data_dir"]) if self.pipeline.get("data_dir") else None,
                                    redis=self.pipeline.get("redis"), project=self.pipeline.get("feast_project"))
        return RankerPipeline(str(path), metrics=self.metrics, store=self.store, **self.pipeline)

    def score(self, user_id: int, user_lat: float, user_lon: float, request_time: float,
              restaurant_ids: list[int], request_id: str = "") -> dict[str, Any]:
        """RankerPipeline.score by the user's variant (canary sticky by user id), with `variant` and
        `shadow` (true: the caller should also ask `shadow_score` for the cards it shows, after answering)."""
        served = self.variants.served
        variant, pipeline = served.choose(user_id)
        answer = pipeline.score(user_id, user_lat, user_lon, request_time, restaurant_ids)
        self.metrics.answered("ranker", answer["model_version"], variant)
        return {**answer, "variant": variant, "shadow": served.shadows(variant, request_id)}

    def shadow_score(self, user_id: int, user_lat: float, user_lon: float, request_time: float,
                     restaurant_ids: list[int]) -> dict[str, Any]:
        """The challenger's p_order for these restaurants (the shown cards), for the prediction log only."""
        served = self.variants.served
        if served.challenger is None:
            raise RuntimeError("no challenger is served any more (reconfigured since the request)")
        return served.challenger.score(user_id, user_lat, user_lon, request_time, restaurant_ids)
