"""Integration tests against the real Ray Serve app started from the project's serve config."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from models.artifact import load_manifest
from models.eta.features import build_inputs
from models.geo import CITY, area_id
from serving.features import OnlineFeatures
from serving.onnx_model import OnnxModel
from tests.conftest import distinct_ports, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def model(eta_trained) -> OnnxModel:
    return OnnxModel(eta_trained.target)


def expected_eta(body: dict, store, model: OnnxModel) -> float:
    """The same pipeline in-process: Feast read (TTLs applied) -> build_inputs -> ONNX."""
    area = area_id(body["delivery_lat"], body["delivery_lon"])
    read = OnlineFeatures(store, model.manifest.feature_service, deadline_s=10).read(
        {"restaurant_id": body["restaurant_id"], "area_id": area})
    columns = {name: [value] for name, value in read.values.items()}
    columns.update(delivery_lat=[body["delivery_lat"]], delivery_lon=[body["delivery_lon"]], area_id=[area],
                   order_time=[pd.Timestamp(body["order_time"]).timestamp()])
    return float(model.run(build_inputs(columns, model.manifest.feature_defaults))["eta_minutes"].reshape(-1)[0])


def test_eta_answers_with_the_model_and_feature_ages(client, known, feature_store, model):
    """POST /v1/eta gives the ONNX model's ETA, its version and the age of each feature view."""
    response = client.post("/v1/eta", json=known)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_version"] == model.version and answer["variant"] == "champion"
    assert answer["feature_service"] == "eta_v1"
    assert answer["degraded"] is False and answer["fallback"] is None
    assert set(answer["feature_age_seconds"]) == {"restaurant_profile", "restaurant_prep_7d",
                                                  "restaurant_load_15m", "area_congestion_15m"}
    assert answer["eta_minutes"] == pytest.approx(expected_eta(known, feature_store, model), abs=0.006)


def test_features_past_their_ttl_are_reported(client, known):
    """The small city ended days ago: its 15-minute views are past TTL, said so, and defaulted."""
    answer = client.post("/v1/eta", json=known).json()
    assert "area_congestion_15m" in answer["expired_features"]
    assert answer["feature_age_seconds"]["area_congestion_15m"] > 15 * 60


def test_farther_delivery_gets_a_longer_eta(client, known, city_dir):
    """All else equal, a drop-off farther from the restaurant takes longer."""
    restaurants = pd.read_parquet(city_dir / "offline" / "restaurants.parquet").set_index("restaurant_id")
    home = restaurants.loc[known["restaurant_id"]]
    etas = []
    for km in (0.5, 2.0, 4.0):
        body = {**known, "delivery_lat": float(home.lat) + km / 111.32, "delivery_lon": float(home.lon)}
        if not CITY.contains(body["delivery_lat"], body["delivery_lon"]):
            body["delivery_lat"] = float(home.lat) - km / 111.32
        etas.append(client.post("/v1/eta", json=body).json()["eta_minutes"])
    assert etas[0] < etas[1] < etas[2], etas


BAD_ETA_BODIES = [
    ("not json", b'{"restaurant_id": 1,', 400, "body"),
    ("missing field", {"restaurant_id": 1, "delivery_lat": 52.37}, 422, "delivery_lon"),
    ("wrong type", {"restaurant_id": "one", "delivery_lat": 52.37, "delivery_lon": 4.9}, 422, "restaurant_id"),
    ("latitude > 90", {"restaurant_id": 1, "delivery_lat": 91.0, "delivery_lon": 4.9}, 422, "delivery_lat"),
    ("longitude < -180", {"restaurant_id": 1, "delivery_lat": 52.37, "delivery_lon": -181.0}, 422, "delivery_lon"),
    ("NaN", b'{"restaurant_id": 1, "delivery_lat": NaN, "delivery_lon": 4.9}', 422, "delivery_lat"),
    ("Infinity", b'{"restaurant_id": 1, "delivery_lat": 52.37, "delivery_lon": -Infinity}', 422, "delivery_lon"),
    ("outside the city", {"restaurant_id": 1, "delivery_lat": 48.85, "delivery_lon": 2.35}, 422,
     "delivery_lat,delivery_lon"),
    ("unknown restaurant", {"restaurant_id": 987654, "delivery_lat": 52.37, "delivery_lon": 4.9}, 404,
     "restaurant_id"),
    ("not an object", b"[]", 422, "body"),
]


@pytest.mark.parametrize("case, body, status, field", BAD_ETA_BODIES, ids=[c[0] for c in BAD_ETA_BODIES])
def test_bad_eta_input_gets_a_4xx_naming_the_field(client, case, body, status, field):
    """Each bad body gets its 4xx with the field and a rule; never a 500."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/eta", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert error.get("field") == field and error["error"], error


def test_oversized_body_is_refused_before_parsing(client, known):
    """A body over max_body_bytes gets a 413."""
    response = client.post("/v1/eta", content=b'{"pad": "' + b"x" * 70_000 + b'"}')
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


def test_unknown_route_and_wrong_method(client):
    """Routing errors are 404 and 405 with a hint, not 500."""
    assert client.get("/v1/nowhere").status_code == 404
    assert client.get("/v1/eta").status_code == 405
    assert client.post("/v2/models/eta").status_code == 405
    assert client.get("/v2/models/weather").status_code == 404


def test_service_keeps_answering_after_bad_input(client, known):
    """A storm of bad requests does not stop the service."""
    for body, *_ in [(b[1],) for b in BAD_ETA_BODIES] * 3:
        client.post("/v1/eta", content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert client.post("/v1/eta", json=known).status_code == 200


def test_bad_requests_interleaved_with_valid_ones_leave_every_valid_answer_undegraded(served, known):
    """Ids past int64, unknown ones and impossible times, 16 at a time beside valid requests: no bad one
    gets a 5xx (an unknown user gets a cold-start feed), and no answer falls back ("online store unavailable")."""
    feed = {"user_id": 1, "user_lat": known["delivery_lat"], "user_lon": known["delivery_lon"], "page_size": 5}
    bad = [("/v1/eta", {**known, "restaurant_id": 2**63}), ("/v1/eta", {**known, "restaurant_id": 10**30}),
           ("/v1/eta", {**known, "restaurant_id": 2**63 - 1}), ("/v1/eta", {**known, "user_id": -(2**64)}),
           ("/v1/eta", {**known, "order_time": "0001-01-01T00:00:00+01:00"}),
           ("/v1/eta", {**known, "order_time": "9999-12-31T23:59:59-01:00"}),
           ("/v1/feed", {**feed, "user_id": 2**64}), ("/v1/feed", {**feed, "user_id": 2**63 - 1}),
           ("/v1/feed", {**feed, "request_time": "9999-12-31T23:59:59-23:59"})]
    plan = [item for i in range(60) for item in ([bad[i % len(bad)]] + ([("/v1/eta", known)] if i % 2 else
                                                                         [("/v1/feed", feed)]))]

    async def burst() -> list[tuple[str, dict, httpx.Response]]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
            async def send(path: str, body: dict) -> tuple[str, dict, httpx.Response]:
                async with limit:
                    return path, body, await http.post(path, json=body)
            return await asyncio.gather(*(send(path, body) for path, body in plan))

    answers = asyncio.run(burst())
    valid = [(path, r) for path, body, r in answers if body is known or body is feed]
    assert len(valid) == 60
    for path, response in valid:
        assert response.status_code == 200, (path, response.text)
        assert response.json()["degraded"] is False, (path, response.json())
    for path, body, response in answers:
        if body is not known and body is not feed:
            assert response.status_code < 500, (path, body, response.status_code, response.text)
            assert response.status_code != 200 or response.json()["degraded"] is False  # an unknown user: cold start


def test_v2_health_and_metadata(client, model):
    """Live, ready and model metadata with input names, datatypes and dynamic shapes."""
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/eta/ready").json()["ready"] is True
    metadata = client.get("/v2/models/eta").json()
    assert metadata["name"] == "eta" and metadata["versions"] == [model.version]
    inputs = {i["name"]: i for i in metadata["inputs"]}
    assert inputs["dense"]["datatype"] == "FP32" and inputs["dense"]["shape"][0] == -1
    assert inputs["areas"]["datatype"] == "INT64" and inputs["areas"]["shape"] == [-1, 2]
    assert metadata["outputs"][0]["name"] == "eta_minutes"


def _model_inputs(city_dir, model: OnnxModel, n: int) -> dict[str, np.ndarray]:
    orders = pd.read_parquet(city_dir / "offline" / "orders.parquet").tail(n)
    restaurants = pd.read_parquet(city_dir / "offline" / "restaurants.parquet").set_index("restaurant_id")
    r = restaurants.loc[orders["restaurant_id"]]
    columns = {"lat": r["lat"].to_numpy(), "lon": r["lon"].to_numpy(), "delivery_lat": orders["delivery_lat"].to_numpy(),
               "delivery_lon": orders["delivery_lon"].to_numpy(), "area_id": orders["area_id"].to_numpy(),
               "order_time": orders["event_timestamp"].astype("int64").to_numpy() / 1e9}
    return build_inputs(columns, model.manifest.feature_defaults)


def test_v2_infer_matches_the_model_in_process(client, city_dir, model):
    """POST /v2/models/eta/infer returns what ONNX Runtime gives in-process."""
    inputs = _model_inputs(city_dir, model, 16)
    body = {"id": "batch-16", "inputs": [
        {"name": name, "datatype": "FP32" if array.dtype == np.float32 else "INT64", "shape": list(array.shape),
         "data": array.reshape(-1).tolist()} for name, array in inputs.items()]}
    response = client.post("/v2/models/eta/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "batch-16" and answer["model_name"] == "eta"
    output = answer["outputs"][0]
    served = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(served, model.run(inputs)["eta_minutes"], atol=1e-5)


def test_kserve_rest_client_gets_the_in_process_answer(served, city_dir, model):
    """KServe's own InferenceRESTClient (v2 protocol) works against Courier unchanged."""
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    inputs = _model_inputs(city_dir, model, 8)
    infer_inputs = []
    for name, array in inputs.items():
        tensor = InferInput(name=name, shape=list(array.shape), datatype="FP32" if array.dtype == np.float32 else "INT64")
        tensor.set_data_from_numpy(array, binary_data=False)
        infer_inputs.append(tensor)

    async def call():
        rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=30))
        try:
            return await rest.infer(served.url, InferRequest(model_name="eta", infer_inputs=infer_inputs),
                                    model_name="eta")
        finally:
            await rest.close()

    response = asyncio.run(call())
    np.testing.assert_allclose(response.outputs[0].as_numpy().reshape(-1),
                               model.run(inputs)["eta_minutes"].reshape(-1), atol=1e-5)


BAD_V2 = [
    ("wrong name", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}, "inputs[0].name"),
    ("wrong datatype", {"inputs": [{"name": "areas", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]},
     "inputs[0].datatype"),
    ("wrong shape", {"inputs": [{"name": "areas", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]},
     "inputs[0].shape"),
    ("bucket out of range", {"inputs": [{"name": "areas", "datatype": "INT64", "shape": [1, 2], "data": [1, 10**9]}]},
     "inputs[0].data"),
    ("no inputs", {"inputs": []}, "inputs"),
]


@pytest.mark.parametrize("case, body, field", BAD_V2, ids=[c[0] for c in BAD_V2])
def test_bad_v2_requests_get_a_422(client, case, body, field):
    """Wrong tensor name, datatype, shape or values: 422 naming the input."""
    response = client.post("/v2/models/eta/infer", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


def test_prometheus_metrics_have_per_stage_latency(served, client, known):
    """Ray's metrics endpoint exports feature-read, inference and total latency histograms."""
    for _ in range(5):
        client.post("/v1/eta", json=known)
    wanted = {'stage="feature_read"', 'stage="inference"', 'stage="total"'}
    deadline = time.monotonic() + 60  # Ray's metrics agent exports every few seconds
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("ray_courier_stage_latency_ms_bucket")]
        if all(any(stage in line for line in lines) for stage in wanted):
            break
        time.sleep(2)
    else:
        courier_lines = [line for line in text.splitlines() if 'courier' in line][:5]
        pytest.fail(f"stage histograms missing from metrics: {courier_lines}")


def test_artifact_with_an_unservable_feature_service_is_refused(tmp_path, eta_trained, city_dir):
    """Serving's model deployment refuses to load a model trained on a service the store lacks."""
    import shutil

    from models.artifact import ArtifactError
    from serving.eta import EtaPipeline

    bad = tmp_path / "bad"
    shutil.copytree(eta_trained.target, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["feature_service"] = "eta_v0"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(bad).feature_service == "eta_v0"
    with pytest.raises(ArtifactError, match="'eta_v0'.*does not serve"):
        EtaPipeline(str(bad), "sqlite", str(city_dir))


class OwnRedis:
    """A redis-server of the test's own on a free port, so it can be stopped without harming anyone."""

    def __init__(self, workdir):
        self.port, self.workdir, self.process = free_port(), workdir, None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import subprocess

        import redis

        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                                        stdout=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def test_online_store_outage_degrades_instead_of_failing(tmp_path, city_dir, city_summary, eta_trained, known,
                                                        retrieval_trained, ranker_trained):
    """With the Redis online store down, /v1/eta answers from the fallback and says so; then recovers.
    The prediction log lives on the same Redis here: while it is down answers still go out, and the
    log's dropped counter says how many could not be logged.

    This server answers /v1/eta through the EtaModel deployment with `@serve.batch` on (the
    shipped config answers it in the Ingress), so both paths run under Ray Serve in the suite.
    Its feature cache is off, so every request reaches the store (the cache: test_feature_store)."""
    from datetime import datetime

    from feature_repo.store import apply, materialize, open_store
    from serving.launch import BackgroundServer
    from tests.conftest import serve_overrides

    own = OwnRedis(tmp_path)
    own.start()
    project = "courier_outage"

    def load_store() -> None:
        store = open_store("redis", data_dir=tmp_path, redis=own.address, project=project)
        apply(store, data_dir=city_dir)
        materialize(store, datetime.fromisoformat(city_summary["end"]))

    try:
        load_store()
        overrides = ["--num-cpus", "2", *serve_overrides(tmp_path, eta_trained, retrieval_trained, ranker_trained,
                                                         online_store="redis", redis=own.address,
                                                         feast_project=project, eta_in_ingress=False,
                                                         feed_args={"feature_cache_s": 0},
                                                         eta_batching={"max_batch_size": 8,
                                                                       "batch_wait_timeout_s": 0.005},
                                                         prediction_log={"redis": own.address})]
        with BackgroundServer(*distinct_ports(2), tmp_path / "serve.log", extra=overrides) as server:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                normal = http.post("/v1/eta", json=known).json()
                assert normal["degraded"] is False and normal["variant"] == "champion", normal
                together = asyncio.run(_post_together(server.url, [known, {**known, "restaurant_id": 987654}] * 4))
                assert [r.status_code for r in together] == [200, 404] * 4  # a batch fails only its unknown one
                assert {r.json()["eta_minutes"] for r in together[::2]} == {normal["eta_minutes"]}

                own.stop()
                during = http.post("/v1/eta", json=known)
                assert during.status_code == 200, during.text
                answer = during.json()
                assert answer["degraded"] is True and "online store unavailable" in answer["fallback"]
                assert answer["eta_minutes"] > 0 and answer["model_version"] == normal["model_version"]
                unknown = http.post("/v1/eta", json={**known, "restaurant_id": 987654})
                assert unknown.status_code == 404  # the fallback still knows which restaurants exist
                feed = http.post("/v1/feed", json={"user_id": 1, "user_lat": known["delivery_lat"],
                                                   "user_lon": known["delivery_lon"],
                                                   "request_time": known["order_time"]})
                assert feed.status_code == 200, feed.text
                assert feed.json()["degraded"] is True and feed.json()["cards"]
                assert all(card["eta_minutes"] > 0 for card in feed.json()["cards"])
                assert _metric_total(server.metrics_port, "ray_courier_prediction_log_dropped_total",
                                     'reason="sink_unavailable"') >= 1

                own.start()
                load_store()  # this Redis keeps nothing on disk: materialize again, as the CronJob would
                after = http.post("/v1/eta", json=known).json()
                assert after["degraded"] is False
                assert after["eta_minutes"] == pytest.approx(normal["eta_minutes"], abs=0.01)
    finally:
        own.stop()


def test_an_empty_feature_read_answers_empty_and_leaves_the_store_up(eta_trained, city_dir, known):
    """No candidates (nothing open nearby) is not a store failure: the next read still goes to the store."""
    from serving.eta import EtaPipeline
    from serving.schemas import parse_eta_request

    pipeline = EtaPipeline(str(eta_trained.target), "sqlite", str(city_dir))
    assert pipeline.predict_many([], known["delivery_lat"], known["delivery_lon"], 1.7e9) == {
        "eta_minutes": [], "model_version": pipeline.model.version, "fallback": None}
    assert pipeline.predict(parse_eta_request(json.dumps(known).encode()))["degraded"] is False


def _metric_total(port: int, name: str, label: str, timeout_s: float = 60) -> float:
    """The sum of a metric's samples carrying `label`, once Ray's agent exports any (else 0 after the wait)."""
    deadline = time.monotonic() + timeout_s
    total = 0.0
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith(name) and label in line)
        if total > 0:
            return total
        time.sleep(2)
    return total


async def _post_together(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST /v1/eta bodies concurrently, so that they are in flight together."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await asyncio.gather(*(http.post("/v1/eta", json=body) for body in bodies))


def test_a_batch_of_eta_requests_gets_the_answers_of_one_at_a_time(eta_trained, city_dir, known):
    """Cross-request batching (`eta_batching`) answers each request as if it came alone; an unknown
    restaurant fails only its own request."""
    from serving.errors import NotFound
    from serving.eta import EtaPipeline
    from serving.schemas import parse_eta_request

    pipeline = EtaPipeline(str(eta_trained.target), "sqlite", str(city_dir))
    requests = [parse_eta_request(json.dumps({**known, "restaurant_id": rid, "delivery_lat": known["delivery_lat"] + d}).encode())
                for rid, d in [(1, 0.0), (2, 0.01), (known["restaurant_id"], -0.01), (999_999, 0.0), (3, 0.02)]]
    batched = pipeline.predict_batch(requests)
    assert isinstance(batched[3], NotFound) and "999999" in str(batched[3])
    for request, answer in zip(requests, batched):
        if request.restaurant_id == 999_999:
            with pytest.raises(NotFound):
                pipeline.predict(request)
            continue
        alone = pipeline.predict(request)
        assert answer["eta_minutes"] == pytest.approx(alone["eta_minutes"], abs=0.011)
        assert answer["feature_service"] == alone["feature_service"] and not answer["degraded"]
    assert len({a["eta_minutes"] for a in batched if isinstance(a, dict)}) > 1  # not one answer copied


def test_the_ingress_awaits_the_same_answer_and_falls_back_the_same(eta_trained, city_dir, known):
    """predict_async (the Ingress's /v1/eta: it awaits the feature read) answers as predict does,
    also with the store unreachable (a port nothing listens on): from the fallback, and says so."""
    from serving.errors import NotFound
    from serving.eta import EtaPipeline
    from serving.schemas import parse_eta_request

    def same(a: dict, b: dict) -> None:  # ages move with the clock; the reason a store is down may change
        def kept(answer: dict) -> dict:
            return {k: v for k, v in answer.items() if k not in ("feature_age_seconds", "fallback")}
        assert kept(a) == kept(b) and (a["fallback"] is None) == (b["fallback"] is None)

    request = parse_eta_request(json.dumps(known).encode())
    unknown = parse_eta_request(json.dumps({**known, "restaurant_id": 987654}).encode())
    pipeline = EtaPipeline(str(eta_trained.target), "sqlite", str(city_dir))
    answer = asyncio.run(pipeline.predict_async(request))
    same(answer, pipeline.predict(request))
    assert answer["degraded"] is False
    with pytest.raises(NotFound):
        asyncio.run(pipeline.predict_async(unknown))

    unreachable = EtaPipeline(str(eta_trained.target), "redis", str(city_dir),
                              redis=f"127.0.0.1:{free_port()}")
    down = asyncio.run(unreachable.predict_async(request))
    assert down["degraded"] is True and "online store unavailable" in down["fallback"]
    same(down, unreachable.predict(request))
    assert down["eta_minutes"] > 0
