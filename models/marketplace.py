"""The marketplace's rules that every part shares: how far Courier delivers and when a kitchen is open.

The simulator imitates a marketplace that follows them, the training data is filtered by them and the
served retrieval applies them, so they live here and not in any one of those (serving never imports the
simulator).
"""

from __future__ import annotations

import numpy as np

DELIVERY_RADIUS_KM = 5.0  # great-circle distance from the restaurant to the drop-off


def is_open(opens: np.ndarray, closes: np.ndarray, hour: np.ndarray) -> np.ndarray:
    """Opening hours that may cross midnight (closes < opens)."""
    same_day = (hour >= opens) & (hour < closes)
    overnight = (hour >= opens) | (hour < closes)
    return np.where(closes > opens, same_day, overnight)
