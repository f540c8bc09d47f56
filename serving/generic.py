"""Any ONNX model artifact served over the Open Inference Protocol, with a version slot like the others.

A team's own model needs no serving code: list it in the serve config's `extra_models` (serving/app.py)
and give it a deployment entry named after it whose `user_config` is its slot (serving/variants.py):

    args:
      extra_models:
        - name: prep_time              # artifacts at <artifacts>/prep_time/<version>/, routed at /v2/models/prep_time
    deployments:
      - name: prep_time
        user_config: {version: champion, challenger: null, shadow: 0.0, canary: 0.0}

`build_app` binds one `OnnxModelDeployment` per extra model, named after it; the Ingress routes
`GET /v2/models/<name>`, `GET /v2/models/<name>/ready` and `POST /v2/models/<name>/infer` to it.
The caller sends the model's input tensors (OIP v2, validated against the ONNX session's metadata);
the response names the version and the variant that answered. A challenger answers a canary share of
callers, sticky by the request's `parameters.user_id` (else by its `id`, else per request); a shadow
share is also answered by the challenger after the response has gone, counted and, with a prediction
log, logged (`endpoint: "v2"`), never returned. docs/adding-a-model.md walks the whole path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from serving.metrics import ServingMetrics
from serving.onnx_model import OnnxModel, ServedOnnxModel
from serving.variants import Variants, VersionedDeployment, describe


class OnnxPipeline(ServedOnnxModel):
    """One loaded version: the ONNX session and its manifest (raw tensors in, raw tensors out)."""

    def __init__(self, model_dir: str | Path, threads: int = 1):
        self.model = OnnxModel(model_dir, threads=threads)


@serve.deployment(name="OnnxModel")
class OnnxModelDeployment(VersionedDeployment):
    """A model served from its artifact alone; its versions are its `user_config` (serving/variants.py).

    Bound once per extra model with `.options(name=<model>)`. `reconfigure` loads the slot's versions
    off the event loop and swaps them in at once; a bad slot (unknown version, a version on another
    feature service) raises, so Ray keeps the old versions."""

    def __init__(self, model: str, artifacts: str = "artifacts", registry: str | None = None, threads: int = 1):
        """`model`: the artifacts' folder name under `artifacts` and the OIP name; `threads`: ONNX intra-op threads."""
        self.name = model
        self.threads = threads
        self.metrics = ServingMetrics()
        self.variants: Variants[OnnxPipeline] = Variants(model, self._load, describe, artifacts, registry, self.metrics)

    def _load(self, path: Path) -> OnnxPipeline:
        pipeline = OnnxPipeline(path, self.threads)
        manifest = pipeline.model.manifest
        if manifest.name != self.name:  # a directory copied under the wrong model would answer wrongly
            raise ValueError(f"{path} holds a {manifest.name!r} model, this deployment serves {self.name!r}")
        self.metrics.model_loaded(self.name, manifest.version, manifest.created_at)
        return pipeline

    def infer_variant(self, tensors: dict[str, np.ndarray], key: str | int = "", request_id: str = "") -> dict[str, Any]:
        """Outputs of the version answering `key` (the canary's sticky key: a user id, else the request's), with
        `model_version`, `variant`, and `shadow` (true: the caller should also ask `shadow_infer` after answering;
        a share of requests, by `request_id`)."""
        served = self.variants.served
        variant, pipeline = served.choose(key)
        outputs = pipeline.infer(tensors)
        version = served.version_of(variant)
        self.metrics.answered(self.name, version, variant)
        return {"outputs": outputs, "model_version": version, "variant": variant,
                "shadow": bool(request_id) and served.shadows(variant, request_id)}

    def shadow_infer(self, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """The challenger's outputs for the same tensors, for the prediction log only."""
        served = self.variants.served
        if served.challenger is None:
            raise RuntimeError("no challenger is served any more (reconfigured since the request)")
        return {"outputs": served.challenger.infer(tensors), "model_version": str(served.challenger_version)}
