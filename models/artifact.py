"""Versioned model artifacts: an ONNX file plus a manifest that says what it needs.

Layout: `<root>/<model>/<version>/{model.onnx, manifest.json, gate.json, ...}`. Which version
serves is the model registry's business (models/registry.py: aliases `champion`, `challenger`),
never a path: there is no `current` link. The manifest names the Feast feature service the model
was trained with, so serving can refuse what it cannot feed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"


class ArtifactError(ValueError):
    """An artifact is missing, malformed, or cannot be served here."""


@dataclass
class TensorSpec:
    """One named ONNX input or output, in Open Inference Protocol terms."""

    name: str
    datatype: str  # "FP32", "INT64", ...
    shape: list[int]  # -1 for the dynamic batch dimension


@dataclass
class ModelManifest:
    """Everything serving and people need to know about one trained model."""

    name: str
    version: str
    feature_service: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    training_window: dict[str, str]  # {"start": iso, "end": iso} of the training orders
    metrics: dict[str, Any] = field(default_factory=dict)  # figures and target flags of the evaluation
    feature_defaults: dict[str, float] = field(default_factory=dict)  # used when a feature is missing or stale
    created_at: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelManifest:
        raw = dict(raw)
        raw["inputs"] = [TensorSpec(**t) for t in raw["inputs"]]
        raw["outputs"] = [TensorSpec(**t) for t in raw["outputs"]]
        return cls(**raw)


def save_manifest(directory: Path, manifest: ModelManifest) -> None:
    """Write the manifest next to the ONNX file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).write_text(manifest.to_json())


def load_manifest(directory: Path) -> ModelManifest:
    """Read and check a model directory; the error says what to do when it is not usable."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists() or not (directory / ONNX_FILE).exists():
        raise ArtifactError(f"no model artifact in {directory} (expected {MANIFEST} and {ONNX_FILE}): run `make train`")
    try:
        return ModelManifest.from_dict(json.loads((directory / MANIFEST).read_text()))
    except (TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{directory / MANIFEST} is not a valid manifest: {exc}") from exc


def new_version(name: str, onnx_path: Path, now: datetime) -> str:
    """`<name>-YYYYmmddHHMMSS-<6 hex of the ONNX bytes>`: sortable by time, unique by content."""
    digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()[:6]
    return f"{name}-{now.strftime('%Y%m%d%H%M%S')}-{digest}"


def staging_dir(artifacts: Path, name: str) -> Path:
    """A fresh dot-folder under `<artifacts>/<name>/` to build a version in before it is named and gated."""
    root = Path(artifacts) / name
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".staging-{datetime.now(UTC).strftime('%Y%m%d%H%M%S%f')}"
    path.mkdir()
    return path
