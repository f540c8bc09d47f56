"""Bearer API keys, scopes and the per-key rate limit (serving/auth.py): the rules, then a real Ray Serve app
with auth on (its own, small: the ETA model only), as a client sees it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from serving.auth import (
    ApiKey,
    AuthArgs,
    Authenticator,
    Forbidden,
    TokenBuckets,
    TooManyRequests,
    Unauthorized,
    digest,
    load_keys,
    main,
    new_key,
    required_scope,
)

PUBLIC, INTERNAL, LIMITED = "pub-" + "a" * 40, "int-" + "b" * 40, "lim-" + "c" * 40


def _keys() -> list[dict]:
    return [{"name": "city", "sha256": digest(PUBLIC), "scopes": ["public"]},
            {"name": "ops", "sha256": digest(INTERNAL), "scopes": ["public", "internal"], "rate_per_s": 0},
            {"name": "slow", "sha256": digest(LIMITED), "scopes": ["public"], "rate_per_s": 1, "burst": 2}]


def _auth(**args) -> Authenticator:
    settings = AuthArgs(enabled=True, **args)
    return Authenticator(settings, [ApiKey.model_validate(k) for k in _keys()], export_metrics=False)


# --- the rules ------------------------------------------------------------------------------------

def test_routes_need_the_scope_of_what_they_expose():
    """Probes and discovery open; the product API public; raw inference, metadata and the repository internal;
    anything else needs a key too (a scanner learns nothing without one)."""
    for path in ("/", "/v2", "/v2/health/live", "/v2/health/ready", "/openapi.json"):
        assert required_scope(path) is None, path
    for path in ("/v1/eta", "/v1/feed", "/v1/anything", "/admin", "/v2/models"):
        assert required_scope(path) == "public", path
    for path in ("/v2/models/eta", "/v2/models/eta/infer", "/v2/models/eta/ready",
                 "/v2/models/eta/versions/1/infer", "/v2/repository/index"):
        assert required_scope(path) == "internal", path


@pytest.mark.parametrize(("header", "error"), [
    (None, None), ("", None), ("Basic dXNlcjpwYXNz", "invalid_request"), ("Bearer", "invalid_request"),
    ("Bearer not-a-key", "invalid_token"), (f"Bearer {PUBLIC}x", "invalid_token"), (f"Token {PUBLIC}", "invalid_request"),
])
def test_a_missing_malformed_or_unknown_key_gets_a_401_with_a_challenge(header, error):
    with pytest.raises(Unauthorized) as refused:
        _auth().check("/v1/eta", header)
    challenge = refused.value.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="courier"')
    assert (f'error="{error}"' in challenge) if error else ("error=" not in challenge)
    assert PUBLIC not in refused.value.message  # a key is never echoed


def test_scopes_gate_the_raw_inference_routes():
    auth = _auth()
    assert auth.check("/v1/eta", f"Bearer {PUBLIC}").name == "city"
    assert auth.check("/v1/eta", f"bearer  {INTERNAL} ").name == "ops"  # scheme case-insensitive (RFC 7235)
    with pytest.raises(Forbidden) as refused:
        auth.check("/v2/models/eta/infer", f"Bearer {PUBLIC}")
    assert refused.value.status == 403 and 'scope="internal"' in refused.value.headers["WWW-Authenticate"]
    assert auth.check("/v2/models/eta/infer", f"Bearer {INTERNAL}").name == "ops"
    assert auth.check("/v2/health/ready", None) is None


def test_auth_off_admits_everyone():
    auth = Authenticator(AuthArgs(), [], export_metrics=False)
    assert auth.check("/v2/models/eta/infer", None) is None


def test_the_bucket_refills_at_its_rate_and_says_when_to_come_back():
    buckets, now = TokenBuckets(), 100.0
    assert [buckets.take("k", 2.0, 3, now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", 2.0, 3, now) == pytest.approx(0.5)
    assert buckets.take("k", 2.0, 3, now + 0.5) == 0.0
    assert buckets.take("other", 2.0, 3, now) == 0.0  # per client
    assert buckets.take("k", 2.0, 3, now + 100) == 0.0  # capped at the burst, then drained again:
    assert [buckets.take("k", 2.0, 3, now + 100) for _ in range(3)][-1] > 0


def test_over_the_rate_a_key_gets_a_429_with_retry_after_and_others_do_not():
    auth = _auth()
    auth.check("/v1/eta", f"Bearer {LIMITED}")
    auth.check("/v1/eta", f"Bearer {LIMITED}")
    with pytest.raises(TooManyRequests) as refused:
        auth.check("/v1/eta", f"Bearer {LIMITED}")
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    for _ in range(300):  # rate_per_s 0: no limit for the operators' key
        auth.check("/v2/models/eta/infer", f"Bearer {INTERNAL}")
    assert auth.check("/v1/eta", f"Bearer {PUBLIC}").name == "city"


def test_keys_come_from_a_file_and_the_environment(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(_keys()[:2]))
    keys = load_keys(AuthArgs(enabled=True, keys_file=str(path)), {"COURIER_API_KEYS": json.dumps(_keys()[2:])})
    assert [k.name for k in keys] == ["city", "ops", "slow"]


@pytest.mark.parametrize(("keys_file", "env", "message"), [
    (None, {}, "no API key was found"),
    ("missing.yaml", {}, "does not exist"),
    (None, {"COURIER_API_KEYS": "{not json"}, "is not JSON"),
    (None, {"COURIER_API_KEYS": json.dumps({"name": "x"})}, "must hold a list"),
    (None, {"COURIER_API_KEYS": json.dumps([{"name": "x", "sha256": "plain-key", "scopes": ["public"]}])},
     "invalid"),
    (None, {"COURIER_API_KEYS": json.dumps(_keys()[:1] * 2)}, "unique"),
    (None, {"COURIER_API_KEYS": json.dumps([{**_keys()[0], "scopes": ["admin"]}])}, "invalid"),
])
def test_bad_key_configurations_fail_the_start_saying_what_to_fix(tmp_path, keys_file, env, message):
    args = AuthArgs(enabled=True, keys_file=str(tmp_path / keys_file) if keys_file else None)
    with pytest.raises(ValueError, match=message):
        load_keys(args, env)


def test_new_key_prints_the_digest_entry_and_the_key_once(tmp_path, capsys):
    key, entry = new_key("city", ["public"], 20, 40)
    assert entry == {"name": "city", "sha256": digest(key), "scopes": ["public"], "rate_per_s": 20, "burst": 40}
    assert len(key) >= 43  # 256 random bits
    keys_file = tmp_path / "keys.yaml"
    main(["new-key", "--name", "ops", "--scopes", "public", "internal", "--append-to", str(keys_file)])
    main(["new-key", "--name", "city", "--append-to", str(keys_file)])
    printed = capsys.readouterr().err
    keys = load_keys(AuthArgs(enabled=True, keys_file=str(keys_file)), {})
    assert [(k.name, k.scopes) for k in keys] == [("ops", ["public", "internal"]), ("city", ["public"])]
    for line in (line for line in printed.splitlines() if line.startswith("key")):
        assert digest(line.rsplit(" ", 1)[1]) in {k.sha256 for k in keys}
    assert "key" not in keys_file.read_text().replace("sha256", "")  # the file holds digests only


# --- a real app with auth on ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory, city_dir, feature_store, eta_trained):
    """The serve config with auth on (keys from a file of digests), the ETA model only, on free ports."""
    from loadtest.bench import ETA_ONLY, with_deployment_overrides
    from loadtest.server import ServiceProcess
    from serving.config import load_serve_config

    folder = tmp_path_factory.mktemp("auth-serve")
    keys = folder / "keys.yaml"
    keys.write_text(yaml.safe_dump(_keys()))
    config = folder / "serve_config.yaml"
    config.write_text(yaml.safe_dump(with_deployment_overrides(load_serve_config(), ETA_ONLY), sort_keys=False))
    root = Path(eta_trained.target).parent.parent
    service = ServiceProcess.courier(
        config=config, log_path=folder / "serve.log", slots={"eta.version": Path(eta_trained.target).name},
        timeout_s=600,  # two shared cores: a start can take minutes while other suites run
        sets={"artifacts": str(root), "data_dir": str(city_dir), "feed": None, "prediction_log": None,
              "auth": {"enabled": True, "keys_file": str(keys)}}).start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def http(secured):
    with httpx.Client(base_url=secured.url, timeout=30) as client:
        yield client


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_served_no_key_or_a_wrong_key_gets_a_401_with_www_authenticate(http, known):
    for headers in ({}, _bearer("wrong"), {"Authorization": "Basic b3BzOm9wcw=="}):
        response = http.post("/v1/eta", json=known, headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="courier"')
        assert "Authorization" in response.json()["error"] or "key" in response.json()["error"]
    assert http.get("/v2/models/eta").status_code == 401
    assert http.get("/no/such/route").status_code == 401  # nothing about the routes without a key


def test_served_public_key_answers_v1_but_not_raw_inference(http, known):
    answer = http.post("/v1/eta", json=known, headers=_bearer(PUBLIC))
    assert answer.status_code == 200, answer.text
    assert answer.json()["eta_minutes"] > 0
    for method, path in (("GET", "/v2/models/eta"), ("POST", "/v2/models/eta/infer"), ("GET", "/v2/models/eta/ready")):
        refused = http.request(method, path, headers=_bearer(PUBLIC), json={})
        assert refused.status_code == 403, (path, refused.text)
        assert "internal" in refused.json()["error"]


def test_served_internal_key_gets_metadata_and_raw_inference(http):
    metadata = http.get("/v2/models/eta", headers=_bearer(INTERNAL))
    assert metadata.status_code == 200, metadata.text
    inputs = [{"name": spec["name"], "datatype": spec["datatype"], "shape": [1, *spec["shape"][1:]],
               "data": [0 if spec["datatype"].startswith("INT") else 0.0] * int(np.prod(spec["shape"][1:]))}
              for spec in metadata.json()["inputs"]]
    answer = http.post("/v2/models/eta/infer", json={"inputs": inputs}, headers=_bearer(INTERNAL))
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["name"] == "eta_minutes"


def test_served_health_and_discovery_stay_open(http):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/"):
        assert http.get(path).status_code == 200, path
    assert http.get("/openapi.json").status_code != 401


def test_served_over_the_rate_gets_429_with_retry_after_then_recovers(http, known):
    """`slow` may send 1/s with a burst of 2 per Ingress replica (2 here): a burst of 12 meets 429s, each with a
    Retry-After in whole seconds; after that long the key is admitted again."""
    statuses, retry_after = [], []
    for _ in range(12):
        response = http.post("/v1/eta", json=known, headers=_bearer(LIMITED))
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after.append(int(response.headers["Retry-After"]))
            assert "rate limit" in response.json()["error"]
    assert statuses.count(429) >= 12 - 2 * 2 - 2, statuses  # at most burst x replicas (+ refill) admitted
    assert set(statuses) <= {200, 429} and retry_after and all(r >= 1 for r in retry_after)
    assert http.post("/v1/eta", json=known, headers=_bearer(PUBLIC)).status_code == 200  # others unaffected
    time.sleep(max(retry_after) + 0.1)
    assert http.post("/v1/eta", json=known, headers=_bearer(LIMITED)).status_code == 200


def test_served_refusals_are_counted_by_reason(secured, http, known):
    http.post("/v1/eta", json=known)
    http.get("/v2/models/eta", headers=_bearer(PUBLIC))
    wanted = ('reason="missing"', 'reason="scope"')
    deadline, lines = time.monotonic() + 60, []  # Ray's metrics agent exports every few seconds
    metrics_url = secured.url.rsplit(":", 1)[0] + f":{_metrics_port(secured)}/metrics"
    while time.monotonic() < deadline:
        lines = [line for line in httpx.get(metrics_url, timeout=10).text.splitlines()
                 if line.startswith("ray_courier_auth_refusals_total")]
        if all(any(w in line for line in lines) for w in wanted):
            break
        time.sleep(2)
    assert all(any(w in line for line in lines) for w in wanted), lines
    assert any('client="city"' in line for line in lines if 'reason="scope"' in line)


def _metrics_port(service) -> int:
    argv = service.argv
    return int(argv[argv.index("--metrics-port") + 1])
