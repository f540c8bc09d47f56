"""The monitor's Prometheus metrics (names as in docs/monitoring.md), on a registry of their own.

Counters get `_total` from prometheus_client. One exception: the ETA error sum
(`courier_eta_error_minutes_total`, delivered - predicted) can go down, which a Prometheus
counter may not, so it is a gauge holding the running sum: take its change over a window with
`delta()`, not `rate()` / `increase()` (they would read a decrease as a counter reset).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server, values

# Importing feast.metrics (Feast 0.67 does it inside online reads) sets PROMETHEUS_MULTIPROC_DIR,
# and prometheus_client then keeps every value in shared files keyed by name and labels (for
# pre-fork servers): two registries in one process would count into the same numbers. The
# monitor is one process with registries of its own, so its values live in memory.
values.ValueClass = values.MutexValue


class MonitorMetrics:
    """Every metric the monitor exports; `serve(port)` exposes them at /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # variant: "champion" | "challenger" (what the caller got) | "shadow" (logged, never returned)
        version = ["model_version", "variant"]
        # ETA: live error against the delivered time, per model version
        self.eta_outcomes = Counter("courier_eta_outcomes", "Deliveries joined to their /v1/eta prediction.",
                                    version, registry=r)
        self.eta_error = Gauge("courier_eta_error_minutes_total", "Running sum of delivered - predicted minutes "
                               "(a gauge: it can go down; use delta()).", version, registry=r)
        self.eta_abs_error = Counter("courier_eta_abs_error_minutes", "Sum of |delivered - predicted| minutes.",
                                     version, registry=r)
        self.eta_squared_error = Counter("courier_eta_squared_error_minutes2",
                                         "Sum of (delivered - predicted)^2, minutes^2.", version, registry=r)
        self.eta_offline_rmse = Gauge("courier_eta_offline_rmse_minutes", "The model's RMSE on its offline test "
                                      "window (manifest).", ["model_version"], registry=r)
        # feed: conversion per position and calibration of the top slot
        self.feed_impressions = Counter("courier_feed_impressions", "Cards shown, joined to their session's "
                                        "outcome.", ["model_version", "variant", "position"], registry=r)
        self.feed_orders = Counter("courier_feed_orders", "Cards shown and ordered.",
                                   ["model_version", "variant", "position"], registry=r)
        self.feed_top_predicted = Counter("courier_feed_top_predicted_orders", "Sum of p_order of position-1 "
                                          "cards (expected orders at the top slot).", version, registry=r)
        self.feed_top_orders = Counter("courier_feed_top_orders", "Position-1 cards ordered.", version, registry=r)
        # drift
        self.prediction_psi = Gauge("courier_prediction_psi", "PSI of the last logged predictions against the "
                                    "training reference.", ["model", "model_version"], registry=r)
        self.feature_psi = Gauge("courier_feature_psi", "PSI of a model input over the last logged predictions "
                                 "against the training reference.", ["model", "model_version", "feature"],
                                 registry=r)
        # freshness and age budgets
        self.view_age = Gauge("courier_feature_view_newest_age_seconds", "Age of the newest value of a feature "
                              "view in the online store (+Inf: no value).", ["view"], registry=r)
        self.view_ttl = Gauge("courier_feature_view_ttl_seconds", "The view's TTL (+Inf: never expires).", ["view"],
                              registry=r)
        self.view_budget = Gauge("courier_feature_view_freshness_budget_seconds", "How old the newest value may "
                                 "get before the pipeline is late.", ["view"], registry=r)
        self.model_age_budget = Gauge("courier_model_age_budget_seconds", "How old a served model may get.",
                                      ["model"], registry=r)
        # the join and the offline log
        self.joined = Counter("courier_joined_records", "Predictions joined to their outcome.", ["endpoint"],
                              registry=r)
        self.expired = Counter("courier_unjoined_expired", "Predictions or outcomes dropped unjoined after the "
                               "join window.", ["endpoint", "kind"], registry=r)
        self.rows_appended = Counter("courier_offline_rows_appended", "Joined rows written to the offline store.",
                                     ["table"], registry=r)
        # the monitor's own health
        self.records_read = Counter("courier_monitor_records", "Stream entries read.", ["stream"], registry=r)
        self.bad_records = Counter("courier_monitor_bad_records", "Stream entries that could not be decoded "
                                   "(acknowledged and skipped).", ["stream"], registry=r)
        self.pending = Gauge("courier_monitor_pending_records", "Records waiting for their other half.",
                             ["endpoint", "kind"], registry=r)
        self.probe_errors = Counter("courier_monitor_freshness_probe_errors", "Freshness probes that could not "
                                    "read the online store.", registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Expose /metrics on `port` from a daemon thread; returns (server, thread) for shutdown."""
        return start_http_server(port, addr=addr, registry=self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value by its exposed name (e.g. "courier_eta_outcomes_total"); None if absent."""
        return self.registry.get_sample_value(name, labels or {})
