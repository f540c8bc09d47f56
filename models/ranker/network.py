"""The ranker network: p(order | impression) = examine(position) * sigmoid(relevance(x)), calibrated.

- relevance(x): an MLP over the normalised dense features and a hashed restaurant-id
  embedding. Embedding rows start at zero and bucket 0 ("unknown") is pinned at zero, so a
  restaurant never seen in training, like the rows whose id was dropped during training
  (id dropout), is scored from its features alone.
- examine(position): how much less a card is looked at lower down (position-bias-aware
  learning, "PAL"): 1 at the top and falling by a learnt, non-negative step per slot
  (log examine(p) = -sum of softplus(step_k) for k = 2..p), so it can only decrease.
  Position multiplies the probability and never enters the relevance MLP, so it explains
  the orders the slot caused and is then fixed: serving scores every candidate at
  SERVING_POSITION (the top), where examine is exactly 1 and p = sigmoid(relevance).
- offset: the log-odds correction of the class-imbalance treatment (log of the kept share of
  negatives, minus log of the positive weight); with q the product above, the output is
  p = q * c / (1 - q + q * c), c = exp(offset), i.e. logit(p) = logit(q) + offset.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.ranker.features import (
    MAX_POSITION,
    N_DENSE,
    N_RESTAURANT_BUCKETS,
    SERVING_POSITION,
    UNKNOWN_RESTAURANT,
)

INPUT_NAMES = ["dense", "restaurant_bucket", "position"]
OUTPUT_NAME = "p_order"
_LOG_Q_MAX = -1e-6  # keeps log(1 - q) finite


class RankerNet(nn.Module):
    """Relevance MLP with a restaurant embedding, times a per-slot examination probability."""

    def __init__(self, n_dense: int = N_DENSE, n_buckets: int = N_RESTAURANT_BUCKETS, id_dim: int = 8,
                 hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        self.register_buffer("offset", torch.zeros(()))
        self.restaurant = nn.Embedding(n_buckets, id_dim, padding_idx=UNKNOWN_RESTAURANT)
        nn.init.zeros_(self.restaurant.weight)  # untouched buckets stay the "unknown restaurant"
        # one step per slot (index = position; 0 and 1 unused): softplus(-3) ~ 5 % less per slot at the start
        self.slot_steps = nn.Parameter(torch.full((MAX_POSITION + 1,), -3.0))
        slots = torch.arange(MAX_POSITION + 1)
        # below[p, k] = 1 for SERVING_POSITION < k <= p: a cumulative sum as one matrix product
        below = (slots[None, :] <= slots[:, None]) & (slots[None, :] > SERVING_POSITION)
        self.register_buffer("below", below.float())
        layers: list[nn.Module] = []
        width = n_dense + id_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.SiLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def set_normalisation(self, dense: np.ndarray) -> None:
        """Fit input mean/std on training rows (constant columns keep std 1)."""
        std = dense.std(axis=0)
        self.dense_mean.copy_(torch.as_tensor(dense.mean(axis=0), dtype=torch.float32))
        self.dense_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    def relevance(self, dense: torch.Tensor, restaurant_bucket: torch.Tensor) -> torch.Tensor:
        """The relevance logit, shape [N]: what ranks candidates at a fixed position."""
        x = torch.cat([(dense - self.dense_mean) / self.dense_std, self.restaurant(restaurant_bucket)], dim=1)
        return self.mlp(x).squeeze(-1)

    def log_examine(self) -> torch.Tensor:
        """log examine(p) for p = 0..MAX_POSITION, shape [MAX_POSITION + 1]; 0 at the top slot."""
        return -(self.below @ nn.functional.softplus(self.slot_steps))

    def log_q(self, dense: torch.Tensor, restaurant_bucket: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """log of the uncorrected probability q = examine(position) * sigmoid(relevance), shape [N]."""
        log_q = self.log_examine()[position] + nn.functional.logsigmoid(self.relevance(dense, restaurant_bucket))
        return torch.clamp(log_q, max=_LOG_Q_MAX)

    def loss(self, dense: torch.Tensor, restaurant_bucket: torch.Tensor, position: torch.Tensor,
             target: torch.Tensor, positive_weight: float = 1.0) -> torch.Tensor:
        """Binary cross-entropy of q (positives weighted), the training objective."""
        log_q = self.log_q(dense, restaurant_bucket, position)
        log_not_q = torch.log(-torch.expm1(log_q))
        return -(positive_weight * target * log_q + (1 - target) * log_not_q).mean()

    def forward(self, dense: torch.Tensor, restaurant_bucket: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Calibrated p_order, shape [N]."""
        q = torch.exp(self.log_q(dense, restaurant_bucket, position))
        c = torch.exp(self.offset)
        return q * c / (1 - q + q * c)
