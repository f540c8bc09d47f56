"""Offline evaluation of retrieval: recall@K of held-out feed orders among hard-filtered candidates.

For each held-out ordered impression, every restaurant that passed the hard filters at that
time and place is scored; recall@K is the share of orders whose restaurant is in the top K
(ties broken at random, counted in expectation). Written to `<reports>/metrics.json`:

    recall_at_<K>              the two-tower model, K in RECALL_KS
    baseline_recall_at_<K>     popularity: orders of the last 7 days (restaurant_prep_7d), as of the order
    oracle_recall_at_<K>       ranking by the simulator's true relevance (true tastes and popularity,
                               models.sessions.relevance): what perfect knowledge of the user gives
                               (a reference, not a strict bound: feed orders also depend on exposure)
    orders_*                   the same on the order stream's held-out orders (oracle: the true
                               order-choice weight popularity * exp(-km / 2) * (0.2 + 10 taste))
    new_user_recall_at_<K>     the model on the same orders with every user's history missing
    mean_candidates, n_test    candidates per order after the hard filters; orders evaluated
    reachable_lift_share_at_10 (recall - baseline) / (oracle - baseline) at K = 10
    targets_met                recall_at_10 >= baseline + TARGET_SHARE * (oracle - baseline): "well
                               above popularity" = at least half of the lift perfect knowledge reaches

and the plot `recall_at_k.png` (recall against K for both).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from models.gate import GateRules

RECALL_KS = (10, 20, 50, 100)
TARGET_SHARE = 0.5  # share of the popularity-to-oracle recall@10 gap the model must close
# The gate (models/gate.py): ONNX user embeddings within 1e-4 of PyTorch's; recall@10 on the candidate's
# held-out feed orders at most 0.02 below the champion's on the same orders (a sixth of the
# popularity-to-oracle gap of the default city, 0.63 -> 0.75)
GATE = GateRules("retrieval", metric="recall_at_10", higher_is_better=True, margin=0.02, relative=False,
                 atol=1e-4)


def expected_hits(scores: np.ndarray, mask: np.ndarray, target: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """P(target in top K) per row and K, ties broken at random; shape [N, len(ks)].

    scores [N, R], mask [N, R] (candidates), target [N] (column of the ordered restaurant).
    """
    rows = np.arange(len(target))
    own = scores[rows, target][:, None]
    better = ((scores > own) & mask).sum(axis=1)
    ties = ((scores == own) & mask).sum(axis=1) - 1  # others with the same score
    return np.clip((ks[None, :] - better[:, None]) / (ties[:, None] + 1.0), 0.0, 1.0)


def recall_table(scores: np.ndarray, mask: np.ndarray, target: np.ndarray, max_k: int) -> np.ndarray:
    """Recall@K for K = 1..max_k (index K - 1)."""
    return expected_hits(scores, mask, target, np.arange(1, max_k + 1)).mean(axis=0)


def plot_recall(reports: Path, curves: Mapping[str, np.ndarray], title: str) -> Path:
    """recall_at_k.png: recall@K against K for each named curve."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    reports.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, curve), style in zip(curves.items(), ("-", "--", "-.", ":"), strict=False):
        ax.plot(np.arange(1, len(curve) + 1), curve, style, label=label)
    for k in RECALL_KS:
        ax.axvline(k, color="grey", lw=0.5)
    ax.set(xlabel="K (restaurants kept after the hard filters)", ylabel="recall@K", title=title, ylim=(0, 1.02))
    ax.legend(loc="lower right")
    path = reports / "recall_at_k.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_metrics(reports: Path, metrics: Mapping, context: Mapping | None = None) -> Path:
    """`<reports>/metrics.json` with the metrics and a `context` block."""
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / "metrics.json"
    path.write_text(json.dumps({**metrics, "context": dict(context or {})}, indent=2, default=str))
    return path


def summarise(curves: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    """`<prefix><name>recall_at_K` for K in RECALL_KS from 1..max curves named "", "baseline_", "oracle_"."""
    out = {}
    for name, curve in curves.items():
        for k in RECALL_KS:
            out[f"{prefix}{name}recall_at_{k}"] = float(curve[min(k, len(curve)) - 1])
    return out


def oracle_scores(frame, restaurants, users, kind: str) -> np.ndarray:
    """[N, R] true scores of every restaurant for each order (module doc); `kind` "feed" or "orders".

    `restaurants` holds the truth column true_popularity (row order = the index's), `users`
    the true_taste_<cuisine> columns indexed by user_id.
    """
    from models.geo import haversine_km
    from models.ranker.features import CUISINES
    from models.sessions import relevance

    code = np.array([CUISINES.index(c) for c in restaurants["cuisine"]])
    taste = users.loc[frame["user_id"], [f"true_taste_{c}" for c in CUISINES]].to_numpy()[:, code]
    km = haversine_km(frame["user_lat"].to_numpy()[:, None], frame["user_lon"].to_numpy()[:, None],
                      restaurants["lat"].to_numpy()[None, :], restaurants["lon"].to_numpy()[None, :])
    popularity = restaurants["true_popularity"].to_numpy()[None, :]
    if kind == "orders":  # the simulator's order choice (models.simulator._choose_restaurants)
        return np.log(popularity) - km / 2.0 + np.log(0.2 + 10.0 * taste)
    t = frame["event_timestamp"]
    hour = (t.dt.hour + t.dt.minute / 60).to_numpy()[:, None]
    return relevance(popularity, taste, km, restaurants["price_level"].to_numpy()[None, :], hour, code[None, :])


def targets(metrics: dict) -> dict:
    """reachable_lift_share_at_10 and targets_met from the recall figures."""
    reachable = metrics["oracle_recall_at_10"] - metrics["baseline_recall_at_10"]
    share = (metrics["recall_at_10"] - metrics["baseline_recall_at_10"]) / reachable if reachable > 0 else 0.0
    return {"recall_lift_at_10": metrics["recall_at_10"] - metrics["baseline_recall_at_10"],
            "reachable_lift_share_at_10": float(share), "targets_met": bool(share >= TARGET_SHARE)}
