"""The model registry: MLflow's, holding every gated model with its lineage, addressed by version or alias.

An artifact stays a directory `<artifacts>/<model>/<version>/` (models/artifact.py); the registry
records it as an MLflow model version whose tag `courier.version` names that directory, so the
same registry works wherever the artifact root is mounted (the project folder here, the models
volume on Kubernetes). A registry reference is an alias (`champion`, `challenger`), an MLflow
version number ("3"), or an artifact version ("eta-20261130230102-1a2b3c").

The backend is `COURIER_REGISTRY` (any MLflow tracking URI: `sqlite:///...` here, `postgresql://...`
on Kubernetes); by default `sqlite:///<artifacts>/registry.db`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from models.artifact import ArtifactError, ModelManifest, load_manifest

REGISTRY_ENV = "COURIER_REGISTRY"
ARTIFACTS_ENV = "COURIER_ARTIFACTS"
CHAMPION, CHALLENGER = "champion", "challenger"
ALIASES = (CHAMPION, CHALLENGER)
VERSION_TAG = "courier.version"
EXPERIMENT = "courier-training"
_NUMBER = re.compile(r"^\d+$")


class RegistryError(LookupError):
    """A reference the registry cannot resolve, or a registration it refuses."""


@dataclass(frozen=True)
class RegisteredModel:
    """One registered model version: its registry number, its artifact and its lineage."""

    name: str
    number: str  # MLflow's version number, "1", "2", ...
    version: str  # the artifact version, the directory name and what serving reports
    path: Path
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def manifest(self) -> ModelManifest:
        """The artifact's manifest (what serving will load)."""
        return load_manifest(self.path)


def default_artifacts() -> Path:
    """The artifact root: COURIER_ARTIFACTS, else ./artifacts."""
    return Path(os.environ.get(ARTIFACTS_ENV, "artifacts"))


def default_uri(artifacts: Path | None = None) -> str:
    """COURIER_REGISTRY, else a SQLite file beside the artifacts."""
    root = Path(artifacts or default_artifacts()).resolve()
    return os.environ.get(REGISTRY_ENV) or f"sqlite:///{root / 'registry.db'}"


class Registry:
    """Register, alias and resolve model versions in an MLflow model registry."""

    def __init__(self, uri: str | None = None, artifacts: Path | str | None = None):
        self.artifacts = Path(artifacts) if artifacts is not None else default_artifacts()
        self.uri = uri or default_uri(self.artifacts)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations are not news
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def register(self, artifact_dir: Path, params: dict[str, Any] | None = None,
                 metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> RegisteredModel:
        """Record an artifact directory (under the artifact root) as a new version of its model.

        `params` and `metrics` go to an MLflow run (the lineage: data window, feature service, code
        version, offline metrics, gate results); `tags` to the model version as well.
        """
        manifest = load_manifest(artifact_dir)
        expected = (self.artifacts / manifest.name / manifest.version).resolve()
        if Path(artifact_dir).resolve() != expected:
            raise RegistryError(f"{artifact_dir} is not {expected}: register artifacts from the artifact root "
                                f"{self.artifacts}")
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        run = self.client.create_run(experiment_id, run_name=manifest.version,
                                     tags={"model": manifest.name, **(tags or {})})
        run_id = run.info.run_id
        for key, value in (params or {}).items():
            self.client.log_param(run_id, key, _short(value))
        for key, value in (metrics or {}).items():
            self.client.log_metric(run_id, key, float(value))
        self.client.set_terminated(run_id)
        try:
            self.client.get_registered_model(manifest.name)
        except MlflowException:  # not registered yet
            self.client.create_registered_model(manifest.name)
        version_tags = {VERSION_TAG: manifest.version, "feature_service": manifest.feature_service, **(tags or {})}
        created = self.client.create_model_version(manifest.name, source=expected.as_uri(), run_id=run_id,
                                                   tags=version_tags)
        return self._described(manifest.name, created)

    def set_alias(self, name: str, alias: str, reference: str) -> RegisteredModel:
        """Point `alias` of `name` at a version (any reference); returns that version."""
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")
        target = self.resolve(name, reference)
        self.client.set_registered_model_alias(name, alias, target.number)
        return self.resolve(name, target.number)

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove an alias (e.g. the challenger after it is promoted or refused); absent is fine."""
        with contextlib.suppress(MlflowException):
            self.client.delete_registered_model_alias(name, alias)

    def resolve(self, name: str, reference: str) -> RegisteredModel:
        """An alias, registry number or artifact version of `name`, as a registered model version."""
        reference = str(reference)
        try:
            if reference in ALIASES:
                found = self.client.get_model_version_by_alias(name, reference)
            elif _NUMBER.match(reference):
                found = self.client.get_model_version(name, reference)
            else:
                matches = self.client.search_model_versions(f"name = '{name}' and tag.`{VERSION_TAG}` = '{reference}'")
                if not matches:
                    raise RegistryError(f"{name} has no registered version {reference!r}")
                found = matches[0]
        except RegistryError:
            raise
        except MlflowException as exc:
            known = ", ".join(f"{v.number} ({v.version})" for v in self.versions(name)) or "none: run `make train`"
            raise RegistryError(f"cannot resolve {name}@{reference} in {self.uri}: {exc.__class__.__name__}. "
                                f"Registered versions: {known}") from exc
        return self._described(name, found)

    def versions(self, name: str) -> list[RegisteredModel]:
        """Every registered version of `name`, oldest first (empty when the model is unknown)."""
        try:
            found = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return []
        return sorted((self._described(name, v) for v in found), key=lambda m: int(m.number))

    def lineage(self, model: RegisteredModel) -> dict[str, Any]:
        """The params and metrics of the run that registered `model`."""
        run_id = self.client.get_model_version(model.name, model.number).run_id
        data = self.client.get_run(run_id).data
        return {"params": dict(data.params), "metrics": dict(data.metrics), "tags": dict(model.tags)}

    def _described(self, name: str, found: Any) -> RegisteredModel:
        full = self.client.get_model_version(name, found.version)
        tags = dict(full.tags or {})
        version = tags.get(VERSION_TAG)
        if not version:
            raise ArtifactError(f"{name} version {found.version} has no {VERSION_TAG} tag: it was not registered by "
                                "Courier")
        return RegisteredModel(name, str(found.version), version, self.artifacts / name / version,
                               tuple(sorted(full.aliases or ())), tags)


def _short(value: Any) -> str:
    """MLflow params hold at most 6,000 characters."""
    text = value if isinstance(value, str) else repr(value)
    return text[:6000]
