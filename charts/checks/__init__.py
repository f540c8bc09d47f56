"""Offline checks of the rendered chart that stand in for a cluster.

`kuberay` mirrors the KubeRay operator's validation of a RayService, `rollout` Ray Serve's refusal of a
bad model slot (and the one-writer rule of a SQLite registry), `kserve` KServe's choice of
serving runtime, and `fit` the scheduler's arithmetic against the documented minimum clusters
(`clusters.yaml`). `python -m charts.checks` runs them all; tests/test_chart_contract.py proves each
rule on every values scenario.
"""
