"""Change which model versions serve, in place: rollout, shadow, canary, promote and rollback.

    python -m serving.rollout status
    python -m serving.rollout rollout  --model eta --version 3            # or an alias / artifact version
    python -m serving.rollout rollout  --model eta --challenger challenger --shadow 0.5
    python -m serving.rollout rollout  --model eta --challenger challenger --canary 0.2
    python -m serving.rollout promote  --model eta                        # challenger -> champion
    python -m serving.rollout rollback --model eta                        # the slot before the last change

A model's slot (which version serves, the challenger, the shadow and canary shares) is the
`user_config` of every deployment that runs the model (serving/variants.py). A change reads the
running serve config from the Ray dashboard, pins registry aliases to artifact versions, and
PUTs it back to `/api/serve/applications/`: the REST call KubeRay makes for a RayService. Only
`user_config` changes, so Ray Serve reconfigures the running replicas in place (no restart, no
lost request); the change is done when every replica answers with the new version. Each change
is appended to `<artifacts>/rollouts.jsonl`, which `rollback` reads. On Kubernetes the same slots
are chart values (docs/kubernetes.md "Model versions, rollout and rollback on Kubernetes").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serving.variants import MODEL_DEPLOYMENTS, Slot, slot_holders

APP = "courier"
OIP_NAME = {"retrieval": "user_tower"}  # /v2/models/<name>, where it is not the model's own name
HISTORY = "rollouts.jsonl"
DEFAULT_SLOT: dict[str, Any] = Slot().model_dump()  # the slot a deployment without a user_config serves


class RolloutError(RuntimeError):
    """A change that cannot be made, or did not take effect."""


def _application(config: dict[str, Any], app: str = APP) -> dict[str, Any]:
    for application in config.get("applications", []):
        if application.get("name") == app:
            return application
    raise RolloutError(f"no application {app!r} in the serve config")


def _deployment(application: dict[str, Any], name: str) -> dict[str, Any]:
    for deployment in application.setdefault("deployments", []):
        if deployment.get("name") == name:
            return deployment
    raise RolloutError(f"the serve config has no deployment {name!r}: it cannot serve this model")


def _holders(config: dict[str, Any], model: str) -> list[tuple[str, str | None]]:
    """The deployments that run `model` in this config (the built-in models and every extra one)."""
    holders = slot_holders(config)
    if model not in holders:
        raise RolloutError(f"unknown model {model!r}: one of {', '.join(holders)}")
    return holders[model]


def slot_of(config: dict[str, Any], model: str, app: str = APP) -> dict[str, Any]:
    """The model's slot as the serve config states it (the first holder's; all holders agree)."""
    name, key = _holders(config, model)[0]
    user_config = _deployment(_application(config, app), name).get("user_config") or {}
    slot = user_config.get(key) if key else user_config
    return {**DEFAULT_SLOT, **(slot or {})}


def with_slot(config: dict[str, Any], model: str, app: str = APP, **changes: Any) -> dict[str, Any]:
    """A copy of the serve config whose `model` slot has `changes`, in every deployment that runs it."""
    unknown = set(changes) - set(DEFAULT_SLOT)
    if unknown:
        raise RolloutError(f"a slot has no field {sorted(unknown)}: it has {', '.join(DEFAULT_SLOT)}")
    config = copy.deepcopy(config)
    slot = {**slot_of(config, model, app), **changes}
    if model == "retrieval":  # the user tower serves one version: no challenger
        slot = {"version": slot["version"]}
    application = _application(config, app)
    for name, key in _holders(config, model):
        deployment = _deployment(application, name)
        if key:
            deployment["user_config"] = {**(deployment.get("user_config") or {}), key: dict(slot)}
        else:
            deployment["user_config"] = dict(slot)
    return config


def parse_slot_sets(pairs: list[str], models: Collection[str]) -> dict[str, dict[str, Any]]:
    """`model.field=value` pairs (`eta.version=3`, `eta.shadow=0.5`) of the config's `models` as {model: {field: value}}."""
    import yaml

    changes: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        model, dot, field = key.partition(".")
        if not sep or not dot or model not in models or field not in DEFAULT_SLOT:
            raise RolloutError(f"--slot takes model.field=value with model in {sorted(models)} and field in "
                               f"{list(DEFAULT_SLOT)}, got {pair!r}")
        changes.setdefault(model, {})[field] = yaml.safe_load(value)
    return changes


def ray_auth_token() -> str | None:
    """The Ray cluster's auth token, where Ray keeps it (a new local cluster makes one: ~/.ray/auth_token)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


@dataclass
class Dashboard:
    """The Ray dashboard's Serve REST API: what `serve deploy` and KubeRay use (with Ray's token, if any)."""

    url: str = "http://127.0.0.1:8265"
    timeout_s: float = 10.0

    @property
    def headers(self) -> dict[str, str]:
        token = ray_auth_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def details(self) -> dict[str, Any]:
        """The Serve instance details (applications, deployments, replicas, the deployed configs)."""
        try:
            response = httpx.get(f"{self.url}/api/serve/applications/", timeout=self.timeout_s, headers=self.headers)
        except httpx.HTTPError as exc:
            raise RolloutError(f"cannot reach the Ray dashboard at {self.url} ({exc.__class__.__name__}): is "
                               "`make serve` running? (its READY line prints the dashboard URL)") from exc
        if response.status_code in (401, 403):
            raise RolloutError(f"the Ray dashboard at {self.url} wants Ray's auth token ({response.text[:100]}): set "
                               "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the token of the cluster that serves")
        if response.status_code != 200:
            raise RolloutError(f"the Ray dashboard answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def config(self) -> dict[str, Any]:
        """The running serve config (a ServeDeploySchema dict), rebuilt from the instance details."""
        details = self.details()
        applications = [app["deployed_app_config"] for app in details.get("applications", {}).values()
                        if app.get("deployed_app_config")]
        if not applications:
            raise RolloutError(f"nothing is deployed on the Ray cluster behind {self.url}")
        return {"proxy_location": details.get("proxy_location") or "EveryNode",
                "http_options": {k: v for k, v in (details.get("http_options") or {}).items() if v is not None},
                "applications": applications}

    def deploy(self, config: dict[str, Any]) -> None:
        """PUT a whole serve config; Ray Serve applies the difference."""
        response = httpx.put(f"{self.url}/api/serve/applications/", json=config, timeout=60, headers=self.headers)
        if response.status_code != 200:
            raise RolloutError(f"the Ray dashboard refused the config ({response.status_code}): {response.text[:2000]}")

    def wait_running(self, since: float, timeout_s: float, app: str = APP) -> None:
        """Until the app was deployed after `since` and is RUNNING with every deployment HEALTHY."""
        deadline = time.monotonic() + timeout_s
        state = "unknown"
        while time.monotonic() < deadline:
            found = self.details().get("applications", {}).get(app, {})
            deployments = found.get("deployments", {})
            state = f"{found.get('status')}: " + ", ".join(f"{n} {d.get('status')}" for n, d in deployments.items())
            if found.get("status") == "DEPLOY_FAILED":
                raise RolloutError(f"the deployment failed and Ray keeps the previous version: {found.get('message')}")
            unhealthy = {n: d.get("message") for n, d in deployments.items() if d.get("status") == "UNHEALTHY"}
            if unhealthy:
                raise RolloutError(f"a deployment refused the change, the old version keeps serving: {unhealthy}")
            if (found.get("last_deployed_time_s", 0) >= since and found.get("status") == "RUNNING"
                    and all(d.get("status") == "HEALTHY" for d in deployments.values())):
                return
            time.sleep(0.25)
        raise RolloutError(f"the change was not applied after {timeout_s:.0f} s ({state})")


def served_versions(base_url: str, model: str, probes: int = 20) -> set[str]:
    """The versions replicas report for `model` over `probes` metadata calls (spread over replicas)."""
    seen: set[str] = set()
    with httpx.Client(base_url=base_url, timeout=5) as client:
        for _ in range(probes):
            response = client.get(f"/v2/models/{OIP_NAME.get(model, model)}")
            if response.status_code == 200:
                seen.update(response.json().get("versions", [])[:1])
    return seen


def wait_for_version(base_url: str, model: str, version: str, timeout_s: float = 60) -> float:
    """Seconds until every probe of the model answers with `version` (the switch is complete)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if served_versions(base_url, model) == {version}:
            return time.monotonic() - started
        time.sleep(0.2)
    raise RolloutError(f"{model} still answers with {served_versions(base_url, model)} after {timeout_s:.0f} s, "
                       f"not only {version}")


class Rollouts:
    """The rollout history (`<artifacts>/rollouts.jsonl`) and the operations on a running Courier."""

    def __init__(self, dashboard: Dashboard, registry: Any, history: Path, base_url: str | None = None,
                 log: Callable[[str], None] = print):
        self.dashboard, self.registry, self.history, self.base_url, self.log = \
            dashboard, registry, Path(history), base_url, log

    def pin(self, model: str, reference: str | None) -> str | None:
        """An alias, registry number or artifact version as an artifact version (None stays None)."""
        if reference is None:
            return None
        return self.registry.resolve(model, str(reference)).version

    def apply(self, model: str, action: str, timeout_s: float = 120, **changes: Any) -> dict[str, Any]:
        """Change the model's slot in the running config, wait until every replica serves it, record it."""
        config = self.dashboard.config()
        before = slot_of(config, model)
        for field in ("version", "challenger"):
            if field in changes:
                changes[field] = self.pin(model, changes[field])
        updated = with_slot(config, model, **changes)
        after = slot_of(updated, model)
        if after == before:
            self.log(f"{model}: already {after}; nothing to change")
            return after
        if (after["shadow"] or after["canary"]) and not after["challenger"]:
            raise RolloutError(f"{model}: shadow and canary need a challenger (--challenger challenger)")
        started = time.time()
        self.log(f"{model}: {action} {_describe(before)} -> {_describe(after)}")
        self.dashboard.deploy(updated)
        self.dashboard.wait_running(started, timeout_s)
        if self.base_url and after["version"] != before["version"]:
            seconds = wait_for_version(self.base_url, model, after["version"], timeout_s)
            self.log(f"{model}: every replica answers with {after['version']} ({time.time() - started:.1f} s after the "
                     f"change, {seconds:.1f} s after Ray reported it applied)")
        self._record({"time": started, "model": model, "action": action, "before": before, "after": after})
        return after

    def rollout(self, model: str, version: str | None = None, challenger: str | None = None,
                shadow: float | None = None, canary: float | None = None) -> dict[str, Any]:
        """Serve `version` and/or set the challenger and its shares (None: unchanged)."""
        changes = {k: v for k, v in {"version": version, "challenger": challenger, "shadow": shadow,
                                     "canary": canary}.items() if v is not None}
        if not changes:
            raise RolloutError("nothing to change: give --version, --challenger, --shadow or --canary")
        return self.apply(model, "rollout", **changes)

    def promote(self, model: str) -> dict[str, Any]:
        """The challenger becomes the champion (alias and served version); shadow and canary end."""
        slot = slot_of(self.dashboard.config(), model)
        reference = slot["challenger"] or "challenger"
        target = self.registry.resolve(model, reference)
        after = self.apply(model, "promote", version=target.version, challenger=None, shadow=0.0, canary=0.0)
        self.registry.set_alias(model, "champion", target.number)
        self.registry.delete_alias(model, "challenger")
        self.log(f"{model}: champion is now version {target.number} ({target.version})")
        return after

    def rollback(self, model: str) -> dict[str, Any]:
        """Back to the slot before the model's last change (and the champion alias with it)."""
        last = next((r for r in reversed(self._records()) if r["model"] == model and r["action"] != "rollback"), None)
        if last is None:
            raise RolloutError(f"no earlier change of {model} in {self.history}: nothing to roll back to")
        before = last["before"]
        after = self.apply(model, "rollback", **before)
        if last["action"] == "promote":
            self.registry.set_alias(model, "champion", before["version"])
            self.log(f"{model}: champion alias back on {before['version']}")
        self._records_drop(last)
        return after

    def _record(self, entry: dict[str, Any]) -> None:
        self.history.parent.mkdir(parents=True, exist_ok=True)
        with self.history.open("a") as out:
            out.write(json.dumps(entry) + "\n")

    def _records(self) -> list[dict[str, Any]]:
        if not self.history.exists():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line.strip()]

    def _records_drop(self, entry: dict[str, Any]) -> None:
        """Mark a change as undone, so a second rollback goes one further back."""
        records = self._records()
        kept = [r for r in records if r != entry]
        self.history.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _describe(slot: dict[str, Any]) -> str:
    text = slot["version"]
    if slot.get("challenger"):
        text += f" (challenger {slot['challenger']}, shadow {slot['shadow']:g}, canary {slot['canary']:g})"
    return text


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (`make rollout / promote / rollback / rollout-status`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265", help="Ray dashboard URL")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Courier's URL, to check every replica switched")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root (default COURIER_ARTIFACTS or artifacts)")
    parser.add_argument("--registry", default=None, help="MLflow registry URI (default COURIER_REGISTRY or the SQLite file)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="each model's slot as served")
    for name in ("rollout", "promote", "rollback"):
        command = sub.add_parser(name)
        command.add_argument("--model", required=True, help=f"{', '.join(MODEL_DEPLOYMENTS.values())} or an extra model's name")
        if name == "rollout":
            command.add_argument("--version", help="serve this version (alias, registry number or artifact version)")
            command.add_argument("--challenger", help="the version shadow and canary send traffic to")
            command.add_argument("--shadow", type=float, help="share of requests also answered by the challenger")
            command.add_argument("--canary", type=float, help="share of users answered by the challenger")
    args = parser.parse_args(argv)
    from models.registry import Registry, RegistryError, default_artifacts

    artifacts = args.artifacts or default_artifacts()
    dashboard = Dashboard(args.dashboard)
    try:
        if args.command == "status":
            config = dashboard.config()
            for model in slot_holders(config):
                print(f"{model:10s} {_describe(slot_of(config, model))}")
            return 0
        rollouts = Rollouts(dashboard, Registry(args.registry, artifacts), artifacts / HISTORY, args.url)
        if args.command == "rollout":
            rollouts.rollout(args.model, args.version, args.challenger, args.shadow, args.canary)
        elif args.command == "promote":
            rollouts.promote(args.model)
        else:
            rollouts.rollback(args.model)
    except (RolloutError, RegistryError) as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
