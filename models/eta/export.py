"""Export the ETA network to ONNX and write the versioned artifact that serving loads.

Artifact layout (models/artifact.py): `<artifacts>/eta/<version>/` holds
`model.onnx`, `manifest.json`, `restaurants.parquet` (restaurant_id, lat, lon: the
restaurant directory at training time, serving's fallback when the online store is down) and
`reference.json` (the training distribution of the inputs and predictions, for drift monitoring).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from models.artifact import ModelManifest, TensorSpec, save_manifest
from models.eta.features import (
    AREA_HASH_PRIME,
    FEATURE_NAMES,
    FEATURE_SERVICE,
    HOUR_HARMONICS,
    LIVE_FEATURES,
    N_AREA_BUCKETS,
    N_DENSE,
)
from models.eta.network import INPUT_NAMES, OUTPUT_NAME, EtaNet
from monitoring.reference import hour_of_day, write_reference

MODEL_NAME = "eta"
OPSET = 17
RESTAURANTS_FILE = "restaurants.parquet"
INPUT_SPECS = [TensorSpec("dense", "FP32", [-1, N_DENSE]), TensorSpec("areas", "INT64", [-1, 2])]
OUTPUT_SPECS = [TensorSpec(OUTPUT_NAME, "FP32", [-1])]


def export_onnx(model: EtaNet, path: Path) -> Path:
    """Write `model` as ONNX, dynamic batch dimension on every input and output, and check it."""
    import onnx

    model.eval()
    example = (torch.zeros(2, N_DENSE), torch.ones(2, 2, dtype=torch.int64))
    batch = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    # the classic exporter warns that it is deprecated; it is the stable path here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=INPUT_NAMES,
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: batch for name in [*INPUT_NAMES, OUTPUT_NAME]},
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_session(path: Path):
    """A single-threaded ONNX Runtime session, as serving runs it (small batches, many replicas)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_predict(session, inputs: Mapping[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    """eta_minutes for `build_inputs` output, run in chunks."""
    n = len(inputs["dense"])
    out = [
        session.run([OUTPUT_NAME], {k: v[i : i + batch_size] for k, v in inputs.items()})[0]
        for i in range(0, n, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def write_manifest(
    directory: Path,
    version: str,
    training_window: Mapping[str, str],
    metrics: Mapping,
    defaults: Mapping[str, float],
    created_at: datetime,
    extra: Mapping | None = None,
) -> ModelManifest:
    """The manifest of one ETA artifact, saved next to its ONNX file."""
    manifest = ModelManifest(
        name=MODEL_NAME,
        version=version,
        feature_service=FEATURE_SERVICE,
        inputs=INPUT_SPECS,
        outputs=OUTPUT_SPECS,
        training_window=dict(training_window),
        metrics=dict(metrics),
        feature_defaults={name: float(defaults[name]) for name in LIVE_FEATURES},
        created_at=created_at.isoformat(),
        extra={
            "dense_features": FEATURE_NAMES,
            "live_features": LIVE_FEATURES,
            "area_hash_prime": AREA_HASH_PRIME,
            # an embedding index outside the table would fail inside ONNX Runtime: serving checks it first
            "input_ranges": {"areas": [0, N_AREA_BUCKETS - 1]},
            "hour_harmonics": list(HOUR_HARMONICS),
            "order_time": "float epoch seconds, UTC",
            "restaurants": RESTAURANTS_FILE,
            "transform": "models.eta.features.build_inputs",
            **(extra or {}),
        },
    )
    save_manifest(directory, manifest)
    return manifest


def write_restaurants(directory: Path, restaurants) -> Path:
    """restaurants.parquet (restaurant_id int64, lat, lon float64) for the fallback path."""
    table = restaurants[["restaurant_id", "lat", "lon"]].astype(
        {"restaurant_id": "int64", "lat": "float64", "lon": "float64"}
    )
    path = directory / RESTAURANTS_FILE
    table.sort_values("restaurant_id").to_parquet(path, index=False)
    return path


def write_drift_reference(
    directory: Path,
    dense: np.ndarray,
    predicted: np.ndarray,
    train_order_time: np.ndarray | None = None,
    test_order_time: np.ndarray | None = None,
) -> Path:
    """reference.json: the dense inputs of the training rows and the predictions on the test window.

    With the order times (UTC epoch seconds) of the training rows and of the test rows, every
    entry also holds its shares per hour of day, so the monitor compares a live window with the
    training distribution of the hours it covers (monitoring/reference.py).
    """
    hours = {}
    if train_order_time is not None:
        hours["features"] = hour_of_day(train_order_time)
    if test_order_time is not None:
        hours["predictions"] = hour_of_day(test_order_time)
    return write_reference(directory, dict(zip(FEATURE_NAMES, np.asarray(dense).T, strict=True)),
                           {OUTPUT_NAME: predicted}, hours=hours, model=MODEL_NAME,
                           rows={"features": "training set", "predictions": "test window",
                                 "by_hour": "UTC hour of day of the order time"})
