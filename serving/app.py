"""The Ray Serve application: `serving.app:build_app`, as named in serving/serve_config.yaml."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from serving.eta import EtaModel
from serving.ingress import Ingress


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


def build_app(args: dict[str, Any]) -> Application:
    """Ingress -> EtaModel; deployment options come from the serve config."""
    settings = AppArgs.model_validate(args or {})
    eta = EtaModel.bind(settings.model_dir, settings.online_store, settings.data_dir, settings.redis,
                        settings.feast_project, settings.feature_timeout_ms)
    return Ingress.bind({"eta": eta}, settings.max_body_bytes)
