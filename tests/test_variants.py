"""Version pinning, in-place rollout, canary and shadow: serving/variants.py and the real Ray Serve app."""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import redis

from serving.config import load_serve_config
from serving.variants import (
    Slot,
    VariantError,
    Variants,
    check_consistent,
    describe,
    in_canary,
    in_shadow,
    parse_slot,
    pin,
    slots,
)

ETA_SHIFT_MIN = 5.0  # the eta challenger answers the champion's ETA plus this
RANKER_FACTOR = 0.5  # the ranker challenger answers the champion's p_order times this


# --- the slot schema and the serve config ------------------------------------------------------

@pytest.mark.parametrize("user_config, message", [
    ({"shadow": 0.5}, "need a challenger"),
    ({"canary": 0.1}, "need a challenger"),
    ({"challenger": "eta-2", "canary": 1.5}, "canary"),
    ({"challenger": "eta-2", "shadow": -0.1}, "shadow"),
    ({"version": "eta-1", "weights": 1}, "weights"),
    ({"version": ""}, "version"),
])
def test_a_bad_slot_is_refused_with_what_to_fix(user_config, message):
    with pytest.raises(VariantError, match=message):
        parse_slot("eta", user_config)


def test_slot_defaults_numbers_and_retrieval():
    """No user_config serves the champion alone; YAML numbers are registry numbers; retrieval has one version."""
    assert parse_slot("eta", None) == Slot(version="champion")
    assert parse_slot("ranker", {"version": 3, "challenger": 4, "canary": 0.2}).challenger == "4"
    assert parse_slot("retrieval", {"version": "r-1", "challenger": None, "shadow": 0, "canary": 0}).version == "r-1"
    with pytest.raises(VariantError, match="retrieval serves one version"):
        parse_slot("retrieval", {"version": "r-1", "challenger": "r-2", "shadow": 0.5})


def _with(config: dict, deployment: str, user_config: dict | None) -> dict:
    config = json.loads(json.dumps(config))
    for d in config["applications"][0]["deployments"]:
        if d["name"] == deployment:
            d["user_config"] = user_config
    return config


def test_the_shipped_config_is_consistent_and_serves_the_champions():
    config = load_serve_config()
    check_consistent(config)
    assert {m: s.version for m, s in slots(config).items()} == {"eta": "champion", "ranker": "champion",
                                                                  "retrieval": "champion"}


def test_check_consistent_refuses_a_mismatched_eta_slot():
    """/v1/eta (the Ingress) and the feed's ETAs (EtaModel) must be the same versions, split the same way."""
    config = load_serve_config()
    mismatched = _with(config, "Ingress", {"eta": {"version": "eta-a", "challenger": None}})
    with pytest.raises(VariantError, match="the ETA of /v1/eta and of the feed must be the same versions"):
        check_consistent(mismatched)
    shares = _with(_with(config, "Ingress", {"eta": {"challenger": "eta-b", "shadow": 0.5}}),
                   "EtaModel", {"challenger": "eta-b", "shadow": 0.2})
    with pytest.raises(VariantError, match="same versions"):
        check_consistent(shares)
    with pytest.raises(VariantError, match="only `eta`"):
        check_consistent(_with(config, "Ingress", {"ranker": {}}))
    with pytest.raises(VariantError, match="need a challenger"):
        check_consistent(_with(config, "Ranker", {"shadow": 0.3}))


def _fake_artifact(root: Path, model: str, version: str, service: str) -> Path:
    directory = root / model / version
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"")  # the registry reads only the manifest
    (directory / "manifest.json").write_text(json.dumps({
        "name": model, "version": version, "feature_service": service, "inputs": [], "outputs": [],
        "training_window": {}}))
    return directory


def test_pin_replaces_aliases_and_numbers_by_artifact_versions(tmp_path):
    """Against a real MLflow registry (SQLite): every alias/number in every user_config becomes the
    artifact version, deployments without a user_config get the pinned champion, the Ingress the EtaModel slot."""
    from models.registry import Registry

    registry = Registry(artifacts=tmp_path)
    for model, service in (("eta", "eta_v1"), ("ranker", "ranker_v1"), ("retrieval", "retrieval_v1")):
        for n in (1, 2):
            registry.register(_fake_artifact(tmp_path, model, f"{model}-2026010{n}-abc", service))
        registry.set_alias(model, "champion", "1")
        registry.set_alias(model, "challenger", "2")
    config = load_serve_config()
    config = _with(config, "EtaModel", {"version": "champion", "challenger": "challenger", "shadow": 0.5})
    config = _with(config, "Ingress", {"eta": {"version": "champion", "challenger": "challenger", "shadow": 0.5}})
    config = _with(config, "Ranker", {"version": "2", "challenger": "eta-unused-literal", "canary": 0.1})
    config = _with(config, "Retrieval", None)
    before = json.dumps(config)
    pinned = pin(config, registry)
    assert json.dumps(config) == before  # a copy: the input is untouched
    got = slots(pinned)
    assert got["eta"] == Slot(version="eta-20260101-abc", challenger="eta-20260102-abc", shadow=0.5)
    assert got["ranker"].version == "ranker-20260102-abc" and got["ranker"].challenger == "eta-unused-literal"
    assert got["retrieval"].version == "retrieval-20260101-abc"
    ingress = next(d for d in pinned["applications"][0]["deployments"] if d["name"] == "Ingress")
    assert ingress["user_config"]["eta"]["version"] == "eta-20260101-abc"
    from serving.config import validate

    validate(pinned)  # still a valid Ray Serve config
    with pytest.raises(LookupError):
        pin(_with(_with(config, "EtaModel", {"version": "9"}), "Ingress", {"eta": {"version": "9"}}), registry)


def test_canary_is_sticky_by_user_and_close_to_its_share():
    users = range(1, 20_001)
    chosen = [u for u in users if in_canary(u, 0.2, "eta:eta-2")]
    assert abs(len(chosen) / len(users) - 0.2) < 0.01
    assert chosen == [u for u in users if in_canary(u, 0.2, "eta:eta-2")]  # the same users every time
    wider = {u for u in users if in_canary(u, 0.5, "eta:eta-2")}
    assert set(chosen) <= wider  # raising the share keeps everyone already in
    other = {u for u in users if in_canary(u, 0.2, "eta:eta-3")}
    assert len(other & set(chosen)) < 0.3 * len(chosen)  # a new challenger draws a new sample
    assert not any(in_canary(u, 0.0, "s") for u in range(1000)) and all(in_canary(u, 1.0, "s") for u in range(1000))
    shadowed = sum(in_shadow(uuid.uuid4().hex, 0.3) for _ in range(20_000)) / 20_000
    assert abs(shadowed - 0.3) < 0.015
    assert in_shadow("req-1", 0.5) == in_shadow("req-1", 0.5)


# --- two versions of each model: the trained one and a derived challenger ------------------------

def _derive(source: Path, root: Path, version: str, op: str, value: float) -> Path:
    """A copy of an artifact whose ONNX output is `output <op> value`: a challenger with a known answer."""
    import onnx
    from onnx import helper, numpy_helper

    target = root / source.parent.name / version
    shutil.copytree(source.resolve(), target)
    model = onnx.load(str(target / "model.onnx"))
    graph = model.graph
    name = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{name}_base" if o == name else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), f"{name}_k"))
    graph.node.append(helper.make_node(op, [f"{name}_base", f"{name}_k"], [name]))
    onnx.checker.check_model(model)
    onnx.save(model, str(target / "model.onnx"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@dataclass
class Versions:
    root: Path
    eta: str
    eta2: str
    ranker: str
    ranker2: str
    retrieval: str


@pytest.fixture(scope="module")
def versions(tmp_path_factory, eta_trained, ranker_trained, retrieval_trained) -> Versions:
    root = tmp_path_factory.mktemp("variant-artifacts")
    for trained in (eta_trained, ranker_trained, retrieval_trained):
        link = root / Path(trained.target).parent.name / Path(trained.target).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(trained.target).resolve(), target_is_directory=True)
    eta, ranker = Path(eta_trained.target).name, Path(ranker_trained.target).name
    _derive(Path(eta_trained.target), root, f"{eta}-plus5", "Add", ETA_SHIFT_MIN)
    _derive(Path(ranker_trained.target), root, f"{ranker}-half", "Mul", RANKER_FACTOR)
    return Versions(root, eta, f"{eta}-plus5", ranker, f"{ranker}-half", Path(retrieval_trained.target).name)


def test_a_replica_swaps_versions_whole_and_keeps_them_on_a_bad_slot(versions, city_dir, feature_store, known):
    """Variants (what every replica holds): a reconfigure loads, then swaps; a bad slot changes nothing;
    a loaded version is reused rather than loaded again (promotion is a swap)."""
    from serving.eta import EtaPipeline
    from serving.schemas import parse_eta_request

    request = parse_eta_request(json.dumps(known).encode())
    loads: list[str] = []

    def load(path: Path) -> EtaPipeline:
        loads.append(path.name)
        return EtaPipeline(str(path), "sqlite", str(city_dir))

    variants = Variants("eta", load, describe, artifacts=versions.root)
    served = variants.configure({"version": versions.eta})
    assert served.versions == [versions.eta] and served.choose(1) == ("champion", served.champion)
    base = served.champion.predict(request)["eta_minutes"]
    both = variants.configure({"version": versions.eta, "challenger": versions.eta2, "canary": 1.0})
    variant, pipeline = both.choose(7)
    assert variant == "challenger" and pipeline.predict(request)["eta_minutes"] == pytest.approx(base + 5, abs=0.02)
    for bad, why in [({"version": "eta-nope"}, "no version 'eta-nope'"),
                     ({"version": versions.eta, "shadow": 0.5}, "need a challenger"),
                     ({"version": "current"}, "`current` is gone")]:
        with pytest.raises(VariantError, match=why):
            variants.configure(bad)
        assert variants.served is both  # untouched: the old versions keep answering
    promoted = variants.configure({"version": versions.eta2})
    assert promoted.champion is both.challenger and loads == [versions.eta, versions.eta2]


# --- the real Ray Serve app ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def stream() -> str:
    name = f"courier-test:{uuid.uuid4().hex[:8]}:variants"
    yield name
    redis.Redis(host="127.0.0.1", port=6379).delete(name)


@pytest.fixture(scope="module")
def server(tmp_path_factory, city_dir, feature_store, eta_trained, retrieval_trained, ranker_trained, versions,
           stream):
    from serving.launch import BackgroundServer
    from tests.conftest import distinct_ports, serve_overrides

    overrides = ["--num-cpus", "2", *serve_overrides(city_dir, eta_trained, retrieval_trained, ranker_trained,
                                                     artifacts=str(versions.root),
                                                     prediction_log={"stream": stream, "linger_s": 0.005})]
    log = tmp_path_factory.mktemp("variants-serve") / "serve.log"
    with BackgroundServer(*distinct_ports(2), log, extra=overrides) as running:
        yield running


def apply_slots(server, timeout_s: float = 180, **changes: dict) -> None:
    """Change model slots in place through the Ray dashboard, as serving.rollout does; wait until applied."""
    from serving.rollout import Dashboard, with_slot

    dashboard = Dashboard(server.dashboard_url)
    config = dashboard.config()
    for model, fields in changes.items():
        config = with_slot(config, model, **fields)
    since = time.time()
    dashboard.deploy(config)
    dashboard.wait_running(since, timeout_s)


def _eta(http: httpx.Client, body: dict, **headers) -> dict:
    response = http.post("/v1/eta", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _feed(http: httpx.Client, user_id: int, known: dict, **headers) -> dict:
    response = http.post("/v1/feed", json={"user_id": user_id, "user_lat": known["delivery_lat"],
                                           "user_lon": known["delivery_lon"], "request_time": known["order_time"],
                                           "page_size": 10}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _replica_ids(server) -> dict[str, set[str]]:
    from serving.rollout import Dashboard

    details = Dashboard(server.dashboard_url).details()
    deployments = details["applications"]["courier"]["deployments"]
    return {name: {r["replica_id"] for r in d["replicas"] if r["state"] == "RUNNING"} for name, d in deployments.items()}


def test_every_replica_answers_with_the_pinned_version(server, versions, known):
    """Many requests over every Ingress, EtaModel and Ranker replica: one version per model, the pinned one."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        etas = [_eta(http, known) for _ in range(60)]
        feeds = [_feed(http, u, known) for u in range(1, 21)]
        metadata = {m: {tuple(http.get(f"/v2/models/{m}").json()["versions"]) for _ in range(20)}
                    for m in ("eta", "ranker", "user_tower")}
    assert {(a["model_version"], a["variant"]) for a in etas} == {(versions.eta, "champion")}
    assert {f["model_versions"]["eta"] for f in feeds} == {versions.eta}
    assert {f["model_versions"]["ranker"] for f in feeds} == {versions.ranker}
    assert {f["model_versions"]["retrieval"] for f in feeds} == {versions.retrieval}
    assert {json.dumps(f["variants"], sort_keys=True) for f in feeds} == {'{"eta": "champion", "ranker": "champion"}'}
    assert metadata == {"eta": {(versions.eta,)}, "ranker": {(versions.ranker,)}, "user_tower": {(versions.retrieval,)}}


class Load:
    """Requests in a background thread (ETA and feed) until stopped; every failure is kept."""

    def __init__(self, url: str, known: dict):
        self.url, self.known = url, known
        self.answers: list[tuple[float, str, str]] = []  # (time, endpoint, version)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    if n % 4:
                        r = http.post("/v1/eta", json=self.known)
                        version = r.json().get("model_version", "") if r.status_code == 200 else ""
                        endpoint = "eta"
                    else:
                        r = http.post("/v1/feed", json={"user_id": n % 50 + 1, "user_lat": self.known["delivery_lat"],
                                                        "user_lon": self.known["delivery_lon"], "page_size": 5})
                        version = r.json().get("model_versions", {}).get("ranker", "") if r.status_code == 200 else ""
                        endpoint = "feed"
                    if r.status_code != 200:
                        self.failures.append(f"{endpoint} {r.status_code}: {r.text[:200]}")
                    else:
                        self.answers.append((time.monotonic(), endpoint, version))
                except httpx.HTTPError as exc:
                    self.failures.append(f"{exc.__class__.__name__}: {exc}")


def test_a_reconfigure_switches_every_replica_in_place_and_no_request_fails(server, versions, known):
    """Rolling eta and ranker to their challengers under load: every request answered, the same replicas
    (no restart), then every answer from the new versions; and back."""
    from serving.rollout import wait_for_version

    replicas = _replica_ids(server)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        before = _eta(http, known)["eta_minutes"]
    with Load(server.url, known) as load:
        time.sleep(1)
        apply_slots(server, eta={"version": versions.eta2}, ranker={"version": versions.ranker2})
        wait_for_version(server.url, "eta", versions.eta2)
        switched = time.monotonic()
        time.sleep(2)
    assert not load.failures, load.failures[:5]
    assert {v for _, e, v in load.answers if e == "eta"} <= {versions.eta, versions.eta2}
    late = {(e, v) for t, e, v in load.answers if t > switched + 0.5}
    assert late == {("eta", versions.eta2), ("feed", versions.ranker2)}, late
    assert _replica_ids(server) == replicas  # reconfigured in place, not replaced
    with httpx.Client(base_url=server.url, timeout=30) as http:
        after = [_eta(http, known) for _ in range(20)]
        assert {a["model_version"] for a in after} == {versions.eta2}
        assert after[0]["eta_minutes"] == pytest.approx(before + ETA_SHIFT_MIN, abs=0.02)
        assert {_feed(http, u, known)["model_versions"]["eta"] for u in range(1, 11)} == {versions.eta2}
    apply_slots(server, eta={"version": versions.eta}, ranker={"version": versions.ranker})
    wait_for_version(server.url, "eta", versions.eta)
    wait_for_version(server.url, "ranker", versions.ranker)


def test_canary_users_stay_on_the_challenger_at_the_stated_share(server, versions, known):
    """A 30 % canary on /v1/eta (user_id) and on the feed's ranker: each user's variant is the stable
    hash's, on every request and replica, the answer is that variant's, and the share is close to 30 %."""
    apply_slots(server, eta={"challenger": versions.eta2, "canary": 0.3},
                ranker={"challenger": versions.ranker2, "canary": 0.3})
    try:
        _check_canary(server, versions, known)
    finally:  # the next tests start from the champion alone, whatever failed here
        apply_slots(server, eta={"challenger": None, "canary": 0.0}, ranker={"challenger": None, "canary": 0.0})


def _check_canary(server, versions, known) -> None:
    users = range(1, 161)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        champion = _eta(http, {**known, "user_id": 100_000})  # find a champion answer to compare with
        if champion["variant"] != "champion":
            champion = next(a for a in (_eta(http, {**known, "user_id": u}) for u in range(100_001, 100_050))
                            if a["variant"] == "champion")
        rounds = [[_eta(http, {**known, "user_id": u}) for u in users] for _ in range(2)]
        feeds = [_feed(http, u, known) for u in range(1, 61)]
    expected = [in_canary(u, 0.3, f"eta:{versions.eta2}") for u in users]
    for answers in rounds:
        assert [a["variant"] == "challenger" for a in answers] == expected  # sticky: the same users each round
        for a in answers:
            assert a["model_version"] == (versions.eta2 if a["variant"] == "challenger" else versions.eta)
            shift = ETA_SHIFT_MIN if a["variant"] == "challenger" else 0.0
            assert a["eta_minutes"] == pytest.approx(champion["eta_minutes"] + shift, abs=0.02)
    assert 0.2 < sum(expected) / len(expected) < 0.4
    for user, page in zip(range(1, 61), feeds):
        in_ranker = in_canary(user, 0.3, f"ranker:{versions.ranker2}")
        assert page["variants"]["ranker"] == ("challenger" if in_ranker else "champion")
        assert page["model_versions"]["ranker"] == (versions.ranker2 if in_ranker else versions.ranker)
        in_eta = in_canary(user, 0.3, f"eta:{versions.eta2}")
        assert page["variants"]["eta"] == ("challenger" if in_eta else "champion")  # the same user, the same ETA
    with httpx.Client(base_url=server.url, timeout=30) as http:
        versions_served = http.get("/v2/models/eta").json()["versions"]
    assert versions_served == [versions.eta, versions.eta2]
    _metric_total(server.metrics_port, "ray_courier_model_answers_total",
                  'variant="challenger"', f'version="{versions.eta2}"')
    assert _metric_total(server.metrics_port, "ray_courier_model_loaded", 'slot="challenger"',
                         f'version="{versions.ranker2}"', at_least=1) >= 2  # both Ranker replicas hold it


def _records(stream: str, ids: set[str], want: int, timeout_s: float = 30) -> list[dict]:
    client = redis.Redis(host="127.0.0.1", port=6379)
    deadline = time.monotonic() + timeout_s
    found: list[dict] = []
    while time.monotonic() < deadline:
        found = [r for r in (orjson.loads(f[b"r"]) for _, f in client.xrange(stream)) if r["request_id"] in ids]
        if len(found) >= want:
            break
        time.sleep(0.5)
    return found


def test_shadow_answers_are_logged_and_never_returned(server, versions, known, stream):
    """With shadow 1.0 every /v1/eta and feed is also answered by the challenger: its answer is in the
    prediction log as a `shadow` record with the same request id, and never in a response."""
    apply_slots(server, eta={"challenger": versions.eta2, "shadow": 1.0},
                ranker={"challenger": versions.ranker2, "shadow": 1.0})
    ids = {f"shadow-eta-{i}": i for i in range(20)}
    feed_ids = {f"shadow-feed-{i}": i + 1 for i in range(10)}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        etas = {rid: _eta(http, {**known, "user_id": i + 1}, **{"X-Request-Id": rid}) for rid, i in ids.items()}
        feeds = {rid: _feed(http, u, known, **{"X-Request-Id": rid}) for rid, u in feed_ids.items()}
    for answer in etas.values():
        assert (answer["variant"], answer["model_version"]) == ("champion", versions.eta)
        assert "shadow" not in answer
    for page in feeds.values():
        assert page["variants"]["ranker"] == "champion" and page["model_versions"]["ranker"] == versions.ranker
    records = _records(stream, set(ids) | set(feed_ids), want=2 * (len(ids) + len(feed_ids)))
    by = {(r["request_id"], r["variant"]): r for r in records}
    for rid, answer in etas.items():
        primary, shadow = by[(rid, "champion")], by[(rid, "shadow")]
        assert primary["model_version"] == versions.eta and primary["eta_minutes"] == answer["eta_minutes"]
        assert shadow["model_version"] == versions.eta2 and shadow["endpoint"] == "eta"
        assert shadow["eta_minutes"] == pytest.approx(answer["eta_minutes"] + ETA_SHIFT_MIN, abs=0.02)
        assert shadow["inputs"] == primary["inputs"]
    for rid, page in feeds.items():
        shadow = by[(rid, "shadow")]
        assert shadow["endpoint"] == "feed" and shadow["model"] == "ranker"
        assert shadow["model_version"] == versions.ranker2
        assert shadow["restaurant_ids"] == [c["restaurant_id"] for c in page["cards"]]
        np.testing.assert_allclose(shadow["p_order"], [RANKER_FACTOR * c["p_order"] for c in page["cards"]],
                                   rtol=1e-4, atol=1e-6)
        assert by[(rid, "champion")]["variants"] == {"ranker": "champion", "eta": "champion"}
    assert _metric_total(server.metrics_port, "ray_courier_shadow_answers_total", 'model="eta"',
                         f'version="{versions.eta2}"', at_least=len(ids) - 1) >= len(ids)  # every replica's


def test_shadow_costs_the_caller_no_latency(tmp_path, city_dir, feature_store, eta_trained, retrieval_trained,
                                            ranker_trained, versions, known):
    """p50/p99 of /v1/eta with and without a shadow answer, interleaved in one run on one server.

    The server shadows half of the requests (by request id, serving.variants.in_shadow), so the
    request ids choose the arm: same replicas, same moment, only the shadow differs. Printed for
    the record; asserted loosely, as two shared cores are noisy."""
    from serving.launch import BackgroundServer
    from tests.conftest import distinct_ports, serve_overrides

    overrides = ["--num-cpus", "2", *serve_overrides(city_dir, eta_trained, retrieval_trained, ranker_trained,
                                                     artifacts=str(versions.root), prediction_log=None,
                                                     slots={"eta": {"challenger": versions.eta2, "shadow": 0.5}})]
    took: dict[bool, list[float]] = {True: [], False: []}
    with BackgroundServer(*distinct_ports(2), tmp_path / "serve.log", extra=overrides) as running:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            for i in range(2400):
                rid = f"lat-{i}"
                started = time.perf_counter()
                answer = _eta(http, known, **{"X-Request-Id": rid})
                if i >= 200:  # warm-up left out
                    took[in_shadow(rid, 0.5)].append((time.perf_counter() - started) * 1000)
                assert answer["model_version"] == versions.eta
            # each replica exports its counter on its own clock, seconds apart (a sum that stopped growing for a
            # while is not yet complete): wait, up to a minute, for the share the assertion below asks for
            shadowed = _metric_total(running.metrics_port, "ray_courier_shadow_answers_total", 'model="eta"',
                                     at_least=0.8 * len(took[True]) - 1)
    figures = {arm: (statistics.median(v), float(np.percentile(v, 99)), len(v)) for arm, v in took.items()}
    print(f"\n/v1/eta latency, ms (p50, p99, n): shadow {figures[True]}, no shadow {figures[False]}; "
          f"shadow answers counted {shadowed:.0f}")
    assert shadowed >= 0.8 * len(took[True])
    assert figures[True][0] < 1.25 * figures[False][0] + 0.5, figures


def test_a_bad_user_config_is_refused_and_the_old_version_keeps_answering(server, versions, known):
    """An unknown version: the replicas refuse it (reconfigure raises), requests keep being answered
    by the old version, and a good config afterwards is applied as usual."""
    from serving.rollout import RolloutError

    with Load(server.url, known) as load:
        time.sleep(1)
        with pytest.raises(RolloutError):
            apply_slots(server, timeout_s=120, eta={"version": "eta-20990101000000-notthere"})
        time.sleep(2)
    assert not load.failures, load.failures[:5]
    assert {v for _, e, v in load.answers if e == "eta"} == {versions.eta}
    apply_slots(server, eta={"version": versions.eta})
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert {_eta(http, known)["model_version"] for _ in range(20)} == {versions.eta}


def _metric_total(port: int, name: str, *labels: str, timeout_s: float = 60, at_least: float = 0.0) -> float:
    """The sum of a metric's samples carrying every label, once Ray's agent exports more than `at_least`
    (each replica exports on its own clock: the first one's samples may come seconds before the next's)."""
    deadline = time.monotonic() + timeout_s
    total = 0.0
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith(name + "{") and all(label in line for label in labels))
        if total > at_least:
            return total
        time.sleep(2)
    if total > 0:
        return total
    pytest.fail(f"no {name} with {labels} in the metrics after {timeout_s:.0f} s")



def test_rollouts_promote_and_roll_back_through_the_registry_under_load(server, versions, known, tmp_path):
    """serving.rollout as `make rollout/promote/rollback` runs it, on the real app: the registry's
    challenger is promoted (alias and served version move together), then rolled back (both move back),
    with requests flowing all along and none failing; the history file drives the rollback."""
    from models.registry import Registry
    from serving.rollout import Dashboard, RolloutError, Rollouts, served_versions, slot_of

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", versions.root)
    champion = registry.register(versions.root / "eta" / versions.eta)
    challenger = registry.register(versions.root / "eta" / versions.eta2)
    registry.set_alias("eta", "champion", champion.number)
    registry.set_alias("eta", "challenger", challenger.number)
    said: list[str] = []
    rollouts = Rollouts(Dashboard(server.dashboard_url), registry, tmp_path / "rollouts.jsonl", server.url,
                        log=said.append)
    rollouts.apply("eta", "reset", version=versions.eta, challenger=None, shadow=0.0, canary=0.0)
    with Load(server.url, known) as load:
        time.sleep(1)
        promoted = rollouts.promote("eta")
        assert promoted["version"] == versions.eta2 and promoted["challenger"] is None
        assert served_versions(server.url, "eta") == {versions.eta2}
        assert registry.resolve("eta", "champion").version == versions.eta2
        with pytest.raises(Exception, match="challenger"):
            registry.resolve("eta", "challenger")  # promoted: no challenger left
        time.sleep(1)
        rolled_back = rollouts.rollback("eta")
        assert rolled_back["version"] == versions.eta
        assert registry.resolve("eta", "champion").version == versions.eta
        time.sleep(1)
    assert not load.failures, load.failures[:5]
    eta_answers = [v for _, e, v in load.answers if e == "eta"]
    assert eta_answers[0] == versions.eta and eta_answers[-1] == versions.eta and versions.eta2 in eta_answers
    assert slot_of(Dashboard(server.dashboard_url).config(), "eta")["version"] == versions.eta
    assert any("every replica answers with" in line for line in said)
    fresh = Rollouts(Dashboard(server.dashboard_url), registry, tmp_path / "none.jsonl", server.url, log=said.append)
    with pytest.raises(RolloutError, match="nothing to roll back to"):
        fresh.rollback("eta")
