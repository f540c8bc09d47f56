"""Drift: the last logged predictions of each model version against its training reference.

For every (model, model_version) seen in the prediction log the monitor keeps a sliding window
of the last `window` values of the prediction (ETA: eta_minutes; ranker: p_order of every card
shown) and of the chosen ETA inputs, and sets `courier_prediction_psi` and
`courier_feature_psi` to their PSI against the version's `reference.json`
(monitoring/reference.py) once a window holds `min_count` values. An ETA window also keeps the
UTC hour of each record's `order_time`, and its PSI is taken against the training distribution of
the hours the window covers (the hourly reference shares mixed by the window's hours), not against
all hours pooled: demand, and with it load, congestion and ETAs, follows the meal curve, so a window
of the last hour differs from the whole day's training data in a perfectly healthy city.

Why PSI and not a drift library: it is one stated formula over binned training quantiles, cheap
enough to recompute every few seconds, with a common rule of thumb (> 0.25 is a significant
shift); Evidently would bring heavy dependencies for the same number.

Which inputs: the hour-of-day and weekday inputs are left out by default (config.yaml): the hour
inputs nearly match the hour-mixture by construction (little to learn from them), and a window covers
one weekday while training covers all seven, which the hourly reference does not condition on.
References written before the hourly shares (no `by_hour`) are compared with the global shares.

Shadow records (a challenger's answer, logged beside the answer given) are left out: they carry
the answer but not the inputs. The PSI is per version, whichever variant it served as.

The ranker's PSI is exported but does not alert (CourierPredictionDrift is for model="eta"): the
feed logs p_order of the cards it shows, the model's own top picks, while its reference describes
the logging policy's impressions, so the two differ without any drift.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

import numpy as np

from monitoring.metrics import MonitorMetrics
from monitoring.reference import Artifacts, hour_of_day, psi

logger = logging.getLogger("monitoring")
PREDICTION_OF = {"eta": "eta_minutes", "ranker": "p_order"}


class _Window:
    """The last values of one model version's prediction and inputs (and their hours, if kept)."""

    def __init__(self, size: int, features: Iterable[str], hours: bool = False):
        self.prediction: deque[float] = deque(maxlen=size)
        self.features = {name: deque(maxlen=size) for name in features}
        # the UTC hour of day of each value, aligned with `prediction` and every feature
        self.hours: deque[int] | None = deque(maxlen=size) if hours else None


class DriftMonitor:
    """Sliding windows per model version, and their PSI against the training reference."""

    def __init__(self, metrics: MonitorMetrics, artifacts: dict[str, Artifacts], window: int = 1000,
                 min_count: int = 200, eta_features: Iterable[str] = (), max_versions: int = 4):
        """`artifacts` maps a model ("eta", "ranker") to where its versions live; at most
        `max_versions` versions per model are tracked (the least recently seen is dropped)."""
        self.metrics, self.artifacts = metrics, artifacts
        self.size, self.min_count, self.max_versions = window, min_count, max_versions
        self.eta_features = list(eta_features)
        self.windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()
        self._warned: set[tuple[str, str]] = set()

    def observe(self, record: dict[str, Any]) -> None:
        """Add one logged prediction (docs/monitoring.md record) to its version's window."""
        model, version = record.get("model"), record.get("model_version")
        if model not in PREDICTION_OF or not isinstance(version, str) or record.get("variant") == "shadow":
            return  # a shadow record carries the answer, not the inputs: its windows would fill with gaps
        window = self._window(model, version)
        if model == "eta":
            window.prediction.append(_float(record.get("eta_minutes")))
            window.hours.append(int(hour_of_day(_float(record.get("order_time")))))  # -1: unknown
            inputs = record.get("inputs") or {}
            for name, values in window.features.items():
                values.append(_float(inputs.get(name)))
        else:
            window.prediction.extend(_float(card.get("p_order")) for card in record.get("cards") or [])

    def update(self) -> dict[tuple[str, str], dict[str, float]]:
        """Recompute every PSI whose window is full enough; returns {(model, version): {name: psi}}."""
        results = {}
        for (model, version), window in self.windows.items():
            if len(window.prediction) < self.min_count:
                continue
            reference = self._reference(model, version)
            if reference is None:
                continue
            found = {}
            hours = None if window.hours is None else np.fromiter(window.hours, dtype=np.int64)
            prediction_name = PREDICTION_OF[model]
            entry = reference.get("predictions", {}).get(prediction_name)
            if entry is not None:
                found[prediction_name] = psi(entry, np.fromiter(window.prediction, dtype=np.float64), hours)
                self.metrics.prediction_psi.labels(model=model, model_version=version).set(found[prediction_name])
            for name, values in window.features.items():
                entry = reference.get("features", {}).get(name)
                if entry is None or len(values) < self.min_count:
                    continue
                found[name] = psi(entry, np.fromiter(values, dtype=np.float64), hours)
                self.metrics.feature_psi.labels(model=model, model_version=version, feature=name).set(found[name])
            results[(model, version)] = found
        return results

    def _window(self, model: str, version: str) -> _Window:
        key = (model, version)
        window = self.windows.get(key)
        if window is None:
            eta = model == "eta"
            window = self.windows[key] = _Window(self.size, self.eta_features if eta else (), hours=eta)
            versions = [k for k in self.windows if k[0] == model]
            if len(versions) > self.max_versions:
                self._forget(versions[0])
        self.windows.move_to_end(key)
        return window

    def _forget(self, key: tuple[str, str]) -> None:
        """Stop tracking a version no longer seen: its gauges go too."""
        window = self.windows.pop(key)
        model, version = key
        for gauge, labels in [(self.metrics.prediction_psi, (model, version)),
                              *[(self.metrics.feature_psi, (model, version, name)) for name in window.features]]:
            try:
                gauge.remove(*labels)
            except KeyError:  # never set
                pass

    def _reference(self, model: str, version: str) -> dict | None:
        artifacts = self.artifacts.get(model)
        reference = artifacts.reference(version) if artifacts is not None else None
        if reference is None and (model, version) not in self._warned:
            self._warned.add((model, version))
            where = artifacts.root / version if artifacts is not None else f"the {model} artifacts"
            logger.warning("no drift reference for %s %s (expected %s/reference.json; retrain to write one)",
                           model, version, where)
        return reference


def _float(value: Any) -> float:
    """A float, NaN for None or garbage (NaN counts as a missing value in the PSI)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value
