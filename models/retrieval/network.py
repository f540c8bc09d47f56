"""The two-tower retrieval network: score(user, restaurant) = user_embedding . restaurant_embedding.

- user tower: MLP over the normalised user features (history, place, time). No user-id
  input, so a user never seen in training is embedded like any other.
- restaurant tower: MLP over the normalised static restaurant features (cuisine, price,
  place, opening hours) plus a hashed restaurant-id embedding. Id rows start at zero and
  bucket 0 ("unknown") is pinned at zero; ids are dropped during training, so a restaurant
  never seen in training is embedded from its features (cold start).

Trained with a softmax over each order's hard-filtered candidates (open, within the radius):
with a few hundred restaurants the full candidate set is cheaper than sampling negatives,
and it is exactly the set the index ranks at serving time. The dot product is the log of
p(order restaurant | user, place, time) up to a per-request constant.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.ranker.features import N_RESTAURANT_BUCKETS, UNKNOWN_RESTAURANT
from models.retrieval.features import EMBEDDING_DIM, N_RESTAURANT_DENSE, N_USER_DENSE

USER_INPUT = "user_dense"
USER_OUTPUT = "user_embedding"


def _mlp(width: int, hidden: tuple[int, ...], out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.SiLU()]
        width = size
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class _Normalised(nn.Module):
    """(x - mean) / std with the statistics as buffers (exported inside the ONNX graph)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))

    def fit(self, x: np.ndarray) -> None:
        std = x.std(axis=0)
        self.mean.copy_(torch.as_tensor(x.mean(axis=0), dtype=torch.float32))
        self.std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class UserTower(nn.Module):
    """user_dense [N, N_USER_DENSE] -> user_embedding [N, EMBEDDING_DIM] (the exported graph)."""

    def __init__(self, hidden: tuple[int, ...] = (64,), dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.norm = _Normalised(N_USER_DENSE)
        self.mlp = _mlp(N_USER_DENSE, hidden, dim)

    def forward(self, user_dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(user_dense))


class RestaurantTower(nn.Module):
    """(restaurant_dense [R, D], restaurant_bucket [R]) -> restaurant embedding [R, EMBEDDING_DIM]."""

    def __init__(self, hidden: tuple[int, ...] = (64,), dim: int = EMBEDDING_DIM, id_dim: int = 16) -> None:
        super().__init__()
        self.norm = _Normalised(N_RESTAURANT_DENSE)
        self.restaurant = nn.Embedding(N_RESTAURANT_BUCKETS, id_dim, padding_idx=UNKNOWN_RESTAURANT)
        nn.init.zeros_(self.restaurant.weight)  # untouched buckets stay the "unknown restaurant"
        self.mlp = _mlp(N_RESTAURANT_DENSE + id_dim, hidden, dim)

    def forward(self, restaurant_dense: torch.Tensor, restaurant_bucket: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.norm(restaurant_dense), self.restaurant(restaurant_bucket)], dim=1))


class TwoTower(nn.Module):
    """Both towers; `scores` is the [N, R] matrix of dot products."""

    def __init__(self, hidden: tuple[int, ...] = (64,), dim: int = EMBEDDING_DIM, id_dim: int = 16) -> None:
        super().__init__()
        self.user = UserTower(hidden, dim)
        self.restaurant = RestaurantTower(hidden, dim, id_dim)

    def scores(self, user_dense: torch.Tensor, restaurant_dense: torch.Tensor,
               restaurant_bucket: torch.Tensor) -> torch.Tensor:
        return self.user(user_dense) @ self.restaurant(restaurant_dense, restaurant_bucket).T
