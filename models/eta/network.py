"""The ETA network: an MLP over normalised dense features and pickup/drop-off area embeddings.

ONNX signature: inputs `dense` float32 [N, D] (raw values from `features.build_inputs`)
and `areas` int64 [N, 2]; output `eta_minutes` float32 [N]. The normalisation of the
inputs and the scale of the target live inside the module as buffers, so the exported
graph takes raw features and returns minutes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.eta.features import N_AREA_BUCKETS, N_DENSE

INPUT_NAMES = ["dense", "areas"]
OUTPUT_NAME = "eta_minutes"


class EtaNet(nn.Module):
    """MLP regressor of delivery minutes; one area embedding table shared by pickup and drop-off."""

    def __init__(
        self,
        n_dense: int = N_DENSE,
        n_buckets: int = N_AREA_BUCKETS,
        area_dim: int = 4,
        hidden: tuple[int, ...] = (64, 64),
    ) -> None:
        super().__init__()
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.area = nn.Embedding(n_buckets, area_dim)
        # zero start: an area never seen in training (and bucket 0, unknown) stays the average area
        nn.init.zeros_(self.area.weight)
        layers: list[nn.Module] = []
        width = n_dense + 2 * area_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.SiLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def set_normalisation(self, dense: np.ndarray, target: np.ndarray) -> None:
        """Fit input mean/std and target scale on training rows (constant columns keep std 1)."""
        std = dense.std(axis=0)
        self.dense_mean.copy_(torch.as_tensor(dense.mean(axis=0), dtype=torch.float32))
        self.dense_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))
        self.target_mean.fill_(float(np.mean(target)))
        self.target_std.fill_(float(np.std(target)) or 1.0)

    def forward(self, dense: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        """Predicted minutes, shape [N]."""
        x = (dense - self.dense_mean) / self.dense_std
        places = self.area(areas).flatten(1)  # [N, 2 * area_dim]: pickup then drop-off
        out = self.mlp(torch.cat([x, places], dim=1)).squeeze(-1)
        return out * self.target_std + self.target_mean
