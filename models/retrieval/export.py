"""Export the user tower to ONNX and write the retrieval artifact that serving loads.

Artifact layout (models/artifact.py): `<artifacts>/retrieval/<version>/` holds
`model.onnx` (the user tower: input user_dense f32 [N, N_USER_DENSE], output user_embedding
f32 [N, EMBEDDING_DIM]), `manifest.json`, `restaurant_embeddings.npy` (float32 [R, D], the
restaurant tower's output for every restaurant known at training time), `restaurant_ids.npy`
(int64 [R], the row order of the embeddings) and `restaurants.parquet` (the hard filters'
columns: restaurant_id, lat, lon, cuisine, price_level, opens_hour, closes_hour).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.artifact import ModelManifest, TensorSpec, save_manifest
from models.ranker.export import export_module
from models.ranker.features import RESTAURANT_HASH_PRIME, USER_FEATURES
from models.retrieval.features import (
    EMBEDDING_DIM,
    FEATURE_SERVICE,
    N_USER_DENSE,
    RESTAURANT_COLUMNS,
    USER_FEATURE_NAMES,
)
from models.retrieval.index import EMBEDDINGS_FILE, IDS_FILE, INDEX_KIND, RESTAURANTS_FILE
from models.retrieval.network import USER_INPUT, USER_OUTPUT, UserTower

MODEL_NAME = "retrieval"
INPUT_SPECS = [TensorSpec(USER_INPUT, "FP32", [-1, N_USER_DENSE])]
OUTPUT_SPECS = [TensorSpec(USER_OUTPUT, "FP32", [-1, EMBEDDING_DIM])]


def export_user_tower(tower: UserTower, path: Path) -> Path:
    """The user tower as ONNX, dynamic batch."""
    return export_module(tower, (torch.zeros(2, N_USER_DENSE),), [USER_INPUT], [USER_OUTPUT], path)


def user_embeddings(session, inputs: Mapping[str, np.ndarray], batch_size: int = 16384) -> np.ndarray:
    """user_embedding rows for `build_user_inputs` output, run in chunks."""
    n = len(inputs[USER_INPUT])
    out = [session.run([USER_OUTPUT], {USER_INPUT: inputs[USER_INPUT][i:i + batch_size]})[0]
           for i in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)


def write_index(directory: Path, restaurants: pd.DataFrame, embeddings: np.ndarray) -> None:
    """restaurant_embeddings.npy, restaurant_ids.npy and restaurants.parquet, row-aligned."""
    if len(restaurants) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings for {len(restaurants)} restaurants")
    np.save(directory / EMBEDDINGS_FILE, embeddings.astype(np.float32))
    np.save(directory / IDS_FILE, restaurants["restaurant_id"].to_numpy(dtype=np.int64))
    restaurants[RESTAURANT_COLUMNS].to_parquet(directory / RESTAURANTS_FILE, index=False)


def write_manifest(directory: Path, version: str, training_window: Mapping[str, str], metrics: Mapping,
                   defaults: Mapping[str, float], created_at: datetime, extra: Mapping | None = None) -> ModelManifest:
    """The manifest of one retrieval artifact, saved next to its ONNX file."""
    manifest = ModelManifest(
        name=MODEL_NAME,
        version=version,
        feature_service=FEATURE_SERVICE,
        inputs=INPUT_SPECS,
        outputs=OUTPUT_SPECS,
        training_window=dict(training_window),
        metrics=dict(metrics),
        feature_defaults={name: float(defaults[name]) for name in USER_FEATURES},
        created_at=created_at.isoformat(),
        extra={
            "embedding_dim": EMBEDDING_DIM,
            "index_kind": INDEX_KIND,
            "restaurant_embeddings": EMBEDDINGS_FILE,
            "restaurant_ids": IDS_FILE,
            "restaurants": RESTAURANTS_FILE,
            "user_features": USER_FEATURE_NAMES,
            "restaurant_hash_prime": RESTAURANT_HASH_PRIME,
            "entity_rows": ["user_id"],
            "request_time": "float epoch seconds, UTC",
            "transform": "models.retrieval.features.build_user_inputs",
            "index": "models.retrieval.index.RestaurantIndex",
            **(extra or {}),
        },
    )
    save_manifest(directory, manifest)
    return manifest
