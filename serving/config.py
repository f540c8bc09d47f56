"""Reading the one serve config and applying the overrides a run is allowed to make."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from serving.paths import PROJECT_ROOT

SERVE_CONFIG = PROJECT_ROOT / "serving" / "serve_config.yaml"


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
    return ServeDeploySchema.model_validate(config)
