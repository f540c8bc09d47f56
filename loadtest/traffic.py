"""Realistic traffic from the simulated city: who asks what, in which mix.

A *session* is one person opening the app: they are at a delivery point of the simulated
city (taken from a real simulated order, so the spatial spread of demand is the city's),
they get one feed (`POST /v1/feed`, when that endpoint is enabled) and then check the ETA of
a few restaurants within delivery reach, popular and near ones more often, as the
simulator's own choice model does. Closed-loop runs (Locust) replay sessions with think
times; open-loop runs send the same request sequence at a fixed arrival rate (many sessions
in flight at once add up to Poisson arrivals).

The endpoints a scenario uses are listed in `loadtest/config.yaml` (`traffic.endpoints`);
adding the feed once it exists is adding `feed` to that list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from models.geo import haversine_km
from models.simulator import DELIVERY_RADIUS_KM
from serving.paths import PROJECT_ROOT

OFFLINE = PROJECT_ROOT / "data" / "offline"


@dataclass(frozen=True)
class Request:
    """One HTTP request of a scenario."""

    endpoint: str  # "eta", "feed", ...: the key reports are split by
    method: str
    path: str
    body: bytes | None


@dataclass(frozen=True)
class Session:
    """One app session: where the user is and the restaurants whose ETA they check."""

    user_id: int
    lat: float
    lon: float
    restaurants: tuple[int, ...]


def eta_request(session: Session, restaurant_id: int) -> Request:
    return Request("eta", "POST", "/v1/eta", orjson.dumps(
        {"restaurant_id": int(restaurant_id), "delivery_lat": round(session.lat, 6),
         "delivery_lon": round(session.lon, 6)}))


def feed_request(session: Session) -> Request:
    """The home feed: who is looking and from where (serving.schemas.FeedRequest; default page size)."""
    return Request("feed", "POST", "/v1/feed", orjson.dumps(
        {"user_id": int(session.user_id), "user_lat": round(session.lat, 6), "user_lon": round(session.lon, 6)}))


# How a session turns into requests, per endpoint: once per session, or once per restaurant.
ENDPOINTS: dict[str, tuple[str, Callable[..., Request]]] = {
    "feed": ("per_session", feed_request),
    "eta": ("per_restaurant", eta_request),
}


def session_requests(session: Session, endpoints: list[str]) -> list[Request]:
    """The requests one session makes, in app order (feed first, then the ETA checks)."""
    unknown = sorted(set(endpoints) - set(ENDPOINTS))
    if unknown:
        raise ValueError(f"unknown endpoints {unknown}; known: {sorted(ENDPOINTS)}")
    requests: list[Request] = []
    for name, (kind, build) in ENDPOINTS.items():  # fixed order: per-session calls come first
        if name not in endpoints:
            continue
        if kind == "per_session":
            requests.append(build(session))
        else:
            requests.extend(build(session, r) for r in session.restaurants)
    return requests


class City:
    """The simulated city's restaurants and demand, for drawing sessions."""

    def __init__(self, offline_dir: Path | str = OFFLINE, *, etas_per_session: tuple[int, int] = (1, 6),
                 seed: int = 0):
        offline_dir = Path(offline_dir)
        restaurants = pd.read_parquet(offline_dir / "restaurants.parquet")
        orders = pd.read_parquet(offline_dir / "orders.parquet",
                                 columns=["user_id", "delivery_lat", "delivery_lon", "restaurant_id"])
        self.restaurant_ids = restaurants["restaurant_id"].to_numpy()
        self.r_lat, self.r_lon = restaurants["lat"].to_numpy(), restaurants["lon"].to_numpy()
        popularity = (restaurants["true_popularity"].to_numpy() if "true_popularity" in restaurants
                      else np.ones(len(restaurants)))
        self.popularity = np.clip(popularity, 1e-3, None)
        self.points = orders[["user_id", "delivery_lat", "delivery_lon"]].to_numpy()
        self.etas_per_session = etas_per_session
        self.rng = np.random.default_rng(seed)

    def session(self) -> Session:
        """A random session: a real simulated delivery point, and restaurants in reach to check."""
        user_id, lat, lon = self.points[self.rng.integers(len(self.points))]
        dist = haversine_km(lat, lon, self.r_lat, self.r_lon)
        weight = self.popularity * np.exp(-dist / 2.0) * (dist <= DELIVERY_RADIUS_KM)
        if weight.sum() <= 0:  # nothing in reach: the user still checks the nearest one
            weight = (dist == dist.min()).astype(float)
        low, high = self.etas_per_session
        k = int(min(self.rng.integers(low, high + 1), np.count_nonzero(weight)))
        picks = self.rng.choice(len(weight), size=k, replace=False, p=weight / weight.sum())
        return Session(int(user_id), float(lat), float(lon), tuple(int(self.restaurant_ids[i]) for i in picks))

    def sessions(self) -> Iterator[Session]:
        while True:
            yield self.session()

    def request_stream(self, n: int, endpoints: list[str]) -> list[Request]:
        """The first n requests of back-to-back sessions: the mix of an open-loop run."""
        out: list[Request] = []
        for session in self.sessions():
            out.extend(session_requests(session, endpoints))
            if len(out) >= n:
                return out[:n]
        return out


def city_from_config(traffic: dict[str, Any], seed: int = 0) -> City:
    low, high = traffic.get("etas_per_session", [1, 6])
    return City(traffic.get("offline_dir") or OFFLINE, etas_per_session=(int(low), int(high)), seed=seed)
