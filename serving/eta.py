"""The ETA pipeline (Feast online read + ONNX Runtime) and its Ray Serve deployment.

`EtaPipeline` is plain Python, so the deployment, a plain ASGI server and the benchmarks
run exactly the same code; `EtaModel` is the deployment the ingress calls: `predict` for
`/v1/eta`, `predict_many` for the feed's cards, `infer` / `metadata` for the Open
Inference Protocol endpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from ray import serve

from feature_repo.store import open_store
from models import geo
from models.eta.features import build_inputs
from serving.errors import NotFound
from serving.features import OnlineFeatures, StoreUnavailable
from serving.metrics import ServingMetrics
from serving.onnx_model import OnnxModel, ServedOnnxModel
from serving.paths import resolve
from serving.schemas import EtaRequest

logger = logging.getLogger("ray.serve")
RESTAURANT_DIRECTORY = "restaurants.parquet"


class EtaPipeline(ServedOnnxModel):
    """Answers "how long until my food arrives?" for one order, or for many restaurants at once."""

    def __init__(self, model_dir: str, online_store: str = "sqlite", data_dir: str | None = None,
                 redis: str | None = None, feast_project: str | None = None, feature_timeout_ms: float = 100,
                 export_metrics: bool = False):
        self.model = OnnxModel(resolve(model_dir))
        manifest = self.model.manifest
        store = open_store(online_store, data_dir=resolve(data_dir) if data_dir else None, redis=redis,
                           project=feast_project)
        # Refuses (ArtifactError) a model whose feature service this store does not serve.
        self.features = OnlineFeatures(store, manifest.feature_service, deadline_s=feature_timeout_ms / 1000)
        self.features.warm_up({"restaurant_id": 1, "area_id": ""})
        self.defaults = manifest.feature_defaults
        self.directory = _restaurant_directory(self.model.directory / RESTAURANT_DIRECTORY)
        self.metrics = ServingMetrics(export=export_metrics)
        logger.info("EtaModel %s serving with feature service %s (%s online store)",
                    manifest.version, manifest.feature_service, online_store)

    def predict(self, request: EtaRequest) -> dict[str, Any]:
        """ETA for one validated request; falls back to the artifact's directory if the store is down."""
        area = geo.area_id(request.delivery_lat, request.delivery_lon)
        entity = {"restaurant_id": request.restaurant_id, "area_id": area}
        fallback = None
        try:
            with self.metrics.stage("eta", "feature_read"):
                read = self.features.read(entity)
            values, ages, expired = read.values, read.age_seconds, read.expired
            if values.get("lat") is None:
                raise NotFound(f"restaurant_id: {request.restaurant_id} is not a known restaurant",
                               field="restaurant_id", rule="must be a restaurant on the marketplace")
        except StoreUnavailable as exc:
            fallback = f"online store unavailable ({exc}); used the model's restaurant directory and typical live features"
            self.metrics.fallbacks.inc(tags={"endpoint": "eta", "reason": "online_store_unavailable"})
            values, ages, expired = self._directory_features(request.restaurant_id), {}, []
        columns = {name: [value] for name, value in values.items()}
        columns.update(delivery_lat=[request.delivery_lat], delivery_lon=[request.delivery_lon],
                       order_time=[request.order_time_utc().timestamp()], area_id=[area])
        with self.metrics.stage("eta", "inference"):
            eta = float(self.model.run(build_inputs(columns, self.defaults))["eta_minutes"].reshape(-1)[0])
        return {
            "eta_minutes": round(eta, 2),
            "model_version": self.model.version,
            "feature_service": self.model.manifest.feature_service,
            "feature_age_seconds": {view: None if age is None else round(age, 1) for view, age in ages.items()},
            "expired_features": expired,
            "degraded": fallback is not None,
            "fallback": fallback,
        }

    def predict_many(self, restaurant_ids: list[int], delivery_lat: float, delivery_lon: float,
                     order_time: float) -> dict[str, Any]:
        """ETAs of many restaurants to one drop-off in one feature read and one ONNX call (the feed's cards).

        Unknown restaurants get None; when the store is down the directory and defaults are used.
        """
        area = geo.area_id(delivery_lat, delivery_lon)
        fallback = None
        try:
            with self.metrics.stage("feed", "eta_feature_read"):
                rows = self.features.read_rows([{"restaurant_id": int(r), "area_id": area} for r in restaurant_ids])
            columns = rows.columns
        except StoreUnavailable as exc:
            fallback = f"online store unavailable ({exc})"
            self.metrics.fallbacks.inc(tags={"endpoint": "feed_eta", "reason": "online_store_unavailable"})
            located = [self.directory.get(int(r), (None, None)) for r in restaurant_ids]
            columns = {"lat": [p[0] for p in located], "lon": [p[1] for p in located]}
        known = [i for i, lat in enumerate(columns["lat"]) if lat is not None]
        etas: list[float | None] = [None] * len(restaurant_ids)
        if known:
            batch = {name: [values[i] for i in known] for name, values in columns.items()}
            batch.update(delivery_lat=[delivery_lat] * len(known), delivery_lon=[delivery_lon] * len(known),
                         order_time=[order_time] * len(known), area_id=[area] * len(known))
            with self.metrics.stage("feed", "eta_inference"):
                minutes = self.model.run(build_inputs(batch, self.defaults))["eta_minutes"].reshape(-1)
            for i, value in zip(known, minutes):
                etas[i] = round(float(value), 2)
        return {"eta_minutes": etas, "model_version": self.model.version, "fallback": fallback}

    def _directory_features(self, restaurant_id: int) -> dict[str, Any]:
        """Static features from the artifact when the store is down; live ones take their defaults."""
        location = self.directory.get(restaurant_id)
        if location is None:
            raise NotFound(f"restaurant_id: {restaurant_id} is not a known restaurant (online store unavailable; "
                           "checked the model's restaurant directory)", field="restaurant_id",
                           rule="must be a restaurant on the marketplace")
        return {"lat": location[0], "lon": location[1]}


@serve.deployment(name="EtaModel")
class EtaModel(EtaPipeline):
    """The ETA pipeline as a Ray Serve deployment, exporting its metrics to Prometheus."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, export_metrics=True, **kwargs)


def _restaurant_directory(path: Path) -> dict[int, tuple[float, float]]:
    """restaurant_id -> (lat, lon) at training time; empty if the artifact has no directory."""
    if not path.exists():
        return {}
    table = pd.read_parquet(path, columns=["restaurant_id", "lat", "lon"])
    return {int(r): (float(a), float(b)) for r, a, b in table.itertuples(index=False)}
