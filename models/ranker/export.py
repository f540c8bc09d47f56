"""Export the ranker to ONNX and write the versioned artifact that serving loads.

Artifact layout (models/artifact.py): `<artifacts>/ranker/<version>/` holds `model.onnx`
(inputs dense f32 [N, D], restaurant_bucket i64 [N], position i64 [N]; output p_order f32 [N]),
`manifest.json`, `restaurants.parquet` (restaurant_id, lat, lon, cuisine, price_level: the
restaurant directory at training time, for computing distance when the store is down) and
`reference.json` (the distribution of p_order at the serving position, for drift monitoring).
The ONNX export helper is shared with the retrieval model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from models.artifact import ModelManifest, TensorSpec, save_manifest
from models.eta.export import onnx_session  # noqa: F401  (re-exported: the same single-threaded session)
from models.ranker.features import (
    DEFAULTED_FEATURES,
    FEATURE_NAMES,
    FEATURE_SERVICE,
    MAX_POSITION,
    N_DENSE,
    N_RESTAURANT_BUCKETS,
    RESTAURANT_HASH_PRIME,
    SERVING_POSITION,
)
from models.ranker.network import INPUT_NAMES, OUTPUT_NAME, RankerNet
from monitoring.reference import write_reference

MODEL_NAME = "ranker"
OPSET = 17
RESTAURANTS_FILE = "restaurants.parquet"
INPUT_SPECS = [TensorSpec("dense", "FP32", [-1, N_DENSE]), TensorSpec("restaurant_bucket", "INT64", [-1]),
               TensorSpec("position", "INT64", [-1])]
OUTPUT_SPECS = [TensorSpec(OUTPUT_NAME, "FP32", [-1])]


def export_module(model: torch.nn.Module, example: tuple, input_names: list[str], output_names: list[str],
                  path: Path) -> Path:
    """Write `model` as ONNX with a dynamic batch dimension on every input and output, and check it."""
    import onnx

    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # the classic exporter warns that it is deprecated; it is the stable path here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes={name: {0: "batch"} for name in [*input_names, *output_names]},
                          opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_onnx(model: RankerNet, path: Path) -> Path:
    """The ranker as ONNX (module doc)."""
    example = (torch.zeros(2, N_DENSE), torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64))
    return export_module(model, example, INPUT_NAMES, [OUTPUT_NAME], path)


def onnx_predict(session, inputs: Mapping[str, np.ndarray], batch_size: int = 16384) -> np.ndarray:
    """p_order for `build_inputs` output, run in chunks."""
    n = len(inputs["dense"])
    out = [session.run([OUTPUT_NAME], {k: v[i:i + batch_size] for k, v in inputs.items()})[0]
           for i in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def write_drift_reference(directory: Path, at_top: np.ndarray) -> Path:
    """reference.json: p_order at the serving position (shown first) of the evaluation impressions."""
    return write_reference(directory, {}, {OUTPUT_NAME: at_top}, model=MODEL_NAME,
                           rows={"predictions": "test window, scored at the serving position"})


def write_restaurants(directory: Path, restaurants, columns: list[str]) -> Path:
    """restaurants.parquet: the restaurant directory at training time (one row per id)."""
    latest = restaurants.sort_values("event_timestamp").drop_duplicates("restaurant_id", keep="last")
    path = directory / RESTAURANTS_FILE
    latest[columns].sort_values("restaurant_id").to_parquet(path, index=False)
    return path


def write_manifest(directory: Path, version: str, training_window: Mapping[str, str], metrics: Mapping,
                   defaults: Mapping[str, float], created_at: datetime, extra: Mapping | None = None) -> ModelManifest:
    """The manifest of one ranker artifact, saved next to its ONNX file."""
    manifest = ModelManifest(
        name=MODEL_NAME,
        version=version,
        feature_service=FEATURE_SERVICE,
        inputs=INPUT_SPECS,
        outputs=OUTPUT_SPECS,
        training_window=dict(training_window),
        metrics=dict(metrics),
        feature_defaults={name: float(defaults[name]) for name in DEFAULTED_FEATURES},
        created_at=created_at.isoformat(),
        extra={
            "dense_features": FEATURE_NAMES,
            "serving_position": SERVING_POSITION,
            "restaurant_hash_prime": RESTAURANT_HASH_PRIME,
            # an index outside a table would fail inside ONNX Runtime: serving checks them first
            "input_ranges": {"restaurant_bucket": [0, N_RESTAURANT_BUCKETS - 1], "position": [1, MAX_POSITION]},
            "request_time": "float epoch seconds, UTC",
            "entity_rows": ["user_id", "restaurant_id", "user_lat", "user_lon"],
            "restaurants": RESTAURANTS_FILE,
            "transform": "models.ranker.features.build_inputs",
            **(extra or {}),
        },
    )
    save_manifest(directory, manifest)
    return manifest
