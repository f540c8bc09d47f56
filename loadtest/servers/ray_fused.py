"""A prototype for the benchmark: Courier's ETA path as ONE Ray Serve deployment (no handle hop).

Not Courier's app: it measures what folding the EtaModel call into the Ingress replica would
buy (`python -m loadtest.bench --variants ray_fused`). Same parse, same pipeline code, same
AppArgs as serving/app.py; only /v1/eta and the health routes are served.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from loadtest.pipeline import handle_eta, load_pipeline
from serving.app import AppArgs

NOT_FOUND = b'{"error":"not found"}'


@serve.deployment(name="Ingress")
class FusedIngress:
    def __init__(self, settings: dict[str, Any]):
        args = AppArgs.model_validate(settings)
        self.pipeline = load_pipeline(**args.model_dump(include={"model_dir", "online_store", "data_dir", "redis",
                                                                 "feast_project", "feature_timeout_ms"}))

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/v1/eta" and request.method == "POST":
            status, body = handle_eta(self.pipeline, await request.body())
            return Response(body, status_code=status, media_type="application/json")
        if path.startswith("/v2/health"):
            return Response(b'{"ready":true}', media_type="application/json")
        return Response(NOT_FOUND, status_code=404, media_type="application/json")


def build_app(args: dict[str, Any]):
    return FusedIngress.bind(dict(args or {}))
