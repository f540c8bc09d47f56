"""Watching the models in production: prediction and outcome logs joined, online metrics, drift,
freshness, and the Prometheus alert rules and Grafana dashboard that turn them into alerts."""
