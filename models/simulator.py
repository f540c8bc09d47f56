"""The city simulator: restaurants, users, couriers and orders, with the truth kept.

Delivery time is produced by a stated process (all times in minutes, clock in UTC):

    prep    = restaurant.prep_base + LOAD_MINUTES_PER_ORDER * restaurant_open_orders_15m
    travel  = 60 * (ROAD_FACTOR * haversine_km + ROAD_EXTRA_KM) / speed_kmh(hour, weekday)
    wait    = WAIT_BASE + WAIT_PER_CONGESTION * min(area_congestion, CONGESTION_CAP)
    actual  = prep + travel + wait + N(0, PREP_NOISE) + N(0, TRAVEL_NOISE)

Load and congestion are read from the 5-minute snapshots the feature pipeline
publishes (the latest one at or before the order), so the features carry all of
the signal and the noise floor is exactly the noise. `true_eta_minutes` (the
expectation without noise) is written next to the label and is never a feature.

Feed sessions, impressions and their feature snapshots come from `models.sessions`,
drawn from their own random generator so the orders above do not depend on them.

Outputs, in `--out` (the Feast offline store), one parquet file per table.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from models.geo import CITY, area_ids, haversine_km, offset_point
from models.marketplace import (  # the city it simulates follows the marketplace's rules
    DELIVERY_RADIUS_KM,
    is_open,
)
from models.sessions import simulate_feed

SNAPSHOT = pd.Timedelta(minutes=5)
LIVE_WINDOW = pd.Timedelta(minutes=15)
PREP_STATS_WINDOW = pd.Timedelta(days=7)
LOAD_MINUTES_PER_ORDER = 2.0
ROAD_FACTOR = 1.3
ROAD_EXTRA_KM = 0.2
BASE_SPEED_KMH = 24.0
WAIT_BASE = 2.0
WAIT_PER_CONGESTION = 7.0
CONGESTION_CAP = 3.0
PREP_NOISE = 1.2
TRAVEL_NOISE = 3.0
SPONSORED_SHARE = 0.1  # restaurants running a sponsored campaign
CUISINES = ("pizza", "burgers", "sushi", "indian", "thai", "mexican", "salads", "chinese", "italian", "bakery")


@dataclass(frozen=True)
class SimulationConfig:
    """Size and seed of one simulated city. `scale` multiplies every population and rate."""

    seed: int = 7
    days: int = 21
    warmup_days: int = 7
    scale: float = 1.0
    end: str = ""  # ISO timestamp; empty means now, floored to the snapshot interval

    @property
    def n_restaurants(self) -> int:
        return max(20, int(150 * self.scale))

    @property
    def n_users(self) -> int:
        return max(200, int(3000 * self.scale))

    @property
    def n_couriers(self) -> int:
        return max(20, int(260 * self.scale))

    @property
    def orders_per_day(self) -> float:
        return 2000.0 * self.scale

    def window(self) -> tuple[pd.Timestamp, pd.Timestamp, pd.Timestamp]:
        """(start of warm-up, start of the order window, end), all UTC and snapshot-aligned."""
        end = pd.Timestamp(self.end) if self.end else pd.Timestamp(datetime.now(UTC))
        end = (end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")).floor(SNAPSHOT)
        start = end - pd.Timedelta(days=self.days)
        return start - pd.Timedelta(days=self.warmup_days), start, end


def speed_kmh(hour: np.ndarray, weekday: np.ndarray) -> np.ndarray:
    """Courier speed by fractional hour of day and weekday (0 = Monday): slower at rush hours."""
    rush = np.exp(-(((hour - 8.5) / 1.2) ** 2)) + np.exp(-(((hour - 18.0) / 1.5) ** 2))
    weekday_factor = 1.20 - 0.60 * rush
    weekend_factor = 1.20 - 0.20 * np.exp(-(((hour - 13.0) / 3.0) ** 2))
    return BASE_SPEED_KMH * np.where(weekday >= 5, weekend_factor, weekday_factor)


def _random_points_in_disc(rng: np.random.Generator, n: int, radius_km: float) -> tuple[np.ndarray, np.ndarray]:
    r = radius_km * np.sqrt(rng.uniform(0, 1, n))
    theta = rng.uniform(0, 2 * math.pi, n)
    lat, lon = offset_point(CITY.center_lat, CITY.center_lon, r * np.cos(theta), r * np.sin(theta))
    return np.asarray(lat), np.asarray(lon)


def simulate_restaurants(rng: np.random.Generator, cfg: SimulationConfig, created: pd.Timestamp) -> pd.DataFrame:
    """Restaurants clustered around a few food hubs, with latent prep-time behaviour."""
    n = cfg.n_restaurants
    lat, lon = _random_points_in_disc(rng, n, 6.5)
    hubs_lat, hubs_lon = _random_points_in_disc(rng, 5, 4.0)
    in_hub = rng.uniform(0, 1, n) < 0.6
    hub = rng.integers(0, 5, n)
    hub_lat, hub_lon = offset_point(hubs_lat[hub], hubs_lon[hub], rng.normal(0, 0.8, n), rng.normal(0, 0.8, n))
    lat, lon = np.where(in_hub, hub_lat, lat), np.where(in_hub, hub_lon, lon)
    kind = rng.choice(3, n, p=[0.7, 0.15, 0.15])  # all day, breakfast and lunch, late night
    opens = np.array([10, 7, 17])[kind]
    closes = np.array([23, 16, 2])[kind]
    return pd.DataFrame(
        {
            "restaurant_id": np.arange(1, n + 1, dtype=np.int64),
            "lat": lat,
            "lon": lon,
            "cuisine": rng.choice(CUISINES, n),
            "price_level": rng.integers(1, 5, n).astype(np.int64),
            "opens_hour": opens.astype(np.int64),
            "closes_hour": closes.astype(np.int64),
            "event_timestamp": created,
            "true_prep_base_minutes": np.clip(rng.lognormal(math.log(12), 0.35, n), 5, 35),
            "true_popularity": rng.lognormal(0, 0.8, n),
        }
    )


def simulate_users(rng: np.random.Generator, cfg: SimulationConfig) -> pd.DataFrame:
    """Users living denser towards the centre, each with cuisine tastes."""
    n = cfg.n_users
    lat, lon = _random_points_in_disc(rng, n, CITY.radius_km * 0.9)
    tastes = rng.dirichlet(np.full(len(CUISINES), 0.4), n)
    users = pd.DataFrame({"user_id": np.arange(1, n + 1, dtype=np.int64), "home_lat": lat, "home_lon": lon})
    for i, cuisine in enumerate(CUISINES):
        users[f"true_taste_{cuisine}"] = tastes[:, i]
    return users


def simulate_couriers(rng: np.random.Generator, cfg: SimulationConfig, users: pd.DataFrame) -> pd.DataFrame:
    """Couriers based in the areas where people live, working shifts."""
    n = cfg.n_couriers
    homes = users.sample(n=n, replace=True, random_state=int(rng.integers(1 << 31)))
    return pd.DataFrame(
        {
            "courier_id": np.arange(1, n + 1, dtype=np.int64),
            "area_id": area_ids(homes["home_lat"].to_numpy(), homes["home_lon"].to_numpy()),
            "shift_start_hour": rng.choice([10, 11, 16, 17, 18], n, p=[0.25, 0.15, 0.2, 0.25, 0.15]),
            "shift_hours": rng.integers(4, 9, n),
        }
    )


def _order_times(rng: np.random.Generator, cfg: SimulationConfig, begin: pd.Timestamp, end: pd.Timestamp) -> pd.DatetimeIndex:
    """Order arrival times: lunch and dinner peaks, busier weekends."""
    minutes = np.arange(24 * 60) / 60.0
    meal_curve = 0.15 + np.exp(-(((minutes - 12.8) / 1.1) ** 2)) + 1.4 * np.exp(-(((minutes - 19.3) / 1.5) ** 2))
    meal_curve /= meal_curve.sum()
    times = []
    for day in pd.date_range(begin.floor("D"), end, freq="D"):
        count = rng.poisson(cfg.orders_per_day * (1.25 if day.weekday() >= 5 else 1.0))
        minute = rng.choice(len(meal_curve), count, p=meal_curve)
        offsets = pd.to_timedelta(minute * 60 + rng.uniform(0, 60, count), unit="s")
        times.append(day + offsets)
    stamps = pd.DatetimeIndex(np.sort(np.concatenate([t.values for t in times]))).tz_localize("UTC").floor("s")
    return stamps[(stamps >= begin) & (stamps < end)]


def _choose_restaurants(
    rng: np.random.Generator, orders: pd.DataFrame, restaurants: pd.DataFrame, users: pd.DataFrame
) -> np.ndarray:
    """Each order goes to an open restaurant within reach, by popularity, taste and distance."""
    hour = (orders["event_timestamp"].dt.hour + orders["event_timestamp"].dt.minute / 60).to_numpy()
    cuisine_index = pd.Categorical(restaurants["cuisine"], categories=CUISINES).codes
    tastes = users[[f"true_taste_{c}" for c in CUISINES]].to_numpy()
    user_row = orders["user_id"].to_numpy() - 1
    chosen = np.full(len(orders), -1, dtype=np.int64)
    for lo in tqdm(range(0, len(orders), 4096), desc="choosing restaurants", unit="batch", leave=False):
        hi = min(lo + 4096, len(orders))
        dist = haversine_km(
            orders["delivery_lat"].to_numpy()[lo:hi, None], orders["delivery_lon"].to_numpy()[lo:hi, None],
            restaurants["lat"].to_numpy()[None, :], restaurants["lon"].to_numpy()[None, :],
        )
        open_now = is_open(restaurants["opens_hour"].to_numpy()[None, :], restaurants["closes_hour"].to_numpy()[None, :],
                           np.floor(hour[lo:hi, None]))
        weight = restaurants["true_popularity"].to_numpy()[None, :] * np.exp(-dist / 2.0)
        weight *= 0.2 + tastes[user_row[lo:hi]][:, cuisine_index] * len(CUISINES)
        weight *= open_now & (dist <= DELIVERY_RADIUS_KM)
        total = weight.sum(axis=1)
        u = rng.uniform(0, 1, hi - lo) * total
        picks = (weight.cumsum(axis=1) < u[:, None]).sum(axis=1)
        chosen[lo:hi] = np.where(total > 0, restaurants["restaurant_id"].to_numpy()[np.minimum(picks, len(restaurants) - 1)], -1)
    return chosen


def _counts_in_window(event_times: np.ndarray, snapshots: np.ndarray, window: np.timedelta64) -> np.ndarray:
    """Number of events in (s - window, s] for each snapshot s; event_times sorted."""
    return np.searchsorted(event_times, snapshots, side="right") - np.searchsorted(event_times, snapshots - window, side="right")


def restaurant_load_snapshots(orders: pd.DataFrame, restaurant_ids: np.ndarray, snapshots: pd.DatetimeIndex) -> pd.DataFrame:
    """Orders taken by each kitchen in the last 15 minutes, every 5 minutes.

    Rows are written when the value changes, with a heartbeat every 10 minutes while it is
    non-zero, as a streaming job would push them; a missing value (past the 15-minute TTL) means 0.
    """
    snaps = snapshots.values
    frames = []
    times_by_restaurant = dict(tuple(orders.groupby("restaurant_id")["event_timestamp"]))
    for rid in restaurant_ids:
        times = times_by_restaurant.get(rid)
        load = np.zeros(len(snaps), dtype=np.int64) if times is None else _counts_in_window(
            np.sort(times.values), snaps, LIVE_WINDOW.to_timedelta64())
        keep = np.zeros(len(snaps), dtype=bool)
        last_value, last_index = 0, -10
        for i, value in enumerate(load):  # small loop per restaurant; the change filter is sequential
            if value != last_value or (value != 0 and i - last_index >= 2):
                keep[i], last_value, last_index = True, value, i
        frames.append(pd.DataFrame({"restaurant_id": rid, "event_timestamp": snapshots[keep], "open_orders_15m": load[keep]}))
    return pd.concat(frames, ignore_index=True)


def area_congestion_snapshots(orders: pd.DataFrame, couriers: pd.DataFrame, snapshots: pd.DatetimeIndex) -> pd.DataFrame:
    """Per delivery area, every 5 minutes: orders in the last 15 minutes against couriers on shift."""
    hours = snapshots.hour.to_numpy()
    frames = []
    areas = sorted(set(orders["area_id"]) | set(couriers["area_id"]))
    by_area = dict(tuple(orders.groupby("area_id")["event_timestamp"]))
    for area in areas:
        crew = couriers[couriers["area_id"] == area]
        on_shift = np.zeros(len(snapshots), dtype=np.int64)
        for start, length in zip(crew["shift_start_hour"], crew["shift_hours"]):
            on_shift += ((hours - start) % 24) < length
        times = by_area.get(area)
        demand = np.zeros(len(snapshots), dtype=np.int64) if times is None else _counts_in_window(
            np.sort(times.values), snapshots.values, LIVE_WINDOW.to_timedelta64())
        frames.append(pd.DataFrame({
            "area_id": area,
            "event_timestamp": snapshots,
            "area_orders_15m": demand,
            "couriers_on_shift": on_shift,
            "congestion_ratio": demand / np.maximum(on_shift, 1),
        }))
    return pd.concat(frames, ignore_index=True)


def prep_stats_snapshots(orders: pd.DataFrame, restaurant_ids: np.ndarray, days: pd.DatetimeIndex) -> pd.DataFrame:
    """Daily, per restaurant: preparation-time statistics over the trailing 7 days."""
    rows = []
    by_restaurant = dict(tuple(orders.groupby("restaurant_id")))
    for rid in restaurant_ids:
        history = by_restaurant.get(rid)
        if history is None:
            continue
        times = history["event_timestamp"].values
        prep = history["prep_minutes_observed"].to_numpy()
        for day in days:
            mask = (times >= (day - PREP_STATS_WINDOW).to_datetime64()) & (times < day.to_datetime64())
            if mask.any():
                rows.append((rid, day, float(prep[mask].mean()), float(np.quantile(prep[mask], 0.9)), int(mask.sum())))
    return pd.DataFrame(rows, columns=["restaurant_id", "event_timestamp", "prep_time_mean_7d", "prep_time_p90_7d", "orders_7d"])


def _latest_snapshot_values(events: pd.DataFrame, table: pd.DataFrame, key: str, column: str) -> np.ndarray:
    """For each event, the table's value at the latest snapshot at or before it (0 past the TTL)."""
    left = events[[key, "event_timestamp"]].reset_index().sort_values("event_timestamp")
    right = table[[key, "event_timestamp", column]].sort_values("event_timestamp")
    joined = pd.merge_asof(left, right, on="event_timestamp", by=key, direction="backward", tolerance=LIVE_WINDOW)
    return joined.set_index("index").sort_index()[column].fillna(0).to_numpy()


def simulate(cfg: SimulationConfig, out: Path) -> dict:
    """Run the whole simulation and write the offline store into `out`. Returns the summary."""
    rng = np.random.default_rng(cfg.seed)
    warmup_start, start, end = cfg.window()
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=7, desc="simulating city", unit="step")

    restaurants = simulate_restaurants(rng, cfg, warmup_start - pd.Timedelta(days=1))
    users = simulate_users(rng, cfg)
    couriers = simulate_couriers(rng, cfg, users)
    steps.update()

    times = _order_times(rng, cfg, warmup_start, end)
    user_ids = rng.integers(1, cfg.n_users + 1, len(times))
    home = users.set_index("user_id").loc[user_ids]
    jitter = rng.uniform(0, 0.3, len(times)), rng.uniform(0, 2 * math.pi, len(times))
    d_lat, d_lon = offset_point(home["home_lat"].to_numpy(), home["home_lon"].to_numpy(),
                                jitter[0] * np.cos(jitter[1]), jitter[0] * np.sin(jitter[1]))
    orders = pd.DataFrame({"event_timestamp": times, "user_id": user_ids, "delivery_lat": d_lat, "delivery_lon": d_lon})
    orders["restaurant_id"] = _choose_restaurants(rng, orders, restaurants, users)
    orders = orders[orders["restaurant_id"] > 0].reset_index(drop=True)
    orders.insert(0, "order_id", np.arange(1, len(orders) + 1, dtype=np.int64))
    orders["area_id"] = area_ids(orders["delivery_lat"].to_numpy(), orders["delivery_lon"].to_numpy())
    steps.update()

    snapshots = pd.date_range(warmup_start, end, freq=SNAPSHOT)
    load = restaurant_load_snapshots(orders, restaurants["restaurant_id"].to_numpy(), snapshots)
    steps.update()
    congestion = area_congestion_snapshots(orders, couriers, snapshots)
    steps.update()

    rest = restaurants.set_index("restaurant_id").loc[orders["restaurant_id"]]
    hour = (orders["event_timestamp"].dt.hour + orders["event_timestamp"].dt.minute / 60).to_numpy()
    weekday = orders["event_timestamp"].dt.weekday.to_numpy()
    distance = haversine_km(rest["lat"].to_numpy(), rest["lon"].to_numpy(), orders["delivery_lat"], orders["delivery_lon"])
    kitchen_load = _latest_snapshot_values(orders, load, "restaurant_id", "open_orders_15m")
    area_congestion = _latest_snapshot_values(orders, congestion, "area_id", "congestion_ratio")
    orders["true_prep_minutes"] = rest["true_prep_base_minutes"].to_numpy() + LOAD_MINUTES_PER_ORDER * kitchen_load
    orders["true_travel_minutes"] = 60 * (ROAD_FACTOR * distance + ROAD_EXTRA_KM) / speed_kmh(hour, weekday)
    orders["true_wait_minutes"] = WAIT_BASE + WAIT_PER_CONGESTION * np.minimum(area_congestion, CONGESTION_CAP)
    orders["true_eta_minutes"] = orders["true_prep_minutes"] + orders["true_travel_minutes"] + orders["true_wait_minutes"]
    prep_noise = rng.normal(0, PREP_NOISE, len(orders))
    orders["prep_minutes_observed"] = orders["true_prep_minutes"] + prep_noise
    orders["delivery_minutes"] = orders["true_eta_minutes"] + prep_noise + rng.normal(0, TRAVEL_NOISE, len(orders))
    steps.update()

    prep_stats = prep_stats_snapshots(orders, restaurants["restaurant_id"].to_numpy(),
                                      pd.date_range(warmup_start.ceil("D"), end, freq="D"))
    steps.update()
    # campaigns have their own generator too: sponsorship changes nothing else
    restaurants["sponsored"] = np.random.default_rng([cfg.seed, 2]).uniform(size=len(restaurants)) < SPONSORED_SHARE
    # the feed has its own generator: the order stream above stays identical with or without it
    feed = simulate_feed(np.random.default_rng([cfg.seed, 1]), restaurants, users, orders, warmup_start, end,
                         cfg.scale, DELIVERY_RADIUS_KM)
    steps.update()
    steps.close()

    tables = {"restaurants": restaurants, "users": users, "couriers": couriers, "orders": orders,
              "restaurant_load": load, "area_congestion": congestion, "restaurant_prep_stats": prep_stats, **feed}
    for name, table in tables.items():
        table.to_parquet(out / f"{name}.parquet", index=False)
    summary = {
        "config": asdict(cfg),
        "warmup_start": warmup_start.isoformat(),
        "start": start.isoformat(),
        "end": end.isoformat(),
        "rows": {name: len(table) for name, table in tables.items()},
        "feed_positive_rate": float(feed["impressions"]["ordered"].mean()),
    }
    (out / "simulation.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m models.simulator --out data/offline [--scale 4]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/offline"), help="folder for the parquet files")
    parser.add_argument("--seed", type=int, default=SimulationConfig.seed)
    parser.add_argument("--days", type=int, default=SimulationConfig.days, help="days of orders after warm-up")
    parser.add_argument("--scale", type=float, default=SimulationConfig.scale, help="multiplies every population and rate")
    parser.add_argument("--end", default="", help="ISO end time (UTC); default now, so live features are fresh")
    args = parser.parse_args(argv)
    if args.days < 2 or args.scale <= 0:
        parser.error("--days must be at least 2 and --scale positive")
    summary = simulate(SimulationConfig(seed=args.seed, days=args.days, scale=args.scale, end=args.end), args.out)
    print(json.dumps(summary["rows"]), "->", args.out)


if __name__ == "__main__":
    main()
