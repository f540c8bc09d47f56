"""The model registry (models/registry.py): MLflow's, on SQLite here and on PostgreSQL as the chart deploys it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from models.artifact import ModelManifest, TensorSpec, save_manifest
from models.registry import Registry, RegistryError


def artifact(root: Path, name: str, version: str, feature_service: str = "eta_v1") -> Path:
    """A minimal artifact directory: a manifest and an ONNX file (the registry reads only the manifest)."""
    directory = root / name / version
    save_manifest(directory, ModelManifest(name, version, feature_service, [TensorSpec("x", "FP32", [-1, 3])],
                                           [TensorSpec("y", "FP32", [-1])], {"start": "a", "end": "b"}))
    (directory / "model.onnx").write_bytes(b"onnx")
    return directory


def exercise(registry: Registry, root: Path) -> None:
    """Register two versions, alias them, resolve every kind of reference, read the lineage back."""
    first = registry.register(artifact(root, "eta", "eta-1-aaa"), params={"training_window": "2026-01-01/02"},
                              metrics={"rmse": 3.3}, tags={"gate": "passed"})
    second = registry.register(artifact(root, "eta", "eta-2-bbb"), metrics={"rmse": 3.1})
    assert (first.number, second.number) == ("1", "2")
    assert first.path == root / "eta" / "eta-1-aaa" and first.manifest.feature_service == "eta_v1"
    registry.set_alias("eta", "champion", "1")
    registry.set_alias("eta", "challenger", "eta-2-bbb")  # by artifact version
    assert registry.resolve("eta", "champion").version == "eta-1-aaa"
    assert registry.resolve("eta", "challenger").number == "2"
    assert registry.resolve("eta", "eta-2-bbb").number == "2"
    assert [v.aliases for v in registry.versions("eta")] == [("champion",), ("challenger",)]
    lineage = registry.lineage(first)
    assert lineage["params"]["training_window"] == "2026-01-01/02" and lineage["metrics"]["rmse"] == 3.3
    assert lineage["tags"]["gate"] == "passed" and lineage["tags"]["feature_service"] == "eta_v1"
    registry.set_alias("eta", "champion", "challenger")  # promotion moves the alias
    registry.delete_alias("eta", "challenger")
    registry.delete_alias("eta", "challenger")  # absent is fine
    assert [v.aliases for v in registry.versions("eta")] == [(), ("champion",)]
    with pytest.raises(RegistryError, match=r"Registered versions: 1 \(eta-1-aaa\), 2 \(eta-2-bbb\)"):
        registry.resolve("eta", "7")
    with pytest.raises(RegistryError, match="make train"):
        registry.resolve("ranker", "champion")
    with pytest.raises(RegistryError, match="unknown alias"):
        registry.set_alias("eta", "latest", "1")


def test_registry_on_sqlite_registers_aliases_and_resolves(tmp_path):
    root = tmp_path / "artifacts"
    exercise(Registry(artifacts=root), root)
    assert (root / "registry.db").exists()  # the default backend sits beside the artifacts
    # A second client on the same file sees the same registry (the trainer and the server are different processes).
    assert Registry(artifacts=root).resolve("eta", "champion").version == "eta-2-bbb"


def test_registry_refuses_an_artifact_outside_its_root(tmp_path):
    registry = Registry(artifacts=tmp_path / "artifacts")
    stray = artifact(tmp_path / "elsewhere", "eta", "eta-1-aaa")
    with pytest.raises(RegistryError, match="register artifacts from the artifact root"):
        registry.register(stray)


def test_registry_on_postgresql_as_the_chart_deploys_it(tmp_path):
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 (.ci/run starts it): {exc}")
    admin.autocommit = True
    database = f"courier_registry_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    try:
        root = tmp_path / "artifacts"
        exercise(Registry(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}", root), root)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE {database} WITH (FORCE)")
        admin.close()
