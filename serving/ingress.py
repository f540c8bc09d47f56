"""The HTTP ingress: routing, body limits, validation and the Open Inference Protocol v2.

A plain Starlette request handler rather than FastAPI: the routes are few and fixed,
and every request pays for a framework's routing and serialization layers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

import orjson
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from serving import readiness
from serving.admission import Admission, Overloaded, admitted, retry_after
from serving.auth import Authenticator
from serving.blending import SponsoredPolicy
from serving.errors import CourierError, MethodNotAllowed, NotFound, PayloadTooLarge, internal_error
from serving.feed import FeedComposer
from serving.metrics import ServingMetrics
from serving.oip import EXTENSIONS, infer_response, parse_infer
from serving.openapi import openapi_document
from serving.prediction_log import PredictionLog, PredictionLogArgs, request_id
from serving.schemas import (
    EtaRequest,
    FeedRequest,
    parse_eta_request,
    parse_feed_request,
)
from serving.variants import SHADOW, ShadowTasks, VariantError, Variants, describe, parse_slot

logger = logging.getLogger("ray.serve")
ROUTES = {
    "/v1/eta": "POST",
    "/v1/feed": "POST",
    "/v2/health/live": "GET",
    "/v2/health/ready": "GET",
    "/v2": "GET",
    "/openapi.json": "GET",
    "/v2/repository/index": "POST",
    "/": "GET",
}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson-encoded response; numpy arrays are serialized natively."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


@serve.deployment(name="Ingress")
class Ingress:
    """Routes requests to the model deployments; owns every 4xx decision."""

    def __init__(self, models: dict[str, DeploymentHandle], max_body_bytes: int = 65536,
                 feed: dict[str, Any] | None = None, local_eta: dict[str, Any] | None = None,
                 prediction_log: dict[str, Any] | None = None, extra_models: list[str] | None = None,
                 auth: dict[str, Any] | None = None, admission: dict[str, Any] | None = None):
        """`models` maps Open Inference Protocol names to deployments ("eta", and with the feed
        "ranker" and "user_tower", plus each extra model); `feed` holds the feed's candidate count and
        sponsored policy; `local_eta` (EtaPipeline arguments) makes this replica answer /v1/eta itself;
        `prediction_log` (PredictionLogArgs) logs every answered /v1/eta and /v1/feed (and extra models'
        answers); `extra_models` names the models served by serving/generic.py (variants on /v2 infer);
        `admission` (serving.admission.AdmissionArgs) bounds the work and the queue of this replica."""
        self.models = models
        self.extra_models = frozenset(extra_models or ())
        self.max_body_bytes = max_body_bytes
        self.specs: dict[str, list[dict[str, Any]]] = {}  # input specs, fetched once per model version
        self.spec_versions: dict[str, str] = {}
        self.metrics = ServingMetrics()
        self.admission = Admission(admission, self.metrics)  # per-replica limits (AdmissionArgs)
        self.log = None
        if prediction_log is not None:
            self.log = PredictionLog(PredictionLogArgs.model_validate(prediction_log), self.metrics)
        self.shadows = ShadowTasks(self.metrics)
        self.auth = Authenticator.from_config(auth)  # `args.auth` (serving/auth.py); off when None
        self.eta: Variants | None = None  # /v1/eta's versions when this replica answers it (user_config.eta)
        if local_eta is not None:
            local = dict(local_eta)
            where = {"artifacts": local.pop("artifacts", "artifacts"), "registry": local.pop("registry", None)}
            self._eta_pipeline_args = local
            self._eta_store = None
            self.eta = Variants("eta", self._load_eta, describe, metrics=self.metrics, **where)
        self.feed = None
        if feed is not None:
            self.feed = FeedComposer(models["user_tower"], models["ranker"], models["eta"],
                                     SponsoredPolicy.model_validate(feed["sponsored"]), feed["candidates"],
                                     self.metrics)

    def _load_eta(self, path: Any) -> Any:
        from feature_repo.store import open_store
        from serving.eta import EtaPipeline  # the same code the EtaModel deployment runs
        from serving.paths import resolve

        args = self._eta_pipeline_args
        if self._eta_store is None:  # one Feast store for every version this replica loads
            self._eta_store = open_store(args.get("online_store", "sqlite"),
                                         data_dir=resolve(args["data_dir"]) if args.get("data_dir") else None,
                                         redis=args.get("redis"), project=args.get("feast_project"))
        return EtaPipeline(str(path), metrics=self.metrics, store=self._eta_store, **args)

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """`{eta: slot}`: the versions answering /v1/eta here, the same slot as EtaModel's (serving/variants.py).

        Loads off the event loop, then swaps at once; raises (Ray keeps the old versions) on a bad slot."""
        user_config = user_config or {}
        unknown = set(user_config) - {"eta"}
        if unknown:
            raise VariantError(f"Ingress user_config takes only `eta` (the /v1/eta slot), not {sorted(unknown)}")
        if self.eta is None:
            parse_slot("eta", user_config.get("eta"))  # checked even when EtaModel answers /v1/eta
            return
        await asyncio.to_thread(self.eta.configure, user_config.get("eta"))

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        endpoint = self._endpoint(path)
        try:
            # 401/403/429 before admission: a caller without a valid key never takes a slot or a queue place.
            self.auth.check(path, request.headers.get("authorization"))
            if admitted(path):  # only computing routes take a slot (serving/admission.py): probes never wait
                async with self.admission.slot(endpoint):
                    return await self._route(request, path)
            return await self._route(request, path)
        except Overloaded as exc:  # refused at once, never queued behind the replica's work
            return exc.response()
        except CourierError as exc:
            self.metrics.rejected.inc(tags={"endpoint": endpoint, "status": str(exc.status)})
            # Auth's refusals carry headers (WWW-Authenticate, Retry-After).
            return json_response(exc.body(), exc.status, getattr(exc, "headers", None))
        except (BackPressureError, DeploymentUnavailableError, RayActorError, ActorUnavailableError) as exc:
            # Full queues, or a model replica that died under this request: every route is a pure
            # read, so the client's retry (to a live replica) is safe.
            self.metrics.rejected.inc(tags={"endpoint": endpoint, "status": "503"})
            return json_response({"error": f"overloaded or restarting, retry with backoff: {exc.__class__.__name__}"},
                                 503, retry_after(self.admission.args.retry_after_s))
        except Exception as exc:  # noqa: BLE001 (a server fault, never the input's: a 500 with the request id, logged)
            self.metrics.rejected.inc(tags={"endpoint": endpoint, "status": "500"})
            return json_response(internal_error(exc, request.method, path), 500)

    def _endpoint(self, path: str) -> str:
        """The metrics label of a path: a route or a served model, else `other` (a scanner's random paths
        must not each become a time series)."""
        if path.startswith("/v2/models/"):
            name = path.split("/")[3]
            return name if name in self.models else "other"
        return path if path in ROUTES else "other"

    async def _route(self, request: Request, path: str) -> Response:
        method = request.method
        if path.startswith("/v2/models/"):
            return await self._v2_model_route(request, path)
        if path not in ROUTES:
            raise NotFound(f"no route {path}; see GET / for the endpoints")
        if method != ROUTES[path]:
            raise MethodNotAllowed(f"{path} takes {ROUTES[path]}, not {method}")
        if path == "/v1/eta":
            return await self._eta(request)
        if path == "/v1/feed":
            return await self._feed(request)
        if path == "/v2/health/live":
            return json_response({"live": True})
        if path == "/v2/health/ready":
            ready = await self._all_ready()
            return json_response({"ready": ready}, 200 if ready else 503)
        if path == "/openapi.json":
            return json_response(openapi_document(feed=self.feed is not None, models=tuple(self.models)))
        if path == "/v2":
            return json_response({"name": "courier", "version": "0.1.0", "extensions": EXTENSIONS})
        if path == "/v2/repository/index":
            return json_response(await self._repository_index())
        return json_response({"service": "courier", "endpoints": [
            "POST /v1/eta", *(["POST /v1/feed"] if self.feed else []), "GET /v2/health/live", "GET /v2/health/ready",
            *[f"GET /v2/models/{m}" for m in self.models], *[f"POST /v2/models/{m}/infer" for m in self.models],
            "GET /v2/models/{name}/versions/{version}[/ready]", "POST /v2/models/{name}/versions/{version}/infer",
            "POST /v2/repository/index", "GET /openapi.json"]})

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {self.max_body_bytes} bytes",
                                  field="body", rule=f"at most {self.max_body_bytes} bytes")
        body = await request.body()
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge(f"body of {len(body)} bytes is over the limit of {self.max_body_bytes} bytes",
                                  field="body", rule=f"at most {self.max_body_bytes} bytes")
        return body

    async def _eta(self, request: Request) -> Response:
        timings: dict[str, float] = {}
        logged = self.log is not None
        with self.metrics.stage("eta", "total", timings):
            with self.metrics.stage("eta", "parse", timings):
                rid = request_id(request.headers.get("x-request-id"))
                eta_request = parse_eta_request(await self._body(request))
            if self.eta is not None:
                served = self.eta.served
                variant, pipeline = served.choose(eta_request.user_id or rid)
                answer = await pipeline.predict_async(eta_request, include_inputs=logged)
                self.metrics.answered("eta", answer["model_version"], variant)
                if served.shadows(variant, rid):
                    challenger = served.challenger
                    self.shadows.start("eta", str(served.challenger_version), lambda: self._shadow_eta(
                        rid, eta_request, challenger.predict_async(eta_request, include_inputs=True)))
            else:
                answer = await self.models["eta"].eta.remote(eta_request, logged, rid)
                variant = answer.pop("variant")
                if answer.pop("shadow"):
                    model = self.models["eta"]
                    self.shadows.start("eta", "unknown", lambda: self._shadow_eta(
                        rid, eta_request, model.shadow_eta.remote(eta_request)))
        inputs = answer.pop("model_inputs", None)
        if logged:
            self.log.append("eta", _eta_record(rid, eta_request, answer, inputs, variant))
        return json_response({"request_id": rid, **answer, "variant": variant})

    async def _shadow_eta(self, rid: str, request: EtaRequest, answering: Awaitable[dict[str, Any]]) -> str:
        """The challenger's answer to a /v1/eta request, logged as a `shadow` record (never returned)."""
        answer = await answering
        if self.log is not None:
            self.log.append("eta", _eta_record(rid, request, answer, answer.get("model_inputs"), SHADOW))
        return answer["model_version"]

    async def _feed(self, request: Request) -> Response:
        if self.feed is None:
            raise NotFound("the feed is not deployed in this application (no retrieval/ranker models configured)")
        with self.metrics.stage("feed", "parse"):
            rid = request_id(request.headers.get("x-request-id"))
            feed_request = parse_feed_request(await self._body(request))
        body, shadow = await self.feed.page(feed_request, rid)
        if self.log is not None:
            self.log.append("feed", _feed_record(rid, feed_request, body))
        if shadow and body["cards"]:
            shown = [card["restaurant_id"] for card in body["cards"]]
            self.shadows.start("ranker", "unknown", lambda: self._shadow_feed(rid, feed_request, shown))
        return json_response({"request_id": rid, **body})

    async def _shadow_feed(self, rid: str, request: FeedRequest, shown: list[int]) -> str:
        """The ranker challenger's p_order of the shown cards, logged as a `shadow` record (never returned)."""
        scored = await self.feed.shadow_scores(request, shown)
        if self.log is not None:
            self.log.append("feed", {"request_id": rid, "ts": time.time(), "endpoint": "feed", "model": "ranker",
                                     "model_version": scored["model_version"], "variant": SHADOW,
                                     "user_id": request.user_id,
                                     "request_time": request.request_time_utc().timestamp(),
                                     "restaurant_ids": shown, "p_order": scored["p_order"]})
        return scored["model_version"]

    async def _v2_model_route(self, request: Request, path: str) -> Response:
        parts = path.split("/")  # ["", "v2", "models", name, ("versions", version), (action)]
        name, rest = parts[3], parts[4:]
        if name not in self.models:
            raise NotFound(f"model {name!r} is not served here; models: {sorted(self.models)}", field="model_name")
        version = None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
            await self._check_version(name, version)
        action = "/".join(rest)
        if action == "" and request.method == "GET":
            if version is not None:
                return json_response({**await self.models[name].version_metadata.remote(version), "name": name})
            return json_response(await self._metadata(name))
        if action == "ready" and request.method == "GET":
            ready = await self._ready(name)
            return json_response({"name": name, "ready": ready}, 200 if ready else 503)
        if action == "infer" and request.method == "POST":
            return await self._infer(request, name, version)
        if action in ("", "ready", "infer"):
            raise MethodNotAllowed(f"{path} does not take {request.method}")
        raise NotFound(f"no route {path}; see GET / for the endpoints")

    async def _check_version(self, name: str, version: str) -> None:
        """404 naming the served versions when `version` is not one of them."""
        served = (await self._metadata(name))["versions"]
        if version not in served:
            raise NotFound(f"model {name!r} has no served version {version!r}; served versions: {served}",
                           field="model_version", rule=f"one of {served}")

    async def _infer(self, request: Request, name: str, version: str | None = None) -> Response:
        if name in self.extra_models:
            return await self._infer_extra(request, name, version)
        with self.metrics.stage("v2_infer", "total"):
            specs = await self._specs(name)
            call = parse_infer(await self._body(request), request.headers, specs)
            if version is None:
                outputs, version = await self.models[name].infer_versioned.remote(call.tensors)
            else:
                outputs = (await self.models[name].infer_pinned.remote(call.tensors, version))["outputs"]
        if self.spec_versions.get(name) != version:  # a rollout may change the inputs: fetch them again next time
            self.specs.pop(name, None)
        head = {"model_name": name, "model_version": version, **({"id": call.id} if call.id is not None else {})}
        return infer_response(head, outputs, call)

    async def _infer_extra(self, request: Request, name: str, version: str | None = None) -> Response:
        """OIP infer of an extra model (serving/generic.py): the champion, or the challenger for a canary share
        of callers (sticky by `parameters.user_id`, else the request's `id`, else per request); a shadow share
        is also answered by the challenger after the response, logged and never returned. A version in the
        path answers itself, with no canary draw and no shadow."""
        with self.metrics.stage("v2_infer", "total"):
            rid = request_id(request.headers.get("x-request-id"))
            specs = await self._specs(name)
            call = parse_infer(await self._body(request), request.headers, specs)
            if version is None:
                key = _canary_key(call.parameters) or call.id or rid
                answer = await self.models[name].infer_variant.remote(call.tensors, key, rid)
            else:
                answer = {**await self.models[name].infer_pinned.remote(call.tensors, version), "shadow": False}
        version, variant = answer["model_version"], answer["variant"]
        if self.spec_versions.get(name) != version:
            self.specs.pop(name, None)
        head = {"model_name": name, "model_version": version, **({"id": call.id} if call.id is not None else {}),
                "parameters": {"variant": variant, "request_id": rid}}
        response = infer_response(head, answer["outputs"], call)  # before logging: it refuses unknown outputs
        if self.log is not None:
            self.log.append("v2", _v2_record(rid, name, version, variant, answer["outputs"]))
        if answer["shadow"]:
            model, tensors = self.models[name], call.tensors
            self.shadows.start(name, "unknown", lambda: self._shadow_extra(rid, name, model.shadow_infer.remote(tensors)))
        return response

    async def _shadow_extra(self, rid: str, name: str, answering: Awaitable[dict[str, Any]]) -> str:
        """The challenger's outputs for an extra model's request, logged as a `shadow` record (never returned)."""
        answer = await answering
        if self.log is not None:
            self.log.append("v2", _v2_record(rid, name, answer["model_version"], SHADOW, answer["outputs"]))
        return answer["model_version"]

    async def _metadata(self, name: str) -> dict[str, Any]:
        # Asked every time: a reconfigure changes the served versions. Named as routed: the ranker's
        # artifact may call itself otherwise.
        return {**await self.models[name].metadata.remote(), "name": name}

    async def _specs(self, name: str) -> list[dict[str, Any]]:
        if name not in self.specs:
            metadata = await self._metadata(name)
            self.specs[name] = await self.models[name].input_specs.remote()
            self.spec_versions[name] = metadata["versions"][0]
        return self.specs[name]

    async def _repository_index(self) -> list[dict[str, Any]]:
        """`POST /v2/repository/index`: every model and served version, READY or UNAVAILABLE with the reason."""
        index: list[dict[str, Any]] = []
        for name in sorted(self.models):
            try:
                versions = (await self._metadata(name))["versions"]
            except Exception as exc:  # an unreachable model is an entry of the index, not an error of it
                logger.warning("model %s is unavailable for the repository index", name, exc_info=True)
                index.append({"name": name, "state": "UNAVAILABLE", "reason": f"{exc.__class__.__name__}: {exc}"[:200]})
                continue
            index.extend({"name": name, "version": version, "state": "READY"} for version in versions)
        return index

    async def _ready(self, name: str) -> bool:
        """The model's deployment answers this replica within a bounded wait (serving/readiness.py)."""
        return await readiness.not_ready_reason(name, lambda: self._metadata(name)) is None

    async def _all_ready(self) -> bool:
        """Every model's deployment answers, all asked at once: the probe takes at most one bounded wait."""
        return not await readiness.not_ready(self.models, self._metadata)


def _eta_record(rid: str, request: EtaRequest, answer: dict[str, Any], inputs: dict[str, float] | None,
                variant: str) -> dict:
    """The prediction log's record of one /v1/eta answer (docs/monitoring.md); `variant` is champion,
    challenger (a canary answer) or shadow (the challenger's answer, never returned)."""
    from models import geo

    return {"request_id": rid, "ts": time.time(), "endpoint": "eta", "model": "eta",
            "model_version": answer["model_version"], "variant": variant, "user_id": request.user_id,
            "restaurant_id": request.restaurant_id,
            "delivery_lat": request.delivery_lat, "delivery_lon": request.delivery_lon,
            "order_time": request.order_time_utc().timestamp(),
            "area_id": geo.area_id(request.delivery_lat, request.delivery_lon), "inputs": inputs,
            "eta_minutes": answer["eta_minutes"], "degraded": answer["degraded"],
            "expired_features": answer["expired_features"]}


def _feed_record(rid: str, request: FeedRequest, body: dict[str, Any]) -> dict:
    """The prediction log's record of one /v1/feed page: what was shown where, with its scores."""
    return {"request_id": rid, "ts": time.time(), "endpoint": "feed", "model": "ranker",
            "model_version": body["model_versions"]["ranker"], "model_versions": body["model_versions"],
            "variant": body["variants"]["ranker"], "variants": body["variants"], "user_id": request.user_id, "user_lat": request.user_lat, "user_lon": request.user_lon,
            "request_time": request.request_time_utc().timestamp(), "cold_start": body["cold_start"],
            "degraded": body["degraded"],
            "cards": [{"restaurant_id": c["restaurant_id"], "position": position, "p_order": c["p_order"],
                       "eta_minutes": c["eta_minutes"], "sponsored": c["sponsored"]}
                      for position, c in enumerate(body["cards"], start=1)]}


def _canary_key(parameters: dict[str, Any]) -> str | None:
    """`parameters.user_id` of an OIP request, the sticky key of an extra model's canary (None without it)."""
    user = parameters.get("user_id")
    return None if user is None or isinstance(user, bool) else str(user)


def _v2_record(rid: str, name: str, version: str, variant: str, outputs: dict[str, Any]) -> dict:
    """The prediction log's record of an extra model's /v2 answer (the monitor's joiner skips `v2` records:
    an extra model's outcomes are its team's to join)."""
    return {"request_id": rid, "ts": time.time(), "endpoint": "v2", "model": name, "model_version": version,
            "variant": variant, "outputs": {key: _plain(array) for key, array in outputs.items()}}


def _plain(array: Any) -> Any:
    return array.tolist() if hasattr(array, "tolist") else array
