"""Model versions in the rendered chart: the serve config's model slots and the registry's writers.

Which version each deployment serves is its `user_config` in serveConfigV2 (serving/variants.py);
the chart renders those slots from `serving.models`. Ray Serve would refuse a bad slot only at
deploy time, in `reconfigure` on every replica, keeping the old version: these rules refuse it
offline. The same schema as serving/variants.py `Slot` and `check_consistent`, restated here so the
checks run on any copy of the chart (`python -m charts.checks --chart ...`) without importing the app.

The registry: SQLite on the shared volume takes one writer (a second one, on another node or the
same file over NFS, corrupts it or fails on its locks), so a render where more than one workload
gets a `sqlite:` COURIER_REGISTRY and mounts the volume writable is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SLOT_KEYS = ("version", "challenger", "shadow", "canary")
SHARES = ("shadow", "canary")
ALIASES = ("champion", "challenger")
# The deployment that loads each model (serving/variants.py MODEL_DEPLOYMENTS); another deployment's
# slot named after the model (the Ingress's `eta`) must equal that deployment's.
MODEL_DEPLOYMENTS = {"eta": "EtaModel", "ranker": "Ranker", "retrieval": "Retrieval"}
WRITER_KINDS = {"Job", "CronJob", "Deployment", "StatefulSet"}


def model_slots(serve_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"<app>/<deployment>": slot}` for every deployment whose user_config is a model slot, and
    `{"<app>/<deployment>.<model>": slot}` for slots nested under a model name (the Ingress's `eta`)."""
    slots = {}
    for app in serve_config.get("applications") or []:
        for deployment in app.get("deployments") or []:
            config = deployment.get("user_config")
            if not isinstance(config, dict):
                continue
            where = f"{app.get('name', '')}/{deployment['name']}"
            if "version" in config:
                slots[where] = config
            for model, nested in config.items():
                if model in MODEL_DEPLOYMENTS and isinstance(nested, dict):
                    slots[f"{where}.{model}"] = nested
    return slots


def slot_violations(serve_config: dict[str, Any]) -> list[str]:
    """Every reason Ray Serve's reconfigure (serving/variants.py) would refuse a slot, or the two ETA
    slots would disagree; empty when the model versions would deploy."""
    problems = []
    for where, slot in model_slots(serve_config).items():
        unknown = set(slot) - set(SLOT_KEYS)
        if unknown:
            problems.append(f"{where}: unknown user_config key(s) {sorted(unknown)}; a slot has {', '.join(SLOT_KEYS)}")
        if not str(slot.get("version") or "").strip():
            problems.append(f"{where}: no version; name an artifact version, a registry number or an alias")
        for share in SHARES:
            value = slot.get(share, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                problems.append(f"{where}: {share} is {value!r}; a share is a number in [0, 1]")
        challenger = slot.get("challenger")
        active = [s for s in SHARES if isinstance(slot.get(s), (int, float)) and slot.get(s, 0) > 0]
        if active and not challenger:
            problems.append(f"{where}: {' and '.join(active)} > 0 need a challenger: set "
                            f"serving.models.<model>.challenger, or the share(s) to 0")
        if challenger and str(challenger) == str(slot.get("version")):
            problems.append(f"{where}: the challenger is the version itself ({challenger}); a shadow or canary of it "
                            "compares nothing")
    problems += consistency_violations(serve_config)
    return problems


def consistency_violations(serve_config: dict[str, Any]) -> list[str]:
    """A slot nested under a model name (the Ingress's `eta`) must equal the slot of the model's deployment:
    the ETA of /v1/eta and of the feed must be the same versions."""
    slots = model_slots(serve_config)
    problems = []
    for where, slot in slots.items():
        app, _, rest = where.partition("/")
        if "." not in rest:
            continue
        model = rest.rsplit(".", 1)[1]
        source = slots.get(f"{app}/{MODEL_DEPLOYMENTS[model]}")
        if source is None:
            problems.append(f"{where}: names model {model}, but the app has no {MODEL_DEPLOYMENTS[model]} slot")
        elif _normal(slot) != _normal(source):
            problems.append(f"{where} differs from {app}/{MODEL_DEPLOYMENTS[model]} ({slot} != {source}): the ETA of "
                            "/v1/eta and of the feed must be the same versions; set them once, in serving.models")
    return problems


def aliased(serve_config: dict[str, Any]) -> list[str]:
    """Slots that name an alias: each replica resolves it when it starts, so a promotion between two replica
    starts would mix versions. Not an error (the first install has nothing to pin), a warning."""
    return [f"{where} serves {slot['version']!r}" for where, slot in model_slots(serve_config).items()
            if str(slot.get("version")) in ALIASES and "." not in where.partition("/")[2]]


def _normal(slot: dict[str, Any]) -> dict[str, Any]:
    defaults = {"version": "champion", "challenger": None, "shadow": 0.0, "canary": 0.0}
    merged = {**defaults, **slot}
    return {k: (float(v) if k in SHARES and isinstance(v, (int, float)) else (None if v is None else str(v)))
            for k, v in merged.items()}


def _pod_spec(obj: dict) -> dict | None:
    spec = obj.get("spec") or {}
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return (spec.get("template") or {}).get("spec")


def registry_writers(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """`{sqlite URI: [workloads that get it and mount a volume writable]}`."""
    writers: dict[str, list[str]] = {}
    for obj in objects:
        if obj["kind"] not in WRITER_KINDS or not (spec := _pod_spec(obj)):
            continue
        for container in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
            env = {e["name"]: e.get("value") for e in container.get("env") or []}
            uri = env.get("COURIER_REGISTRY") or ""
            writable = any(not m.get("readOnly") and m["name"] not in ("tmp",) for m in container.get("volumeMounts") or [])
            if uri.startswith("sqlite:") and writable:
                writers.setdefault(uri, [])
                name = f"{obj['kind']}/{obj['metadata']['name']}"
                if name not in writers[uri]:
                    writers[uri].append(name)
    return writers


def registry_violations(objects: list[dict[str, Any]]) -> Iterator[str]:
    """A SQLite registry written by more than one workload."""
    for uri, names in registry_writers(objects).items():
        if len(names) > 1:
            yield (f"the SQLite registry {uri} has {len(names)} writers ({', '.join(names)}): SQLite on a shared volume "
                   "takes one; set registry.postgresql.enabled=true or registry.uri")
