"""The Ray Serve application: `serving.app:build_app`, as named in serving/serve_config.yaml."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve import Application

from serving.admission import AdmissionArgs
from serving.auth import AuthArgs
from serving.blending import SponsoredPolicy
from serving.eta import EtaModel
from serving.generic import OnnxModelDeployment
from serving.ingress import Ingress
from serving.prediction_log import PredictionLogArgs
from serving.variants import check_extra_model_name


class FeedArgs(BaseModel):
    """The feed: its two models, how many candidates reach the ranker, and the sponsored policy."""

    model_config = ConfigDict(extra="forbid")

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


class ExtraModel(BaseModel):
    """A model served from its artifact alone (serving/generic.py): a team's own model, no serving code.

    It is its own deployment, named after the model (its slot is that deployment's user_config), reads
    `<artifacts>/<name>/<version>/`, and answers at `/v2/models/<name>` (docs/adding-a-model.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The model's name: its deployment, its artifact folder and its OIP route.")
    threads: int = Field(1, ge=1, le=8, description="ONNX Runtime intra-op threads per replica.")

    @field_validator("name")
    @classmethod
    def _free_name(cls, name: str) -> str:
        return check_extra_model_name(name)


class AppArgs(BaseModel):
    """The `args` of the application in the serve config; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    artifacts: str = Field("artifacts", description="Artifact root: `<artifacts>/<model>/<version>/` (relative to the "
                           "project root). Which version each deployment serves is its user_config.")
    registry: str | None = Field(None, description="MLflow registry URI for aliases and numbers a replica must "
                                 "resolve (null: COURIER_REGISTRY, else sqlite beside the artifacts).")
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
    auth: AuthArgs = Field(default_factory=AuthArgs, description="Bearer API keys, scopes and per-key rate "
                           "limits at the ingress (serving/auth.py); off locally, on in the chart.")
    admission: AdmissionArgs = Field(default_factory=AdmissionArgs, description="Per Ingress replica: requests "
                                     "computed at once, and how many may wait and how long before the excess "
                                     "gets a 503 with Retry-After (serving/admission.py).")
    extra_models: list[ExtraModel] = Field(default_factory=list, description="Models served from their artifact "
                                           "alone over OIP v2, each its own deployment named after it "
                                           "(serving/generic.py, docs/adding-a-model.md).")

    @field_validator("extra_models")
    @classmethod
    def _once_each(cls, models: list[ExtraModel]) -> list[ExtraModel]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"a model is listed twice: {names}")
        return models


def build_app(args: dict[str, Any]) -> Application:
    """Ingress -> EtaModel (and, with a feed, Retrieval and Ranker, and one OnnxModelDeployment per extra
    model); options come from the serve config.

    With `eta_in_ingress` the Ingress also holds the ETA pipeline and answers /v1/eta itself:
    on two cores the extra replica hop cost more CPU than the model (docs/benchmarks.md).
    Model versions are not args: each deployment's user_config names them (serving/variants.py).
    """
    settings = AppArgs.model_validate(args or {})
    store = dict(online_store=settings.online_store, data_dir=settings.data_dir, redis=settings.redis,
                 feast_project=settings.feast_project, feature_timeout_ms=settings.feature_timeout_ms)
    batching = settings.eta_batching.model_dump() if settings.eta_batching else None
    cache = {"feature_cache_s": settings.feed.feature_cache_s} if settings.feed else {}
    where = {"artifacts": settings.artifacts, "registry": settings.registry}
    models = {"eta": EtaModel.bind(**where, batching=batching, **store, **cache)}
    feed = None
    if settings.feed is not None:
        from serving.ranker import (
            Ranker,  # imported only with a feed: they need the feed's model code
        )
        from serving.retrieval import Retrieval

        models["user_tower"] = Retrieval.bind(**where, directory_max_age_s=settings.feed.directory_max_age_s, **store)
        models["ranker"] = Ranker.bind(**where, **store, **cache)
        feed = {"candidates": settings.feed.candidates, "sponsored": settings.feed.sponsored.model_dump()}
    for extra in settings.extra_models:  # a team's own models: one deployment each, named after the model
        models[extra.name] = OnnxModelDeployment.options(name=extra.name).bind(extra.name, threads=extra.threads,
                                                                               **where)
    local_eta = {**where, **store} if settings.eta_in_ingress else None
    log = settings.prediction_log.model_dump() if settings.prediction_log else None
    return Ingress.bind(models, settings.max_body_bytes, feed, local_eta, log,
                        [extra.name for extra in settings.extra_models], auth=settings.auth.model_dump(),
                        admission=settings.admission.model_dump())
