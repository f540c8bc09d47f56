"""Reading the one serve config and applying the overrides a run is allowed to make."""

from __future__ import annotations

import copy
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from serving.paths import PROJECT_ROOT

if TYPE_CHECKING:  # importing Ray reads its environment: serving.launch sets ray_env.yaml first
    from ray.serve.schema import ServeDeploySchema

SERVE_CONFIG = PROJECT_ROOT / "serving" / "serve_config.yaml"
RAY_ENV = PROJECT_ROOT / "serving" / "ray_env.yaml"


def load_ray_env(path: Path = RAY_ENV, root: Path | str = PROJECT_ROOT) -> dict[str, str]:
    """Courier's Ray process settings (serving/ray_env.yaml) as environment variables.

    A relative `*_PATH` value is one of Courier's own files: it is resolved against `root` (the project
    root locally, /app in the images; the chart does the same).
    """
    settings = yaml.safe_load(Path(path).read_text()) or {}
    bad = [key for key, value in settings.items() if not isinstance(value, str)]
    if bad:
        raise ValueError(f"{path}: quote the values of {bad} (environment variables are strings)")
    return {key: f"{str(root).rstrip('/')}/{value}" if key.endswith("_PATH") and not value.startswith("/") else value
            for key, value in settings.items()}


def apply_ray_env(environ: MutableMapping[str, str] = os.environ, path: Path = RAY_ENV) -> dict[str, str]:
    """Set each Ray setting the environment does not set yet (an explicit value wins); returns the effective ones.

    Call it before Ray is imported: Ray reads these when its modules load and its processes start.
    """
    return {key: environ.setdefault(key, value) for key, value in load_ray_env(path).items()}


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The serve config as a plain dict, exactly as written."""
    return yaml.safe_load(Path(path).read_text())


def with_overrides(config: dict[str, Any], port: int | None = None, host: str | None = None,
                   args: dict[str, Any] | None = None, app: str = "courier") -> dict[str, Any]:
    """A copy with the HTTP port/host and application args replaced; nothing else changes."""
    config = copy.deepcopy(config)
    if port is not None:
        config["http_options"]["port"] = port
    if host is not None:
        config["http_options"]["host"] = host
    if args:
        application = next((a for a in config["applications"] if a["name"] == app), None)
        if application is None:
            raise KeyError(f"no application {app!r} in the serve config")
        application.setdefault("args", {}).update(args)
    return config


def validate(config: dict[str, Any]) -> ServeDeploySchema:
    """Ray Serve's own schema check (what KubeRay's serveConfigV2 must also pass)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(config)
