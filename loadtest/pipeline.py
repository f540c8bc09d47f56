"""Courier's ETA pipeline (Feast online read + ONNX Runtime) without Ray, for the benchmark.

It is exactly the code Courier's Ray Serve app runs: `parse_eta_request` (what the Ingress
does), then `serving.eta.EtaPipeline.predict` (what the EtaModel replica runs; the deployment
is that class), built with the serve config's application args. The benchmark's KServe,
uvicorn and in-process variants all call `handle_eta`.
"""

from __future__ import annotations

from typing import Any

import orjson

from serving.errors import CourierError


def load_pipeline(**overrides: Any) -> Any:
    """An EtaPipeline with the shipped serve config's app args (overridable), outside Ray."""
    from serving.app import AppArgs
    from serving.config import load_serve_config
    from serving.eta import EtaPipeline
    from serving.variants import locate, slots

    config = load_serve_config()
    app = next(a for a in config["applications"] if a["name"] == "courier")
    args = AppArgs.model_validate({**(app.get("args") or {}), **overrides})
    model_dir = locate("eta", slots(config)["eta"].version, args.artifacts, args.registry)  # the served version
    return EtaPipeline(str(model_dir), online_store=args.online_store, data_dir=args.data_dir, redis=args.redis,
                       feast_project=args.feast_project, feature_timeout_ms=args.feature_timeout_ms)


def handle_eta(pipeline: Any, body: bytes) -> tuple[int, bytes]:
    """POST /v1/eta as Courier answers it: (status, JSON body); bad input is a 4xx, never a 500."""
    from serving.schemas import parse_eta_request

    try:
        answer = pipeline.predict(parse_eta_request(body))
        return 200, orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    except CourierError as exc:
        return exc.status, orjson.dumps(exc.body())
