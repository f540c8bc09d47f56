"""The prep-time model: Courier's worked example of adding a model (docs/adding-a-model.md).

A kitchen's preparation minutes for an order, from the `prep_time_v1` feature service (its 7-day prep
statistics and its open orders in the last 15 minutes); a tiny MLP exported to ONNX, trained, gated
and registered through models/lifecycle.py, and served by serving/generic.py at /v2/models/prep_time.
"""
