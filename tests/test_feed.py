"""The feed, end to end against the real Ray Serve app: behaviour a user of the app would check."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest

from models.geo import CITY, haversine_km, offset_point
from models.simulator import CUISINES, DELIVERY_RADIUS_KM, is_open
from serving.app import FeedArgs
from serving.config import load_serve_config

pytestmark = pytest.mark.integration
POLICY = FeedArgs.model_validate(load_serve_config()["applications"][0]["args"]["feed"]).sponsored


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def restaurants(city_dir) -> pd.DataFrame:
    return pd.read_parquet(city_dir / "offline" / "restaurants.parquet").set_index("restaurant_id")


@pytest.fixture(scope="module")
def users(city_dir) -> pd.DataFrame:
    return pd.read_parquet(city_dir / "offline" / "users.parquet").set_index("user_id")


def feed(client, user_id: int, lat: float, lon: float, when: str = "2026-11-19T19:00:00Z", **extra) -> dict:
    response = client.post("/v1/feed", json={"user_id": user_id, "user_lat": lat, "user_lon": lon,
                                            "request_time": when, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def home(users: pd.DataFrame, user_id: int) -> tuple[float, float]:
    return float(users.loc[user_id, "home_lat"]), float(users.loc[user_id, "home_lon"])


def test_feed_returns_ranked_cards_with_eta_and_versions(client, users):
    """Cards carry id, score, p_order, ETA and the sponsored flag; organic cards are in score order."""
    answer = feed(client, 1, *home(users, 1), page_size=10)
    cards = answer["cards"]
    assert 0 < len(cards) <= 10
    assert set(cards[0]) == {"restaurant_id", "score", "p_order", "eta_minutes", "sponsored"}
    organic = [c["score"] for c in cards if not c["sponsored"]]
    assert organic == sorted(organic, reverse=True)
    assert all(0 <= c["p_order"] <= 1 and c["eta_minutes"] > 0 for c in cards)
    assert set(answer["model_versions"]) == {"retrieval", "ranker", "eta"}
    assert answer["variants"] == {"ranker": "champion", "eta": "champion"}


def test_a_closed_restaurant_never_appears(client, users, restaurants):
    """At 08:30 only the breakfast places are open: every card is open then."""
    for user_id in (1, 2, 3, 4, 5):
        cards = feed(client, user_id, *home(users, user_id), when="2026-11-19T08:30:00Z", page_size=50)["cards"]
        shown = restaurants.loc[[c["restaurant_id"] for c in cards]]
        assert is_open(shown["opens_hour"].to_numpy(), shown["closes_hour"].to_numpy(), 8).all()
    assert (~is_open(restaurants["opens_hour"].to_numpy(), restaurants["closes_hour"].to_numpy(), 8)).any()


def test_a_restaurant_outside_the_delivery_radius_never_appears(client, restaurants):
    """From the edge of the city, every card is within the delivery radius, though farther ones exist."""
    lat, lon = offset_point(CITY.center_lat, CITY.center_lon, 0.0, CITY.radius_km - 0.5)
    cards = feed(client, 1, lat, lon, page_size=50)["cards"]
    shown = restaurants.loc[[c["restaurant_id"] for c in cards]]
    assert (haversine_km(lat, lon, shown["lat"], shown["lon"]) <= DELIVERY_RADIUS_KM).all()
    assert (haversine_km(lat, lon, restaurants["lat"], restaurants["lon"]) > DELIVERY_RADIUS_KM).any()


def test_a_strong_taste_shows_in_the_feed(client, users, restaurants):
    """Users who love one cuisine see more of it in their top cards than the population's feeds show."""
    tastes = users[[f"true_taste_{c}" for c in CUISINES]].rename(columns=lambda c: c.removeprefix("true_taste_"))
    strong = tastes[tastes.max(axis=1) > 0.6].head(25)

    def top_cuisines(user_id) -> list[str]:
        cards = feed(client, int(user_id), *home(users, user_id), page_size=5)["cards"]
        return [restaurants.loc[c["restaurant_id"], "cuisine"] for c in cards if not c["sponsored"]]

    population = pd.Series([c for u in users.index[:40] for c in top_cuisines(u)]).value_counts(normalize=True)
    hits = shown = 0
    expected = []
    for user_id in strong.index:
        favourite = strong.loc[user_id].idxmax()
        cuisines = top_cuisines(user_id)
        hits, shown = hits + cuisines.count(favourite), shown + len(cuisines)
        expected.extend([population.get(favourite, 0.0)] * len(cuisines))
    strong_share, population_share = hits / shown, float(np.mean(expected))
    assert strong_share > 1.5 * population_share, (strong_share, population_share)


def test_farther_restaurant_gets_a_longer_eta_on_its_card(client, restaurants):
    """All else equal (same restaurant, time and defaulted live features), farther means longer."""
    rid = int(restaurants.index[0])
    here = restaurants.loc[rid]
    etas = []
    for km in (0.8, 2.5, 4.5):
        lat, lon = offset_point(float(here.lat), float(here.lon), 0.0, km if here.lon < CITY.center_lon else -km)
        cards = {c["restaurant_id"]: c for c in feed(client, 1, lat, lon, page_size=50)["cards"]}
        if rid not in cards:
            pytest.fail(f"restaurant {rid} missing from a full page at {km} km: {sorted(cards)}")
        etas.append(cards[rid]["eta_minutes"])
    assert etas == sorted(etas) and etas[0] < etas[-1], etas


def test_sponsored_cards_obey_the_policy(client, users):
    """Sponsored cards sit only in the policy's slots, no more than its cap, above its relevance floor."""
    seen = 0
    for user_id in range(1, 21):
        cards = feed(client, user_id, *home(users, user_id), page_size=20)["cards"]
        positions = [i + 1 for i, c in enumerate(cards) if c["sponsored"]]
        assert set(positions) <= set(POLICY.slots)
        assert len(positions) <= POLICY.max_per_page
        assert all(c["p_order"] >= POLICY.min_p_order for c in cards if c["sponsored"])
        ids = [c["restaurant_id"] for c in cards]
        assert len(ids) == len(set(ids))
        seen += len(positions)
    assert seen > 0, "no sponsored card in 20 feeds: the policy was never exercised"


def test_unknown_user_gets_a_cold_start_feed(client):
    """A user the store has never seen gets a feed, marked cold start, not an error."""
    answer = feed(client, 10_000_000, CITY.center_lat, CITY.center_lon)
    assert answer["cold_start"] is True and answer["cards"]


def test_timings_are_in_the_response_when_asked(client, users):
    """include_timings adds per-stage latency: features, retrieval, ranking, ETA, blending."""
    timings = feed(client, 1, *home(users, 1), include_timings=True)["timings_ms"]
    for stage in ("user_features", "retrieval", "ranker_features", "ranking", "ranking_and_eta_calls", "blending",
                  "total"):
        assert stage in timings and timings[stage] >= 0, stage
    assert "timings_ms" not in feed(client, 1, *home(users, 1))


BAD_FEED = [
    ("latitude", {"user_id": 1, "user_lat": 123.0, "user_lon": 4.9}, 422, "user_lat"),
    ("outside the city", {"user_id": 1, "user_lat": 40.0, "user_lon": -3.7}, 422, "user_lat,user_lon"),
    ("page size", {"user_id": 1, "user_lat": 52.37, "user_lon": 4.9, "page_size": 500}, 422, "page_size"),
    ("user id type", {"user_id": "me", "user_lat": 52.37, "user_lon": 4.9}, 422, "user_id"),
    ("missing place", {"user_id": 1}, 422, "user_lat"),
]


@pytest.mark.parametrize("case, body, status, field", BAD_FEED, ids=[c[0] for c in BAD_FEED])
def test_bad_feed_input_gets_a_4xx(client, case, body, status, field):
    """Bad feed requests are refused with the field and the rule, as on /v1/eta."""
    response = client.post("/v1/feed", json=body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


@pytest.mark.parametrize("name", ["ranker", "user_tower"])
def test_feed_models_speak_the_open_inference_protocol(client, name):
    """The ranker and the user tower have v2 metadata and answer a zero-filled inference."""
    metadata = client.get(f"/v2/models/{name}").json()
    assert metadata["name"] == name
    inputs = []
    for spec in metadata["inputs"]:
        shape = [2 if d == -1 else d for d in spec["shape"]]
        value = 1 if spec["datatype"].startswith("INT") else 0.0
        inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape,
                       "data": [value] * int(np.prod(shape))})
    response = client.post(f"/v2/models/{name}/infer", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"][0] == 2
