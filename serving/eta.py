"""The ETA pipeline (Feast online read + ONNX Runtime) and its Ray Serve deployment.

`EtaPipeline` is plain Python, so the deployment, a plain ASGI server and the benchmarks
run exactly the same code; `EtaModel` is the deployment the ingress calls: `predict` for
`/v1/eta`, `predict_many` for the feed's cards, `infer` / `metadata` for the Open
Inference Protocol endpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray import serve

from feature_repo.store import open_store
from models import geo
from models.eta.features import FEATURE_NAMES, build_inputs
from serving.errors import NotFound
from serving.features import FeatureRows, OnlineFeatures, StoreUnavailable
from serving.metrics import ServingMetrics
from serving.onnx_model import OnnxModel, ServedOnnxModel
from serving.paths import resolve
from serving.schemas import EtaRequest
from serving.variants import CHAMPION, Variants, VersionedDeployment, describe

logger = logging.getLogger("ray.serve")
RESTAURANT_DIRECTORY = "restaurants.parquet"


class EtaPipeline(ServedOnnxModel):
    """Answers "how long until my food arrives?" for one order, or for many restaurants at once."""

    def __init__(self, model_dir: str, online_store: str = "sqlite", data_dir: str | None = None,
                 redis: str | None = None, feast_project: str | None = None, feature_timeout_ms: float = 100,
                 export_metrics: bool = False, metrics: ServingMetrics | None = None, feature_cache_s: float = 0,
                 store: Any = None):
        """`metrics`: the host's own ServingMetrics (one per process), else one of our own.

        `feature_cache_s`: reuse a feature row read less than this long ago (0: read every time).
        `store`: an open Feast store to share (a replica's versions read the same store), else one of our own.
        """
        self.model = OnnxModel(resolve(model_dir))
        manifest = self.model.manifest
        if store is None:
            store = open_store(online_store, data_dir=resolve(data_dir) if data_dir else None, redis=redis,
                               project=feast_project)
        # Refuses (ArtifactError) a model whose feature service this store does not serve.
        self.features = OnlineFeatures(store, manifest.feature_service, deadline_s=feature_timeout_ms / 1000,
                                       cache_s=feature_cache_s)
        self.features.warm_up({"restaurant_id": 1, "area_id": ""})
        self.defaults = manifest.feature_defaults
        self.directory = _restaurant_directory(self.model.directory / RESTAURANT_DIRECTORY)
        self.metrics = metrics or ServingMetrics(export=export_metrics)
        self.metrics.model_loaded("eta", manifest.version, manifest.created_at)
        logger.info("EtaModel %s serving with feature service %s (%s online store)",
                    manifest.version, manifest.feature_service, online_store)

    def predict(self, request: EtaRequest, include_inputs: bool = False) -> dict[str, Any]:
        """ETA for one validated request; falls back to the artifact's directory if the store is down.

        `include_inputs`: add `model_inputs` (the model's input row by feature name) for the prediction log.
        """
        answer = self.predict_batch([request])[0]
        if isinstance(answer, NotFound):
            raise answer
        return answer if include_inputs else _without_inputs(answer)

    def predict_batch(self, requests: list[EtaRequest]) -> list[dict[str, Any] | NotFound]:
        """ETAs of several `/v1/eta` requests in one feature read and one ONNX call.

        Each answer is that request's response body, or a NotFound for an unknown restaurant
        (for its own caller only). When the store is down the artifact's directory answers.
        """
        rows = self._rows_of(requests)
        return self._answers(requests, self._estimate(rows, self._read(rows, "eta"), "eta"))

    async def predict_async(self, request: EtaRequest, include_inputs: bool = False) -> dict[str, Any]:
        """`predict` for an event loop (the Ingress): it awaits the feature read instead of blocking on it."""
        rows = self._rows_of([request])
        answer = self._answers([request], self._estimate(rows, await self._read_async(rows, "eta"), "eta"))[0]
        if isinstance(answer, NotFound):
            raise answer
        return answer if include_inputs else _without_inputs(answer)

    def _answers(self, requests: list[EtaRequest], estimate: _Estimate) -> list[dict[str, Any] | NotFound]:
        fallback = estimate.fallback and f"{estimate.fallback}; used the model's restaurant directory and typical live features"
        if fallback:  # one degraded answer per request
            self.metrics.fallbacks.inc(len(requests), tags={"endpoint": "eta", "reason": "online_store_unavailable"})
        self.metrics.feature_freshness(estimate.expired)
        answers: list[dict[str, Any] | NotFound] = []
        for i, (request, eta) in enumerate(zip(requests, estimate.minutes)):
            if eta is None:
                answers.append(_unknown_restaurant(request, fallback is not None))
                continue
            answers.append({
                "eta_minutes": eta,
                "model_version": self.model.version,
                "feature_service": self.model.manifest.feature_service,
                "feature_age_seconds": {view: None if row[i] is None else round(row[i], 1)
                                        for view, row in estimate.ages.items()},
                "expired_features": sorted(view for view, flags in estimate.expired.items() if flags[i]),
                "degraded": fallback is not None,
                "fallback": fallback,
                "model_inputs": estimate.inputs[i],
            })
        return answers

    def predict_many(self, restaurant_ids: list[int], delivery_lat: float, delivery_lon: float,
                     order_time: float) -> dict[str, Any]:
        """ETAs of many restaurants to one drop-off in one feature read and one ONNX call (the feed's cards).

        Unknown restaurants get None; when the store is down the directory and defaults are used.
        """
        n = len(restaurant_ids)
        rows = _Rows([int(r) for r in restaurant_ids], [delivery_lat] * n, [delivery_lon] * n, [order_time] * n,
                     [geo.area_id(delivery_lat, delivery_lon)] * n)
        estimate = self._estimate(rows, self._read(rows, "feed"), "feed")
        if estimate.fallback:  # one degraded answer: the feed's
            self.metrics.fallbacks.inc(tags={"endpoint": "feed_eta", "reason": "online_store_unavailable"})
        return {"eta_minutes": estimate.minutes, "model_version": self.model.version, "fallback": estimate.fallback}

    @staticmethod
    def _rows_of(requests: list[EtaRequest]) -> _Rows:
        return _Rows([r.restaurant_id for r in requests], [r.delivery_lat for r in requests],
                     [r.delivery_lon for r in requests], [r.order_time_utc().timestamp() for r in requests],
                     [geo.area_id(r.delivery_lat, r.delivery_lon) for r in requests])

    def _read(self, rows: _Rows, endpoint: str) -> FeatureRows | StoreUnavailable:
        """The features of every row in one store read, or why the store could not answer."""
        with self.metrics.stage(endpoint, _stage(endpoint, "feature_read")):
            try:
                return self.features.read_rows(rows.entities())
            except StoreUnavailable as exc:
                return exc

    async def _read_async(self, rows: _Rows, endpoint: str) -> FeatureRows | StoreUnavailable:
        with self.metrics.stage(endpoint, _stage(endpoint, "feature_read")):
            try:
                return await self.features.read_rows_async(rows.entities())
            except StoreUnavailable as exc:
                return exc

    def _estimate(self, rows: _Rows, read: FeatureRows | StoreUnavailable, endpoint: str) -> _Estimate:
        """Minutes for each (restaurant, drop-off, time) row from one read: one ONNX call; None if unknown."""
        fallback = None
        if isinstance(read, StoreUnavailable):
            fallback = f"online store unavailable ({read})"
            located = [self.directory.get(r, (None, None)) for r in rows.restaurant_ids]
            columns, ages, expired = {"lat": [p[0] for p in located], "lon": [p[1] for p in located]}, {}, {}
        else:
            columns, ages, expired = read.columns, read.age_seconds, read.expired
        known = [i for i, lat in enumerate(columns["lat"]) if lat is not None]
        minutes: list[float | None] = [None] * len(rows.restaurant_ids)
        inputs: list[dict[str, float] | None] = [None] * len(rows.restaurant_ids)
        if known:
            batch = {name: [values[i] for i in known] for name, values in columns.items()}
            batch.update(delivery_lat=[rows.delivery_lats[i] for i in known],
                         delivery_lon=[rows.delivery_lons[i] for i in known],
                         order_time=[rows.order_times[i] for i in known], area_id=[rows.areas[i] for i in known])
            tensors = build_inputs(batch, self.defaults)
            with self.metrics.stage(endpoint, _stage(endpoint, "inference")):
                predicted = self.model.run(tensors)["eta_minutes"].reshape(-1)
            for row, (i, value) in enumerate(zip(known, predicted)):
                minutes[i] = round(float(value), 2)
                if endpoint == "eta":  # what the model saw, for the prediction log (not the feed's 100 rows)
                    inputs[i] = dict(zip(FEATURE_NAMES, tensors["dense"][row].tolist()))
        return _Estimate(minutes, ages, expired, fallback, inputs)


def _stage(endpoint: str, name: str) -> str:
    """The feed's stages name the model they time (eta_feature_read); /v1/eta's do not need to."""
    return name if endpoint == "eta" else f"eta_{name}"


@dataclass
class _Rows:
    """The (restaurant, drop-off, time) rows of one batched ETA call, with each drop-off's area."""

    restaurant_ids: list[int]
    delivery_lats: list[float]
    delivery_lons: list[float]
    order_times: list[float]
    areas: list[str]

    def entities(self) -> list[dict[str, Any]]:
        """Feast entity rows for eta_v1."""
        return [{"restaurant_id": r, "area_id": a} for r, a in zip(self.restaurant_ids, self.areas)]


@dataclass
class _Estimate:
    """What one batched ETA call found: minutes per row (None: unknown restaurant) and how fresh."""

    minutes: list[float | None]
    ages: dict[str, list[float | None]]  # per view, per row (empty when the store was down)
    expired: dict[str, list[bool]]
    fallback: str | None  # why the store was not used, or None
    inputs: list[dict[str, float] | None]  # the model's dense input row by feature name (/v1/eta only)


@serve.deployment(name="EtaModel")
class EtaModel(VersionedDeployment):
    """The ETA pipeline as a Ray Serve deployment, exporting its metrics to Prometheus.

    Which versions it serves is its `user_config` (serving/variants.py): `reconfigure` loads them
    and swaps them in at once. With `batching` (the serve config's `eta_batching`), `/v1/eta`
    requests in flight together are answered by one `predict_batch` call per variant.
    """

    def __init__(self, artifacts: str = "artifacts", registry: str | None = None,
                 batching: dict[str, float] | None = None, **pipeline: Any):
        """`pipeline`: EtaPipeline's store arguments (online_store, data_dir, redis, ...)."""
        self.metrics = ServingMetrics()
        self.pipeline = pipeline
        self.store = None  # one Feast store for every version this replica loads
        self.variants: Variants[EtaPipeline] = Variants("eta", self._load, describe, artifacts, registry, self.metrics)
        self.batching = batching is not None
        if batching:
            self._predict_batched.set_max_batch_size(int(batching["max_batch_size"]))
            self._predict_batched.set_batch_wait_timeout_s(float(batching["batch_wait_timeout_s"]))

    def _load(self, path: Path) -> EtaPipeline:
        if self.store is None:
            self.store = open_store(self.pipeline.get("online_store", "sqlite"),
                                    data_dir=resolve(self.pipeline["data_dir"]) if self.pipeline.get("data_dir") else None,
                                    redis=self.pipeline.get("redis"), project=self.pipeline.get("feast_project"))
        return EtaPipeline(str(path), metrics=self.metrics, store=self.store, **self.pipeline)

    async def eta(self, request: EtaRequest, include_inputs: bool = False, request_id: str = "") -> dict[str, Any]:
        """The answer to one `/v1/eta` request (batched with others in flight when configured).

        Adds `variant`, and `shadow: true` when the caller should also ask `shadow_eta` (after answering)."""
        served = self.variants.served
        variant, pipeline = served.choose(request.user_id or request_id)
        if not self.batching:
            answer = pipeline.predict(request, include_inputs)
        else:
            answer = await self._predict_batched((request, variant))
            if isinstance(answer, NotFound):
                raise answer
            if not include_inputs:
                answer = _without_inputs(answer)
        self.metrics.answered("eta", answer["model_version"], variant)
        return {**answer, "variant": variant, "shadow": served.shadows(variant, request_id)}

    async def shadow_eta(self, request: EtaRequest) -> dict[str, Any]:
        """The challenger's answer to a `/v1/eta` request (with its inputs), for the prediction log only."""
        served = self.variants.served
        if served.challenger is None:
            raise RuntimeError("no challenger is served any more (reconfigured since the request)")
        return served.challenger.predict(request, include_inputs=True)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _predict_batched(self, calls: list[tuple[EtaRequest, str]]) -> list[dict[str, Any] | NotFound]:
        served = self.variants.served
        answers: list[dict[str, Any] | NotFound | None] = [None] * len(calls)
        for variant in {v for _, v in calls}:
            pipeline = served.champion if variant == CHAMPION or served.challenger is None else served.challenger
            indices = [i for i, (_, v) in enumerate(calls) if v == variant]
            for i, answer in zip(indices, pipeline.predict_batch([calls[i][0] for i in indices])):
                answers[i] = answer
        return answers  # type: ignore[return-value]

    def predict_many(self, restaurant_ids: list[int], delivery_lat: float, delivery_lon: float,
                     order_time: float, user_id: int | None = None) -> dict[str, Any]:
        """The feed's ETAs (EtaPipeline.predict_many) from the user's variant (canary is sticky by user)."""
        variant, pipeline = self.variants.served.choose(user_id if user_id is not None else "")
        answer = pipeline.predict_many(restaurant_ids, delivery_lat, delivery_lon, order_time)
        self.metrics.answered("eta", answer["model_version"], variant)
        return {**answer, "variant": variant}



def _without_inputs(answer: dict[str, Any]) -> dict[str, Any]:
    """The response body: the answer without the model's inputs (those are for the prediction log)."""
    return {key: value for key, value in answer.items() if key != "model_inputs"}


def _unknown_restaurant(request: EtaRequest, store_down: bool) -> NotFound:
    """The 404 for a restaurant that neither the store (or, when it is down, the directory) knows."""
    where = " (online store unavailable; checked the model's restaurant directory)" if store_down else ""
    return NotFound(f"restaurant_id: {request.restaurant_id} is not a known restaurant{where}",
                    field="restaurant_id", rule="must be a restaurant on the marketplace")


def _restaurant_directory(path: Path) -> dict[int, tuple[float, float]]:
    """restaurant_id -> (lat, lon) at training time; empty if the artifact has no directory."""
    if not path.exists():
        return {}
    table = pd.read_parquet(path, columns=["restaurant_id", "lat", "lon"])
    return {int(r): (float(a), float(b)) for r, a, b in table.itertuples(index=False)}
