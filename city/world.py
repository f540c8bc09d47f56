"""The live city's world: its people and kitchens, what they order, and what is true.

Loaded from a simulated city (`<data_dir>/offline/*.parquet` and `simulation.json`), it runs the
simulator's two processes live, on the wall clock (time of day is UTC now) compressed by a
speed S (durations / S, rates x S):

    orders    arrivals at orders_per_day * scale per world day on the simulator's meal curve
              (`models.simulator._order_times`), a user at home + up to 300 m, the restaurant
              chosen like the simulator (`_choose_restaurants`); the delivery truth follows the
              simulator's formula with the latest 5-minute snapshot of kitchen load and area
              congestion, plus its noise
    sessions  feed sessions at SESSIONS_PER_DAY * scale per world day (`models.sessions.session_times`);
              each shown card is ordered with the true p_order = examine(position) * sigmoid(relevance)
    snapshots every 5 world-minutes, the city's own orders of the last 15 world-minutes counted per
              kitchen and per delivery area (`restaurant_load_snapshots`, `area_congestion_snapshots`)

Scenarios: normal, rain (travel x1.3), new-restaurants (10 % more restaurants with slower
kitchens), taste-shift (users' cuisine tastes move). Times are epoch seconds (UTC) throughout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from models.geo import area_ids, haversine_km, offset_point
from models.sessions import PROCESS, SESSIONS_PER_DAY, examine, relevance, session_times
from models.simulator import (
    CONGESTION_CAP,
    CUISINES,
    DELIVERY_RADIUS_KM,
    LIVE_WINDOW,
    LOAD_MINUTES_PER_ORDER,
    PREP_NOISE,
    ROAD_EXTRA_KM,
    ROAD_FACTOR,
    SNAPSHOT,
    TRAVEL_NOISE,
    WAIT_BASE,
    WAIT_PER_CONGESTION,
    SimulationConfig,
    _choose_restaurants,
    _order_times,
    area_congestion_snapshots,
    is_open,
    restaurant_load_snapshots,
    simulate_restaurants,
    speed_kmh,
)

SCENARIOS = ("normal", "rain", "new-restaurants", "taste-shift")
RAIN_TRAVEL_FACTOR = 1.3
NEW_RESTAURANT_SHARE = 0.10
NEW_KITCHEN_SLOWDOWN = 1.5  # a new kitchen prepares 50 % slower than the simulator's draw
TASTE_SHIFT = 0.75  # weight of the new tastes in a shifted user's cuisine mix
SESSION_MINUTES = 2.0  # world minutes from opening the feed to the session's end (its outcome)
HOME_JITTER_KM = 0.3  # orders and sessions happen at home + up to 300 m, as in the simulator
TASTES = [f"true_taste_{c}" for c in CUISINES]
_DAY = pd.Timedelta(days=1)


def epoch(times: pd.DatetimeIndex) -> np.ndarray:
    """Epoch seconds (float) of aware timestamps."""
    return times.as_unit("ns").asi8 / 1e9


def stamp(seconds: float) -> pd.Timestamp:
    """The UTC timestamp of epoch seconds."""
    return pd.Timestamp(seconds, unit="s", tz="UTC")


def delivery_truth(prep_base: np.ndarray, distance_km: np.ndarray, when: pd.DatetimeIndex, load: np.ndarray,
                   congestion: np.ndarray, travel_factor: float = 1.0) -> dict[str, np.ndarray]:
    """The simulator's delivery process without noise (minutes): prep, travel, wait and their sum (eta)."""
    hour = (when.hour + when.minute / 60).to_numpy()
    prep = np.asarray(prep_base, dtype=np.float64) + LOAD_MINUTES_PER_ORDER * np.asarray(load, dtype=np.float64)
    travel = travel_factor * 60 * (ROAD_FACTOR * np.asarray(distance_km) + ROAD_EXTRA_KM) / speed_kmh(
        hour, when.weekday.to_numpy())
    wait = WAIT_BASE + WAIT_PER_CONGESTION * np.minimum(np.asarray(congestion, dtype=np.float64), CONGESTION_CAP)
    return {"prep": prep, "travel": travel, "wait": wait, "eta": prep + travel + wait}


class ArrivalStream:
    """Arrival times of one of the simulator's processes, drawn a calendar day at a time, taken as time passes."""

    def __init__(self, draw: Callable[[float, float], np.ndarray]):
        self.draw = draw
        self.cursor: float | None = None  # arrivals before it are drawn
        self.pending = np.zeros(0)

    def start(self, at: float) -> None:
        """Begin the stream at `at` (nothing before it arrives)."""
        self.cursor, self.pending = at, np.zeros(0)

    def take(self, until: float) -> np.ndarray:
        """Every arrival in (last taken, until], sorted."""
        if self.cursor is None:
            self.start(until)
        while self.cursor < until:
            day_end = (stamp(self.cursor).floor("D") + _DAY).timestamp()
            self.pending = np.concatenate([self.pending, self.draw(self.cursor, day_end)])
            self.cursor = day_end
        cut = int(np.searchsorted(self.pending, until, side="right"))
        taken, self.pending = self.pending[:cut], self.pending[cut:]
        return taken


@dataclass(frozen=True)
class _NewRestaurants(SimulationConfig):
    """A config that makes `simulate_restaurants` draw `count` restaurants (its minimum is 20)."""

    count: int = 1

    @property
    def n_restaurants(self) -> int:
        return self.count


@dataclass
class Snapshot:
    """One 5-minute snapshot of the live features, as pushed to the online store."""

    ts: float
    load: pd.DataFrame  # restaurant_id, open_orders_15m (every active restaurant)
    congestion: pd.DataFrame  # area_id, area_orders_15m, couriers_on_shift, congestion_ratio (every known area)


class World:
    """The state and truth of the live city (module doc); all methods take times in epoch seconds."""

    def __init__(self, restaurants: pd.DataFrame, users: pd.DataFrame, couriers: pd.DataFrame,
                 config: SimulationConfig, speed: float = 1.0, seed: int = 0, areas: list[str] | None = None):
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if not np.array_equal(users["user_id"].to_numpy(), np.arange(1, len(users) + 1)):
            raise ValueError("users must be numbered 1..n in order, as the simulator writes them")
        self.config, self.speed, self.seed = config, float(speed), seed
        self.base_restaurants = restaurants.assign(sponsored=restaurants.get("sponsored", False)).reset_index(drop=True)
        self.base_users = users.reset_index(drop=True)
        self.couriers = couriers
        self.rng = np.random.default_rng([seed, 0])
        order_rng, session_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
        # S copies of a Poisson process superpose into one at S times the rate: the simulator's own draw
        fast = replace(config, scale=config.scale * self.speed)
        self.orders = ArrivalStream(lambda b, e: epoch(_order_times(order_rng, fast, stamp(b), _before(e))))
        self.sessions = ArrivalStream(lambda b, e: epoch(session_times(
            session_rng, SESSIONS_PER_DAY * config.scale * self.speed, stamp(b), _before(e))))
        self.known_areas = sorted(set(couriers["area_id"]) | set(areas or []))
        self._recent = pd.DataFrame({"ts": np.zeros(0), "restaurant_id": np.zeros(0, np.int64),
                                     "area_id": np.zeros(0, object)})
        self._load: dict[int, int] = {}
        self._congestion: dict[str, float] = {}
        self._new: pd.DataFrame | None = None
        self._shifted: pd.DataFrame | None = None
        self.set_scenario("normal")

    @classmethod
    def load(cls, data_dir: Path | str, speed: float = 1.0, seed: int = 0) -> World:
        """The world of the simulated city in `<data_dir>/offline`."""
        offline = Path(data_dir) / "offline"
        summary = offline / "simulation.json"
        if not summary.exists():
            raise FileNotFoundError(f"{summary} is missing: simulate the city first (`make data`)")
        config = SimulationConfig(**json.loads(summary.read_text())["config"])
        areas = pd.read_parquet(offline / "area_congestion.parquet", columns=["area_id"])["area_id"].unique()
        return cls(pd.read_parquet(offline / "restaurants.parquet"), pd.read_parquet(offline / "users.parquet"),
                   pd.read_parquet(offline / "couriers.parquet"), config, speed, seed, list(areas))

    # -- the compressed clock ---------------------------------------------------------------------

    def wall_seconds(self, world_minutes: float | np.ndarray) -> float | np.ndarray:
        """Wall seconds that `world_minutes` take at this speed."""
        return np.asarray(world_minutes) * 60.0 / self.speed

    @property
    def window_s(self) -> float:
        """The 15-minute live window, in wall seconds."""
        return LIVE_WINDOW.total_seconds() / self.speed

    @property
    def snapshot_s(self) -> float:
        """The 5-minute snapshot cadence, in wall seconds."""
        return SNAPSHOT.total_seconds() / self.speed

    # -- scenarios --------------------------------------------------------------------------------

    def set_scenario(self, name: str) -> None:
        """Switch the world to a scenario (SCENARIOS); takes effect for the next order or session."""
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}: choose one of {', '.join(SCENARIOS)}")
        self.scenario = name
        self.travel_factor = RAIN_TRAVEL_FACTOR if name == "rain" else 1.0
        self.restaurants = (pd.concat([self.base_restaurants, self.new_restaurants], ignore_index=True)
                            if name == "new-restaurants" else self.base_restaurants)
        self.users = self.shifted_users if name == "taste-shift" else self.base_users
        self._index = pd.Index(self.restaurants["restaurant_id"])
        self._cuisine = pd.Categorical(self.restaurants["cuisine"], categories=CUISINES).codes
        self._tastes = self.users[TASTES].to_numpy()

    @property
    def new_restaurants(self) -> pd.DataFrame:
        """The restaurants that open in the new-restaurants scenario: 10 % more, slower kitchens (fixed by the seed)."""
        if self._new is None:
            base = self.base_restaurants
            count = max(1, math.ceil(NEW_RESTAURANT_SHARE * len(base)))
            new = simulate_restaurants(np.random.default_rng([self.seed, 3]), _NewRestaurants(count=count),
                                       base["event_timestamp"].max())
            new["restaurant_id"] += int(base["restaurant_id"].max())
            new["true_prep_base_minutes"] *= NEW_KITCHEN_SLOWDOWN
            self._new = new.assign(sponsored=False)[base.columns]
        return self._new

    @property
    def shifted_users(self) -> pd.DataFrame:
        """Users whose cuisine tastes moved towards new, random ones (the taste-shift scenario)."""
        if self._shifted is None:
            fresh = np.random.default_rng([self.seed, 4]).dirichlet(np.full(len(CUISINES), 0.4), len(self.base_users))
            shifted = self.base_users.copy()
            shifted[TASTES] = (1 - TASTE_SHIFT) * shifted[TASTES].to_numpy() + TASTE_SHIFT * fresh
            self._shifted = shifted
        return self._shifted

    # -- orders -----------------------------------------------------------------------------------

    def start(self, now: float, warm_up: bool = True) -> None:
        """Start both streams at `now`; with warm_up, the last 15 world-minutes of orders fill the windows."""
        if warm_up:
            past = ArrivalStream(self.orders.draw)
            past.start(now - self.window_s)
            self.place_orders(past.take(now))
        self.orders.start(now)
        self.sessions.start(now)

    def _homes(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n random users and a point within 300 m of each one's home."""
        user_ids = self.rng.integers(1, len(self.users) + 1, n).astype(np.int64)
        home = self.users.iloc[user_ids - 1]
        r, theta = self.rng.uniform(0, HOME_JITTER_KM, n), self.rng.uniform(0, 2 * math.pi, n)
        lat, lon = offset_point(home["home_lat"].to_numpy(), home["home_lon"].to_numpy(),
                                r * np.cos(theta), r * np.sin(theta))
        return user_ids, np.asarray(lat), np.asarray(lon)

    def place_orders(self, times: np.ndarray) -> pd.DataFrame:
        """Orders arriving at `times`: who, where, which restaurant, and their delivery truth.

        Orders no restaurant can take (none open within reach) are dropped, as in the simulator.
        The rest join the kitchen-load and congestion windows.
        """
        user_ids, lat, lon = self._homes(len(times))
        orders = pd.DataFrame({"ts": np.asarray(times, dtype=np.float64), "user_id": user_ids,
                               "event_timestamp": pd.to_datetime(np.asarray(times), unit="s", utc=True),
                               "delivery_lat": lat, "delivery_lon": lon})
        if len(orders):
            orders["restaurant_id"] = _choose_restaurants(self.rng, orders, self.restaurants, self.users)
        else:
            orders["restaurant_id"] = np.zeros(0, np.int64)
        orders = orders[orders["restaurant_id"] > 0].reset_index(drop=True)
        orders["area_id"] = area_ids(orders["delivery_lat"].to_numpy(), orders["delivery_lon"].to_numpy())
        rest = self.restaurants.iloc[self._index.get_indexer(orders["restaurant_id"])]
        distance = haversine_km(rest["lat"].to_numpy(), rest["lon"].to_numpy(), orders["delivery_lat"].to_numpy(),
                                orders["delivery_lon"].to_numpy())
        load = np.array([self._load.get(r, 0) for r in orders["restaurant_id"]], dtype=np.float64)
        congestion = np.array([self._congestion.get(a, 0.0) for a in orders["area_id"]], dtype=np.float64)
        truth = delivery_truth(rest["true_prep_base_minutes"].to_numpy(), distance,
                               pd.DatetimeIndex(orders["event_timestamp"]), load, congestion, self.travel_factor)
        for part in ("prep", "travel", "wait", "eta"):
            orders[f"true_{part}_minutes"] = truth[part]
        n = len(orders)
        orders["delivered_minutes"] = truth["eta"] + self.rng.normal(0, PREP_NOISE, n) + self.rng.normal(
            0, TRAVEL_NOISE, n)
        orders["scenario"] = self.scenario
        self._remember(orders)
        return orders

    def _remember(self, orders: pd.DataFrame) -> None:
        """Keep the orders of the last live window (by the newest order seen) for the snapshots."""
        recent = pd.concat([self._recent, orders[["ts", "restaurant_id", "area_id"]]], ignore_index=True)
        if len(recent):
            recent = recent[recent["ts"] > recent["ts"].max() - self.window_s]
        self._recent = recent.reset_index(drop=True)

    # -- the live features ------------------------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        """The live features at `now`, computed by the simulator's snapshot functions; becomes the truth's input.

        Each recent order's age is stretched by S, so the simulator's 15-minute window holds the
        last 15 world-minutes of the city's orders; couriers on shift follow the wall clock's hour.
        """
        recent = self._recent[(self._recent["ts"] > now - self.window_s) & (self._recent["ts"] <= now)]
        when = stamp(now)
        aged = recent.assign(event_timestamp=when - pd.to_timedelta((now - recent["ts"]) * self.speed, unit="s"))
        at = pd.DatetimeIndex([when])
        ids = self.restaurants["restaurant_id"].to_numpy()
        load = pd.Series(0, index=ids, dtype=np.int64)
        if len(aged):
            busy = restaurant_load_snapshots(aged, np.unique(aged["restaurant_id"]), at)
            busy = busy[busy["restaurant_id"].isin(ids)]  # kitchens closed since (a scenario ended)
            load.loc[busy["restaurant_id"].to_numpy()] = busy["open_orders_15m"].to_numpy()
        congestion = area_congestion_snapshots(aged, self.couriers, at).drop(columns="event_timestamp")
        quiet = sorted(set(self.known_areas) - set(congestion["area_id"]))  # no couriers, no recent orders
        congestion = pd.concat([congestion, pd.DataFrame({"area_id": quiet, "area_orders_15m": 0,
                                                          "couriers_on_shift": 0, "congestion_ratio": 0.0})],
                               ignore_index=True)
        self.known_areas = sorted(set(self.known_areas) | set(congestion["area_id"]))
        self._load = dict(zip(load.index.tolist(), load.tolist()))
        self._congestion = dict(zip(congestion["area_id"], congestion["congestion_ratio"].astype(float)))
        return Snapshot(now, pd.DataFrame({"restaurant_id": ids, "open_orders_15m": load.to_numpy()}),
                        congestion.astype({"area_orders_15m": np.int64, "couriers_on_shift": np.int64,
                                           "congestion_ratio": np.float64}))

    # -- feed sessions ----------------------------------------------------------------------------

    def open_sessions(self, times: np.ndarray) -> pd.DataFrame:
        """Feed sessions starting at `times`: a user at home (+ up to 300 m)."""
        user_ids, lat, lon = self._homes(len(times))
        return pd.DataFrame({"ts": np.asarray(times, dtype=np.float64), "user_id": user_ids,
                             "user_lat": lat, "user_lon": lon})

    def feed_decisions(self, user_id: int, user_lat: float, user_lon: float, ts: float,
                       restaurant_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(true p_order, ordered) of the cards shown at positions 1..n.

        p_order = examine(position) * sigmoid(relevance) (models.sessions); a card the user
        cannot order from (unknown, closed now, or beyond delivery reach) has p_order 0.
        """
        n = len(restaurant_ids)
        p = np.zeros(n)
        rows = self._index.get_indexer(pd.Index(restaurant_ids, dtype=np.int64)) if n else np.zeros(0, np.int64)
        known = np.flatnonzero(rows >= 0)
        if 1 <= user_id <= len(self.users) and len(known):
            rest, when = self.restaurants.iloc[rows[known]], stamp(ts)
            hour = when.hour + when.minute / 60
            cuisine = self._cuisine[rows[known]]
            km = haversine_km(user_lat, user_lon, rest["lat"].to_numpy(), rest["lon"].to_numpy())
            logit = relevance(rest["true_popularity"].to_numpy(), self._tastes[user_id - 1, cuisine], km,
                              rest["price_level"].to_numpy(), hour, cuisine, PROCESS)
            reachable = is_open(rest["opens_hour"].to_numpy(), rest["closes_hour"].to_numpy(), math.floor(hour)) & (
                km <= DELIVERY_RADIUS_KM)
            p[known] = examine(known + 1) / (1.0 + np.exp(-logit)) * reachable
        return p, self.rng.uniform(0, 1, n) < p


def _before(end: float) -> pd.Timestamp:
    """Just before `end`: the simulator's day loop would otherwise also draw the day starting at a midnight end."""
    return stamp(end) - pd.Timedelta(microseconds=1)
