"""Which model versions a deployment serves, and which requests each version answers.

Every model deployment (EtaModel, Ranker, Retrieval) reads its versions from its own Ray Serve
`user_config`, so changing a version is an in-place `reconfigure`, never a redeploy. One schema:

    user_config:            # EtaModel, Ranker (Retrieval: only `version`)
      version: champion     # an artifact version, registry number or alias; the deployer pins aliases
      challenger: null      # a second version for shadow or canary
      shadow: 0.0           # share of requests ALSO answered by the challenger: logged, never returned
      canary: 0.0           # share of users (sticky by user id) answered by the challenger

An extra model (a team's own, served by serving/generic.py, listed in the app's `extra_models`) is
its own deployment, named after the model, with the same slot as its user_config; `slot_holders(config)`
says which deployments hold which model's slot, for serving.rollout.

The Ingress answers /v1/eta in-process: its `user_config` is `{eta: <the EtaModel slot>}`, and
`check_consistent` refuses a config where the two differ (the ETA of /v1/eta and of the feed must
be the same versions). The deployer pins aliases with `pin` before deploying; a replica given an
alias or a registry number resolves it once through the registry and logs a warning, because two
replicas resolving `champion` at different times may serve different versions.

Assignment is a stable hash (blake2b), not Python's `hash` (salted per process): a canary user
gets the challenger on every replica and after every restart; the canary salt includes the
challenger version, so a new challenger draws a new sample of users. A larger canary share keeps
the users of a smaller one.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.artifact import MANIFEST
from serving.errors import NotFound
from serving.paths import resolve

logger = logging.getLogger("ray.serve")
CHAMPION, CHALLENGER, SHADOW = "champion", "challenger", "shadow"
ALIASES = (CHAMPION, CHALLENGER)  # the registry's (models/registry.py), without importing MLflow
MODEL_DEPLOYMENTS = {"EtaModel": "eta", "Ranker": "ranker", "Retrieval": "retrieval"}
INGRESS = "Ingress"
APP_IMPORT_PATH = "serving.app:build_app"
_NUMBER = re.compile(r"^\d+$")
# Models served by serving/generic.py: the app arg listing them, and the names they may take (a model
# name is its deployment's name, its artifact folder and its /v2/models/<name> route).
EXTRA_MODELS = "extra_models"
EXTRA_MODEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
RESERVED_NAMES = frozenset({*MODEL_DEPLOYMENTS, *MODEL_DEPLOYMENTS.values(), INGRESS, "user_tower", "OnnxModel"})
T = TypeVar("T")


class VariantError(ValueError):
    """A slot that cannot be served: malformed, an unknown version, or a mismatched feature service."""


class Slot(BaseModel):
    """The versions one model deployment serves and how traffic is split between them."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(CHAMPION, min_length=1, description="Artifact version, registry number or alias.")
    challenger: str | None = Field(None, min_length=1, description="A second version for shadow or canary.")
    shadow: float = Field(0.0, ge=0, le=1, description="Share of requests also answered by the challenger.")
    canary: float = Field(0.0, ge=0, le=1, description="Share of users answered by the challenger.")

    @field_validator("version", "challenger", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        """YAML reads `version: 3` as an int: a registry number is still a reference."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _needs_a_challenger(self) -> Slot:
        if (self.shadow > 0 or self.canary > 0) and self.challenger is None:
            raise ValueError(f"shadow ({self.shadow}) and canary ({self.canary}) need a challenger: "
                             "set `challenger` to a version, or both shares to 0")
        return self


class RetrievalSlot(Slot):
    """Retrieval serves one version: its embeddings index the whole catalogue, there is nothing to split.

    The other fields are accepted (one slot shape for every model) but must stay empty."""

    @model_validator(mode="after")
    def _one_version(self) -> RetrievalSlot:
        if self.challenger is not None or self.shadow > 0 or self.canary > 0:
            raise ValueError("retrieval serves one version: no challenger, shadow or canary (roll it out with "
                             "`version`)")
        return self


def parse_slot(model: str, user_config: dict[str, Any] | None) -> Slot:
    """The slot of `model` from a deployment's user_config (None: the champion alone).

    Retrieval's slot may only name `version` (returned as a plain Slot)."""
    schema = RetrievalSlot if model == "retrieval" else Slot
    try:
        parsed = schema.model_validate(user_config or {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'user_config'}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise VariantError(f"{model} user_config {user_config!r} is not a valid slot: {problems}") from None
    return Slot.model_validate(parsed.model_dump())


# --- the serve config (what the deployer, the chart and the tests check) ----------------------------

def _courier_apps(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [app for app in config.get("applications", []) if app.get("import_path") == APP_IMPORT_PATH]


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((d for d in app.get("deployments", []) if d.get("name") == name), None)


def _user_config(deployment: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if deployment is None else deployment.get("user_config")


def slots(config: dict[str, Any]) -> dict[str, Slot]:
    """{model: Slot} of Courier's application in a serve config (ServeDeploySchema dict), checked consistent.

    A model deployment without user_config serves the champion alone."""
    check_consistent(config)
    apps = _courier_apps(config)
    if not apps:
        raise VariantError(f"no application with import_path {APP_IMPORT_PATH} in the serve config")
    app = apps[0]
    return {model: parse_slot(model, _user_config(_deployment(app, name)))
            for name, model in model_deployments(app).items()}


def check_consistent(config: dict[str, Any]) -> None:
    """Refuse a serve config whose Ingress eta slot differs from EtaModel's, with an invalid slot, or with an
    extra model (serving/generic.py) that has a bad or taken name.

    The Ingress answers /v1/eta in-process and EtaModel answers the feed's ETAs: the two must be
    the same versions, split the same way, or /v1/eta and the feed disagree about the same order."""
    for app in _courier_apps(config):
        for name, model in model_deployments(app).items():
            parse_slot(model, _user_config(_deployment(app, name)))
        ingress = _user_config(_deployment(app, INGRESS)) or {}
        unknown = set(ingress) - {"eta"}
        if unknown:
            raise VariantError(f"Ingress user_config takes only `eta` (the /v1/eta slot), not {sorted(unknown)}")
        ingress_eta = parse_slot("eta", ingress.get("eta"))
        model_eta = parse_slot("eta", _user_config(_deployment(app, "EtaModel")))
        if ingress_eta != model_eta:
            raise VariantError(
                "the ETA of /v1/eta and of the feed must be the same versions: Ingress user_config.eta "
                f"{ingress_eta.model_dump()} differs from EtaModel user_config {model_eta.model_dump()}; "
                "set both from one value (the chart does)")


def check_extra_model_name(name: Any) -> str:
    """An extra model's name, or VariantError saying what a name must be (it names a deployment, an artifact
    folder and a route, so it may not take a built-in model's or deployment's)."""
    if not isinstance(name, str) or not EXTRA_MODEL_NAME.match(name):
        raise VariantError(f"extra model name {name!r}: use lower-case letters, digits and _ (starting with a letter): "
                           "it is the deployment's name, the artifact folder and /v2/models/<name>")
    if name in RESERVED_NAMES:
        raise VariantError(f"extra model name {name!r} is taken by Courier's own models and deployments "
                           f"({', '.join(sorted(RESERVED_NAMES))}): pick another")
    return name


def extra_models(app: dict[str, Any]) -> list[str]:
    """The names of the extra models an application's args list (serving/generic.py), checked."""
    listed = (app.get("args") or {}).get(EXTRA_MODELS) or []
    names = [check_extra_model_name(entry.get("name") if isinstance(entry, dict) else entry) for entry in listed]
    if len(set(names)) != len(names):
        raise VariantError(f"{EXTRA_MODELS} lists a model twice: {names}")
    return names


def model_deployments(app: dict[str, Any]) -> dict[str, str]:
    """{deployment name: model} of an application: the built-in models and each extra model (whose
    deployment is named after it)."""
    return {**MODEL_DEPLOYMENTS, **{name: name for name in extra_models(app)}}


def slot_holders(config: dict[str, Any]) -> dict[str, list[tuple[str, str | None]]]:
    """Which deployments run each model of Courier's application, and where the model's slot sits in their
    user_config (None: the whole of it); what serving.rollout changes for a model. The built-in models
    plus every extra model the config lists; the Ingress holds the eta slot under `eta`."""
    apps = _courier_apps(config)
    if not apps:
        raise VariantError(f"no application with import_path {APP_IMPORT_PATH} in the serve config")
    holders: dict[str, list[tuple[str, str | None]]] = {"eta": [(INGRESS, "eta"), ("EtaModel", None)]}
    for name, model in model_deployments(apps[0]).items():
        if model != "eta":
            holders[model] = [(name, None)]
    return holders


def is_pinned(reference: str | None) -> bool:
    """True for an artifact version (a directory name); False for an alias or registry number."""
    return reference is None or not (reference in ALIASES or _NUMBER.match(reference))


def pin(config: dict[str, Any], registry: Any) -> dict[str, Any]:
    """A copy of the serve config with every alias and registry number replaced by its artifact version.

    `registry`: a models.registry.Registry (anything with `resolve(name, ref).version`). Model
    deployments without a user_config get one naming the pinned champion, and the Ingress gets the
    EtaModel slot, so no replica resolves an alias on its own; an extra model without a deployment entry
    gets one. Raises VariantError when the config
    is inconsistent and the registry's error when a reference cannot be resolved."""
    check_consistent(config)
    pinned = copy.deepcopy(config)
    for app in _courier_apps(pinned):
        extras = extra_models(app)
        for name, model in model_deployments(app).items():
            deployment = _deployment(app, name)
            if deployment is None and model in extras:  # an extra model's slot must be in the config to be pinned
                deployment = {"name": name}
                app.setdefault("deployments", []).append(deployment)
            if deployment is None:
                continue
            slot = parse_slot(model, deployment.get("user_config"))
            fixed = {"version": _pinned(registry, model, slot.version)}
            if model != "retrieval":
                fixed.update(challenger=slot.challenger and _pinned(registry, model, slot.challenger),
                             shadow=slot.shadow, canary=slot.canary)
            deployment["user_config"] = fixed
        eta = _deployment(app, "EtaModel")
        ingress = _deployment(app, INGRESS)
        if ingress is not None:
            if eta is not None:
                ingress["user_config"] = {"eta": dict(eta["user_config"])}
            else:
                slot = parse_slot("eta", (ingress.get("user_config") or {}).get("eta"))
                ingress["user_config"] = {"eta": {**slot.model_dump(), "version": _pinned(registry, "eta", slot.version),
                                                  "challenger": slot.challenger and
                                                  _pinned(registry, "eta", slot.challenger)}}
    check_consistent(pinned)
    return pinned


def _pinned(registry: Any, model: str, reference: str) -> str:
    if is_pinned(reference):
        return reference
    return registry.resolve(model, reference).version


# --- assignment ---------------------------------------------------------------------------------

def _unit(text: str) -> float:
    """A stable draw in [0, 1) from a string: the same on every replica, process and machine."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_canary(user_key: int | str, share: float, salt: str) -> bool:
    """True when this user (or request, for /v1/eta without a user_id) is in the canary's share.

    Sticky: the same key, share and salt always give the same answer; raising the share keeps
    everyone already in."""
    return share > 0 and _unit(f"canary:{salt}:{user_key}") < share


def in_shadow(request_id: str, share: float) -> bool:
    """True when this request is also answered by the challenger (by request: a share of traffic)."""
    return share > 0 and _unit(f"shadow:{request_id}") < share


# --- locating versions ----------------------------------------------------------------------------

_registries: dict[tuple[str | None, str], Any] = {}
_registries_lock = threading.Lock()


def locate(model: str, reference: str, artifacts: str | Path, registry: str | None = None) -> Path:
    """The artifact directory of `model` at `reference` (artifact version, registry number or alias).

    An artifact version present under `<artifacts>/<model>/<version>` needs no registry. An alias or
    number goes through the registry once (with a warning: the deployer should have pinned it)."""
    root = resolve(artifacts)
    candidate = root / model / reference
    if is_pinned(reference):
        if reference == "current":
            raise VariantError(f"`current` is gone: name an artifact version of {model} "
                               f"(one of {known_versions(root, model)}), a registry number or an alias")
        if (candidate / MANIFEST).exists():
            return candidate
        raise VariantError(f"{model} has no version {reference!r} under {root / model} (versions there: "
                           f"{known_versions(root, model) or 'none, run `make train`'}); name an artifact version, "
                           "a registry number or an alias")
    logger.warning("%s@%s resolved by this replica through the registry: pin versions before deploying "
                   "(serving.variants.pin) so every replica serves the same one", model, reference)
    try:
        return _registry(registry, root).resolve(model, reference).path
    except LookupError as exc:
        raise VariantError(str(exc)) from exc


def known_versions(root: Path, model: str) -> list[str]:
    """The artifact versions present on disk for `model` (directories with a manifest)."""
    folder = Path(root) / model
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != "current" and (p / MANIFEST).exists())


def _registry(uri: str | None, root: Path) -> Any:
    with _registries_lock:
        key = (uri, str(root))
        if key not in _registries:
            from models.registry import Registry  # MLflow only where an alias must be resolved

            _registries[key] = Registry(uri=uri, artifacts=root)
        return _registries[key]


# --- what a replica serves ------------------------------------------------------------------------

@dataclass(frozen=True)
class Served(Generic[T]):
    """The loaded versions of one slot; a replica swaps the whole object, never a part of it."""

    model: str
    slot: Slot
    champion: T
    champion_version: str
    challenger: T | None = None
    challenger_version: str | None = None

    def choose(self, user_key: int | str) -> tuple[str, T]:
        """(variant, pipeline) answering this user (or request id) as the primary answer."""
        if self.challenger is not None and in_canary(user_key, self.slot.canary, f"{self.model}:{self.challenger_version}"):
            return CHALLENGER, self.challenger
        return CHAMPION, self.champion

    def shadows(self, variant: str, request_id: str) -> bool:
        """Should the challenger also answer this request (never when it already did)?"""
        return self.challenger is not None and variant == CHAMPION and in_shadow(request_id, self.slot.shadow)

    def version_of(self, variant: str) -> str:
        """The version behind a variant name."""
        return self.champion_version if variant == CHAMPION else str(self.challenger_version)

    @property
    def versions(self) -> list[str]:
        """The served versions, champion first."""
        return [self.champion_version, *([self.challenger_version] if self.challenger_version else [])]


class Variants(Generic[T]):
    """A replica's versions of one model: `configure` loads a slot fully, then swaps one reference.

    `load(path)` builds a pipeline from an artifact directory; `describe(pipeline)` gives its
    (version, feature service). The first slot fixes the deployment's feature service: a model on
    another service needs features this deployment does not read, so it is refused (redeploy)."""

    def __init__(self, model: str, load: Callable[[Path], T], describe: Callable[[T], tuple[str, str]],
                 artifacts: str | Path = "artifacts", registry: str | None = None, metrics: Any = None):
        self.model, self.load, self.describe = model, load, describe
        self.artifacts, self.registry, self.metrics = artifacts, registry, metrics
        self.feature_service: str | None = None
        self._served: Served[T] | None = None
        self._lock = threading.Lock()

    @property
    def served(self) -> Served[T]:
        """What answers now; without a user_config, the champion (resolved once, on first use)."""
        served = self._served
        if served is None:
            with self._lock:
                if self._served is None:
                    self.configure(None)
                served = self._served
        return served  # type: ignore[return-value]

    def configure(self, user_config: dict[str, Any] | None) -> Served[T]:
        """Load the slot's versions (reusing loaded ones), check them, and swap them in at once.

        Raises VariantError (and changes nothing) for a bad slot, an unknown version or a model
        on another feature service: Ray then keeps this replica's old versions."""
        slot = parse_slot(self.model, user_config)
        old = self._served
        champion, champion_version = self._pipeline(slot.version, old)
        challenger = challenger_version = None
        if slot.challenger is not None:
            challenger, challenger_version = self._pipeline(slot.challenger, old)
        services = {self.describe(p)[1] for p in (champion, challenger) if p is not None}
        expected = self.feature_service or self.describe(champion)[1]
        if services != {expected}:
            raise VariantError(f"{self.model}: versions {slot.version}/{slot.challenger} read feature services "
                               f"{sorted(services)}, this deployment serves {expected!r}: a model on another "
                               "feature service needs a new deployment (apply its features, then redeploy)")
        new = Served(self.model, slot, champion, champion_version, challenger, challenger_version)
        self._served, self.feature_service = new, expected  # the swap: one reference
        self._report(old, new)
        logger.info("%s now serves %s (challenger %s, shadow %.2f, canary %.2f)", self.model, champion_version,
                    challenger_version, slot.shadow, slot.canary)
        return new

    def _pipeline(self, reference: str, old: Served[T] | None) -> tuple[T, str]:
        path = locate(self.model, reference, self.artifacts, self.registry)
        version = path.resolve().name
        if old is not None:  # a version already loaded (e.g. the challenger being promoted) is reused
            for pipeline, loaded in ((old.champion, old.champion_version), (old.challenger, old.challenger_version)):
                if pipeline is not None and loaded == version:
                    return pipeline, version
        pipeline = self.load(path)
        return pipeline, self.describe(pipeline)[0]

    def _report(self, old: Served[T] | None, new: Served[T]) -> None:
        if self.metrics is None:
            return
        now = {(new.champion_version, CHAMPION), *([(new.challenger_version, CHALLENGER)] if new.challenger else [])}
        before = set()
        if old is not None:
            before = {(old.champion_version, CHAMPION), *([(old.challenger_version, CHALLENGER)] if old.challenger else [])}
        for version, slot in before - now:
            self.metrics.model_loaded_slot(self.model, str(version), slot, 0)
        for version, slot in now:
            self.metrics.model_loaded_slot(self.model, str(version), slot, 1)


def describe(pipeline: Any) -> tuple[str, str]:
    """(version, feature service) of a loaded pipeline (anything holding an OnnxModel in `.model`)."""
    return pipeline.model.version, pipeline.model.manifest.feature_service


def served_metadata(served: Served[Any]) -> dict[str, Any]:
    """Open Inference Protocol metadata of the champion, with `versions` = every served version."""
    return {**served.champion.metadata(), "versions": served.versions}


class ShadowTasks:
    """Runs challenger calls after the caller has its answer: tasks on the replica's loop, never awaited.

    A failure is counted (`courier_shadow_failures_total`) and logged, never raised to anyone."""

    def __init__(self, metrics: Any = None):
        self.metrics = metrics
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        self.failures = 0

    def start(self, model: str, version: str, work: Callable[[], Awaitable[Any]]) -> None:
        """Schedule `work()`; it starts once the current request has handed back its response.

        `work()` may return the version that answered (counted under it); `version` is the fallback label."""
        task = asyncio.get_running_loop().create_task(self._run(model, version, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, model: str, version: str, work: Callable[[], Awaitable[Any]]) -> None:
        await asyncio.sleep(0)  # let the request's own coroutine finish and send its answer first
        try:
            version = await work() or version  # the version that answered, when the work knows it
        except Exception:  # a shadow must never reach the caller
            self.failures += 1
            if self.metrics is not None:
                self.metrics.shadow_failures.inc(tags={"model": model, "version": version})
            logger.warning("shadow %s@%s failed", model, version, exc_info=True)
            return
        if self.metrics is not None:
            self.metrics.shadow_answers.inc(tags={"model": model, "version": version})

    async def drain(self) -> None:
        """Wait for running shadow work (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class VersionedDeployment:
    """What every versioned model deployment shares: its slot as `user_config`, and the Open Inference
    Protocol side, where the champion answers raw inference. Subclasses set `self.variants`."""

    variants: Variants[Any]

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve the slot's versions: loaded off the event loop, then swapped in at once (raises on a bad slot)."""
        import asyncio

        await asyncio.to_thread(self.variants.configure, user_config)

    def infer(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Open Inference Protocol inference by the champion."""
        return self.variants.served.champion.infer(tensors)

    def infer_versioned(self, tensors: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(outputs, version) by the champion, so the response names the version that answered."""
        served = self.variants.served
        return served.champion.infer(tensors), served.champion_version

    def metadata(self) -> dict[str, Any]:
        """Open Inference Protocol metadata of the champion; `versions` lists every served version."""
        return served_metadata(self.variants.served)

    def infer_pinned(self, tensors: dict[str, Any], version: str) -> dict[str, Any]:
        """`/v2/models/{m}/versions/{v}/infer`: outputs of that served version, with its `variant`."""
        variant, pipeline = self._pinned(version)
        return {"outputs": pipeline.infer(tensors), "model_version": version, "variant": variant}

    def version_metadata(self, version: str) -> dict[str, Any]:
        """`GET /v2/models/{m}/versions/{v}`: that served version's own metadata."""
        return self._pinned(version)[1].metadata()

    def _pinned(self, version: str) -> tuple[str, Any]:
        served = self.variants.served
        for variant, pipeline in ((CHAMPION, served.champion), (CHALLENGER, served.challenger)):
            if pipeline is not None and served.version_of(variant) == version:
                return variant, pipeline
        raise NotFound(f"{served.model} version {version!r} is not served; served versions: {served.versions}",
                       field="model_version", rule=f"one of {served.versions}")

    def input_specs(self) -> list[dict[str, Any]]:
        """The champion's input specs (names, datatypes, shapes, ranges)."""
        return self.variants.served.champion.input_specs()

    def check_health(self) -> None:
        """Ray restarts the replica if a served session stops answering."""
        served = self.variants.served
        for pipeline in (served.champion, served.challenger):
            if pipeline is not None:
                pipeline.check_health()
