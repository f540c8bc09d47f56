"""The prep-time network and its artifact: ONNX export and manifest.

ONNX signature: input `features` float32 [N, 4] (FEATURES, in that order; NaN = missing, replaced by
the training defaults inside the graph), output `prep_minutes` float32 [N]. Normalisation, defaults
and the target's scale are buffers of the module, so the exported graph takes raw feature values.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.artifact import ModelManifest, TensorSpec, save_manifest

MODEL_NAME = "prep_time"
FEATURE_SERVICE = "prep_time_v1"  # feature_repo/definitions.py
FEATURES = ["prep_time_mean_7d", "prep_time_p90_7d", "orders_7d", "open_orders_15m"]
INPUT_NAME, OUTPUT_NAME = "features", "prep_minutes"
INPUT_SPECS = [TensorSpec(INPUT_NAME, "FP32", [-1, len(FEATURES)])]
OUTPUT_SPECS = [TensorSpec(OUTPUT_NAME, "FP32", [-1])]
OPSET = 17


class PrepTimeNet(nn.Module):
    """MLP regressor of preparation minutes over the kitchen's statistics and live load."""

    def __init__(self, hidden: tuple[int, ...] = (16, 16)) -> None:
        super().__init__()
        n = len(FEATURES)
        self.register_buffer("defaults", torch.zeros(n))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        layers: list[nn.Module] = []
        width = n
        for size in hidden:
            layers += [nn.Linear(width, size), nn.SiLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def set_normalisation(self, features: np.ndarray, target: np.ndarray, defaults: np.ndarray) -> None:
        """Defaults for missing values, input mean/std and target scale, from training rows."""
        filled = np.where(np.isnan(features), defaults, features)
        std = filled.std(axis=0)
        self.defaults.copy_(torch.as_tensor(defaults, dtype=torch.float32))
        self.mean.copy_(torch.as_tensor(filled.mean(axis=0), dtype=torch.float32))
        self.std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))
        self.target_mean.fill_(float(np.mean(target)))
        self.target_std.fill_(float(np.std(target)) or 1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted minutes, shape [N]; NaN inputs take the training defaults."""
        x = torch.where(torch.isnan(features), self.defaults.expand_as(features), features)
        out = self.mlp((x - self.mean) / self.std).squeeze(-1)
        return out * self.target_std + self.target_mean


def export_onnx(model: PrepTimeNet, path: Path) -> Path:
    """Write `model` as ONNX with a dynamic batch dimension, and check it."""
    import onnx

    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the classic exporter warns that it is deprecated; it is the stable path
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, len(FEATURES)),), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_predict(path: Path, features: np.ndarray) -> np.ndarray:
    """prep_minutes of an ONNX artifact for raw feature rows, single-threaded as served."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(features, dtype=np.float32)})[0]


def write_manifest(directory: Path, version: str, training_window: Mapping[str, str], metrics: Mapping,
                   defaults: Mapping[str, float], created_at: datetime, extra: Mapping | None = None) -> ModelManifest:
    """The manifest of one prep-time artifact, next to its ONNX file."""
    manifest = ModelManifest(
        name=MODEL_NAME, version=version, feature_service=FEATURE_SERVICE, inputs=INPUT_SPECS, outputs=OUTPUT_SPECS,
        training_window=dict(training_window), metrics=dict(metrics),
        feature_defaults={name: float(defaults[name]) for name in FEATURES}, created_at=created_at.isoformat(),
        extra={"input_features": FEATURES, "missing": "NaN, replaced by feature_defaults inside the graph",
               **(extra or {})})
    save_manifest(directory, manifest)
    return manifest
