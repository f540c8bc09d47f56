"""The Ray Serve application: `serving.app:build_app`, as named in serving/serve_config.yaml."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from serving.blending import SponsoredPolicy
from serving.eta import EtaModel
from serving.ingress import Ingress
from serving.prediction_log import PredictionLogArgs


class FeedArgs(BaseModel):
    """The feed: its two models, how many candidates reach the ranker, and the sponsored policy."""

    model_config = ConfigDict(extra="forbid")

    retrieval_model_dir: str = Field("artifacts/retrieval/current", description="Two-tower artifact.")
    ranker_model_dir: str = Field("artifacts/ranker/current", description="Ranker artifact.")
    candidates: int = Field(100, gt=0, le=1000, description="Candidates retrieved and ranked per request.")
    directory_max_age_s: float = Field(60, gt=0, description="Freshness bound of the cached restaurant directory.")
    feature_cache_s: float = Field(5, ge=0, description="Ranker and EtaModel reuse a feature row read less than "
                                   "this long ago (0: read the store every time).")
    sponsored: SponsoredPolicy = Field(default_factory=SponsoredPolicy)


class EtaBatching(BaseModel):
    """`@serve.batch` on `/v1/eta`: requests in flight together share one feature read and ONNX call."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, gt=0, le=256, description="Most requests answered by one call.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="Longest wait for a batch to fill.")


class AppArgs(BaseModel):
    """The `args` of the application in the serve config; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field("artifacts/eta/current", description="ETA model artifact (relative to the project root).")
    data_dir: str | None = Field("data", description="Folder whose feast/ holds the registry (and SQLite file).")
    online_store: str = Field("sqlite", pattern="^(sqlite|redis)$", description="sqlite locally, redis on Kubernetes.")
    redis: str | None = Field(None, description="host:port of Redis for the redis online store (default COURIER_REDIS).")
    feast_project: str | None = Field(None, description="Override the Feast project name (tests keep apart with it).")
    feature_timeout_ms: float = Field(100, gt=0, description="A feature read slower than this counts as a store outage.")
    max_body_bytes: int = Field(65536, gt=0, description="Larger request bodies get a 413.")
    eta_in_ingress: bool = Field(True, description="Answer /v1/eta in the Ingress replica (one hop fewer); "
                                 "false: through the EtaModel deployment. The feed always uses EtaModel.")
    eta_batching: EtaBatching | None = Field(None, description="Batch /v1/eta across requests in EtaModel "
                                             "(with eta_in_ingress false); null: one by one.")
    feed: FeedArgs | None = Field(None, description="The feed's models and policy; null serves ETA only.")
    prediction_log: PredictionLogArgs | None = Field(None, description="Log every answered /v1/eta and /v1/feed "
                                                     "to a Redis stream (docs/monitoring.md); null: no log.")


def build_app(args: dict[str, Any]) -> Application:
    """Ingress -> EtaModel (and, with a feed, Retrieval and Ranker); options come from the serve config.

    With `eta_in_ingress` the Ingress also holds the ETA pipeline and answers /v1/eta itself:
    on two cores the extra replica hop cost more CPU than the model (docs/benchmarks.md).
    """
    settings = AppArgs.model_validate(args or {})
    store = dict(online_store=settings.online_store, data_dir=settings.data_dir, redis=settings.redis,
                 feast_project=settings.feast_project, feature_timeout_ms=settings.feature_timeout_ms)
    batching = settings.eta_batching.model_dump() if settings.eta_batching else None
    cache = {"feature_cache_s": settings.feed.feature_cache_s} if settings.feed else {}
    models = {"eta": EtaModel.bind(settings.model_dir, batching=batching, **store, **cache)}
    feed = None
    if settings.feed is not None:
        from serving.ranker import (
            Ranker,  # imported only with a feed: they need the feed's model code
        )
        from serving.retrieval import Retrieval

        models["user_tower"] = Retrieval.bind(settings.feed.retrieval_model_dir,
                                              directory_max_age_s=settings.feed.directory_max_age_s, **store)
        models["ranker"] = Ranker.bind(settings.feed.ranker_model_dir, **store, **cache)
        feed = {"candidates": settings.feed.candidates, "sponsored": settings.feed.sponsored.model_dump()}
    local_eta = {"model_dir": settings.model_dir, **store} if settings.eta_in_ingress else None
    log = settings.prediction_log.model_dump() if settings.prediction_log else None
    return Ingress.bind(models, settings.max_body_bytes, feed, local_eta, log)
