"""Feed sessions of the simulated city: who opens the app, what the feed shows, what gets ordered.

The stated process (the truth every feed model is judged against; clock in UTC):

    session    a user opens the app at home (+ up to 300 m), at a time drawn from a meal curve
    candidates restaurants open at that hour (`simulator.is_open`) within DELIVERY_RADIUS_KM
    feed       the app's logging policy shows up to FEED_SLOTS of them at positions 1..20,
               sampled without replacement (Gumbel-top-k = Plackett-Luce) with weights
               popularity^0.8 * exp(-0.3 * km): mostly popular and near, with exploration
    order      each impression is ordered independently with probability
                   p_order = examine(position) * sigmoid(relevance)
                   examine(position) = position ** -EXAMINE_POWER          (position bias)
                   relevance = BASE + log(popularity) + TASTE * log(0.2 + 10 * taste[cuisine])
                               - DISTANCE * km - PRICE * (price_level - 2.5) + MEAL * meal_peak(hour)
                               + DAYPART * daypart(cuisine, hour)
               daypart: bakeries in the morning, salads at lunch, pizza and burgers late at night

Relevance has the utility of the simulator's own order choice (popularity x taste x
exp(-km / 2)), so the feed and the order stream describe the same people. Every
impression keeps `true_p_order` (the oracle behind its label) and `true_p_order_at_top`
(the same restaurant shown at position 1, i.e. sigmoid(relevance)); they and the other
`true_*` columns are never features.

Daily feature snapshots are computed only from events strictly before each midnight,
as a nightly batch job would:

    restaurant_feed_stats   per restaurant: feed impressions and orders over 1 and 7 days, and
                            conversion_7d smoothed towards the city's rate of the same 7 days
    user_history            per user, over 30 days: feed sessions, orders (the order stream and
                            feed orders), the smoothed share of each cuisine among those orders
                            (the user x cuisine affinity) and the mean price level ordered

Feed orders are not appended to orders.parquet: that process is kept exactly as it was
(the ETA model is trained on it). Feed randomness comes from its own generator, so the
order stream is byte-identical with or without the feed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from models.geo import haversine_km, offset_point

# constants shared with the order process live in models.simulator; imported lazily there
FEED_SLOTS = 20
SESSIONS_PER_DAY = 800.0
EXAMINE_POWER = 0.5
STATS_WINDOWS_DAYS = (1, 7)
USER_WINDOW = pd.Timedelta(days=30)
# conversion_7d = (orders + CONVERSION_PRIOR_IMPRESSIONS * city rate) / (impressions + CONVERSION_PRIOR_IMPRESSIONS)
CONVERSION_PRIOR_IMPRESSIONS = 100.0
# taste share = (orders of the cuisine + TASTE_PRIOR_ORDERS / n_cuisines) / (orders + TASTE_PRIOR_ORDERS)
TASTE_PRIOR_ORDERS = 2.0
DEFAULT_PRICE_LEVEL = 2.5
_BATCH = 2048


@dataclass(frozen=True)
class FeedProcess:
    """Coefficients of the feed's logging policy and of the true order probability."""

    base: float = -1.8
    taste: float = 0.7
    distance_per_km: float = 0.6
    price: float = 0.15
    meal: float = 0.4
    daypart: float = 1.0
    policy_popularity: float = 0.8
    policy_distance_per_km: float = 0.3


PROCESS = FeedProcess()


def examine(position: np.ndarray) -> np.ndarray:
    """Probability that a card at `position` (1-based) is looked at: 1 at the top, then falling."""
    return np.asarray(position, dtype=np.float64) ** -EXAMINE_POWER


def meal_peak(hour: np.ndarray) -> np.ndarray:
    """1 at the lunch and dinner peaks, ~0 in between: people open the app to eat then."""
    return np.exp(-(((hour - 12.8) / 1.1) ** 2)) + np.exp(-(((hour - 19.3) / 1.5) ** 2))


def _bump(hour: np.ndarray, center: float, width: float) -> np.ndarray:
    """A bump around `center` o'clock on the 24-hour circle."""
    gap = (hour - center + 12.0) % 24.0 - 12.0
    return np.exp(-((gap / width) ** 2))


def daypart(cuisine: np.ndarray, hour: np.ndarray) -> np.ndarray:
    """Cuisine x time of day: bakeries in the morning, salads at lunch, pizza and burgers late."""
    from models.simulator import CUISINES

    code = np.asarray(cuisine)
    effect = np.zeros(np.broadcast_shapes(code.shape, np.shape(hour)))
    effect = effect + np.where(code == CUISINES.index("bakery"), _bump(hour, 8.5, 1.5), 0.0)
    effect = effect + np.where(code == CUISINES.index("salads"), 0.7 * _bump(hour, 12.5, 1.2), 0.0)
    late = _bump(hour, 23.0, 1.5)
    effect = effect + np.where((code == CUISINES.index("pizza")) | (code == CUISINES.index("burgers")), 0.7 * late, 0.0)
    return effect


def relevance(
    popularity: np.ndarray,
    taste: np.ndarray,
    km: np.ndarray,
    price_level: np.ndarray,
    hour: np.ndarray,
    cuisine: np.ndarray,
    process: FeedProcess = PROCESS,
) -> np.ndarray:
    """The true relevance logit of a restaurant for a user (module doc); arrays broadcast.

    `cuisine` is the index in simulator.CUISINES.
    """
    return (
        process.base
        + np.log(popularity)
        + process.taste * np.log(0.2 + 10.0 * taste)
        - process.distance_per_km * km
        - process.price * (price_level - 2.5)
        + process.meal * meal_peak(hour)
        + process.daypart * daypart(cuisine, hour)
    )


def session_times(rng: np.random.Generator, per_day: float, begin: pd.Timestamp, end: pd.Timestamp) -> pd.DatetimeIndex:
    """Session start times (UTC, whole seconds): a meal curve, busier weekends."""
    minutes = np.arange(24 * 60) / 60.0
    curve = 0.2 + meal_peak(minutes)
    curve /= curve.sum()
    times = []
    for day in pd.date_range(begin.floor("D"), end, freq="D"):
        count = rng.poisson(per_day * (1.25 if day.weekday() >= 5 else 1.0))
        minute = rng.choice(len(curve), count, p=curve)
        times.append(day + pd.to_timedelta(minute * 60 + rng.uniform(0, 60, count), unit="s"))
    stamps = pd.DatetimeIndex(np.sort(np.concatenate([t.values for t in times]))).tz_localize("UTC").floor("s")
    return stamps[(stamps >= begin) & (stamps < end)]


def _gumbel_top_k(rng: np.random.Generator, log_weight: np.ndarray, k: int) -> np.ndarray:
    """Indices of k items per row sampled without replacement ∝ exp(log_weight) (-inf = never)."""
    keys = log_weight + rng.gumbel(size=log_weight.shape)
    top = np.argpartition(-keys, kth=min(k, keys.shape[1] - 1), axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def simulate_impressions(
    rng: np.random.Generator,
    restaurants: pd.DataFrame,
    users: pd.DataFrame,
    begin: pd.Timestamp,
    end: pd.Timestamp,
    sessions_per_day: float,
    radius_km: float,
    process: FeedProcess = PROCESS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sessions, impressions) in [begin, end), following the module's stated process."""
    from models.simulator import CUISINES, is_open

    times = session_times(rng, sessions_per_day, begin, end)
    n = len(times)
    user_ids = rng.integers(1, len(users) + 1, n).astype(np.int64)
    home = users.set_index("user_id").loc[user_ids]
    r, theta = rng.uniform(0, 0.3, n), rng.uniform(0, 2 * math.pi, n)
    lat, lon = offset_point(home["home_lat"].to_numpy(), home["home_lon"].to_numpy(), r * np.cos(theta), r * np.sin(theta))
    hour = (times.hour + times.minute / 60).to_numpy()
    cuisine = pd.Categorical(restaurants["cuisine"], categories=CUISINES).codes
    tastes = home[[f"true_taste_{c}" for c in CUISINES]].to_numpy()[:, cuisine]  # [n, R]
    r_lat, r_lon = restaurants["lat"].to_numpy(), restaurants["lon"].to_numpy()
    popularity, price = restaurants["true_popularity"].to_numpy(), restaurants["price_level"].to_numpy()
    opens, closes = restaurants["opens_hour"].to_numpy(), restaurants["closes_hour"].to_numpy()
    ids = restaurants["restaurant_id"].to_numpy()

    frames, n_candidates = [], np.zeros(n, dtype=np.int64)
    for lo in tqdm(range(0, n, _BATCH), desc="feed sessions", unit="batch", leave=False):
        hi = min(lo + _BATCH, n)
        km = haversine_km(lat[lo:hi, None], lon[lo:hi, None], r_lat[None, :], r_lon[None, :])
        candidate = is_open(opens[None, :], closes[None, :], np.floor(hour[lo:hi, None])) & (km <= radius_km)
        n_candidates[lo:hi] = candidate.sum(axis=1)
        policy = process.policy_popularity * np.log(popularity)[None, :] - process.policy_distance_per_km * km
        shown = _gumbel_top_k(rng, np.where(candidate, policy, -np.inf), min(FEED_SLOTS, len(ids)))
        rows = np.repeat(np.arange(lo, hi), shown.shape[1])
        cols = shown.ravel()
        position = np.tile(np.arange(1, shown.shape[1] + 1), hi - lo)
        valid = candidate[rows - lo, cols]  # fewer candidates than slots: the tail is empty
        rows, cols, position = rows[valid], cols[valid], position[valid]
        dist = km[rows - lo, cols]
        logit = relevance(popularity[cols], tastes[rows, cols], dist, price[cols], hour[rows], cuisine[cols], process)
        at_top = 1.0 / (1.0 + np.exp(-logit))
        p_order = examine(position) * at_top
        frames.append(pd.DataFrame({
            "session_id": rows.astype(np.int64) + 1,
            "user_id": user_ids[rows],
            "restaurant_id": ids[cols],
            "position": position.astype(np.int64),
            "event_timestamp": times[rows],
            "user_lat": lat[rows],
            "user_lon": lon[rows],
            "ordered": (rng.uniform(0, 1, len(rows)) < p_order).astype(np.int64),
            "true_p_order": p_order,
            "true_p_order_at_top": at_top,
            "true_examine": examine(position),
            "true_relevance_logit": logit,
            "true_distance_km": dist,
            "true_taste": tastes[rows, cols],
        }))
    impressions = pd.concat(frames, ignore_index=True)
    sessions = pd.DataFrame({
        "session_id": np.arange(1, n + 1, dtype=np.int64),
        "user_id": user_ids,
        "event_timestamp": times,
        "user_lat": lat,
        "user_lon": lon,
        "n_candidates": n_candidates,
    })
    shown_count = impressions.groupby("session_id").size()
    sessions["n_shown"] = shown_count.reindex(sessions["session_id"]).fillna(0).astype(np.int64).to_numpy()
    ordered = impressions.groupby("session_id")["ordered"].sum()
    sessions["n_ordered"] = ordered.reindex(sessions["session_id"]).fillna(0).astype(np.int64).to_numpy()
    return sessions, impressions


def _window_sums(times: np.ndarray, keys: np.ndarray, weights: np.ndarray, n_keys: int,
                 day: np.datetime64, window: np.timedelta64) -> np.ndarray:
    """Per key, the sum of `weights` of events in [day - window, day); times sorted."""
    lo, hi = np.searchsorted(times, day - window, side="left"), np.searchsorted(times, day, side="left")
    return np.bincount(keys[lo:hi], weights=weights[lo:hi], minlength=n_keys)


def restaurant_feed_stats(impressions: pd.DataFrame, restaurant_ids: np.ndarray, days: pd.DatetimeIndex) -> pd.DataFrame:
    """Daily, per restaurant, from impressions strictly before each day: counts and smoothed conversion."""
    imp = impressions.sort_values("event_timestamp", kind="stable")
    times = imp["event_timestamp"].to_numpy(dtype="datetime64[ns]")
    index = pd.Index(restaurant_ids)
    keys = index.get_indexer(imp["restaurant_id"]).astype(np.int64)
    ones, orders = np.ones(len(imp)), imp["ordered"].to_numpy(dtype=np.float64)
    frames = []
    for day in days:
        stamp = day.tz_convert("UTC").tz_localize(None).to_datetime64()
        columns = {}
        for window in STATS_WINDOWS_DAYS:
            span = np.timedelta64(window, "D")
            columns[f"feed_impressions_{window}d"] = _window_sums(times, keys, ones, len(index), stamp, span)
            columns[f"feed_orders_{window}d"] = _window_sums(times, keys, orders, len(index), stamp, span)
        shown, bought = columns["feed_impressions_7d"], columns["feed_orders_7d"]
        city_rate = bought.sum() / max(shown.sum(), 1.0)
        frame = pd.DataFrame({"restaurant_id": restaurant_ids, "event_timestamp": day})
        for name, values in columns.items():
            frame[name] = values.astype(np.int64)
        frame["conversion_7d"] = (bought + CONVERSION_PRIOR_IMPRESSIONS * city_rate) / (shown + CONVERSION_PRIOR_IMPRESSIONS)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def user_history(
    sessions: pd.DataFrame,
    impressions: pd.DataFrame,
    orders: pd.DataFrame,
    restaurants: pd.DataFrame,
    user_ids: np.ndarray,
    days: pd.DatetimeIndex,
) -> pd.DataFrame:
    """Daily, per user, from the 30 days strictly before each day: sessions, orders, cuisine shares, price."""
    from models.simulator import CUISINES

    feed_orders = impressions.loc[impressions["ordered"] == 1, ["user_id", "restaurant_id", "event_timestamp"]]
    history = pd.concat([orders[["user_id", "restaurant_id", "event_timestamp"]], feed_orders], ignore_index=True)
    history = history.sort_values("event_timestamp", kind="stable")
    profile = restaurants.set_index("restaurant_id").loc[history["restaurant_id"]]
    cuisine = pd.Categorical(profile["cuisine"], categories=CUISINES).codes.astype(np.int64)
    users = pd.Index(user_ids)
    n_users, n_cuisines = len(users), len(CUISINES)
    order_user = users.get_indexer(history["user_id"]).astype(np.int64)
    order_times = history["event_timestamp"].to_numpy(dtype="datetime64[ns]")
    price = profile["price_level"].to_numpy(dtype=np.float64)
    session_sorted = sessions.sort_values("event_timestamp", kind="stable")
    session_times_ = session_sorted["event_timestamp"].to_numpy(dtype="datetime64[ns]")
    session_user = users.get_indexer(session_sorted["user_id"]).astype(np.int64)
    window = USER_WINDOW.to_timedelta64()
    ones_orders, ones_sessions = np.ones(len(history)), np.ones(len(session_sorted))
    frames = []
    for day in days:
        stamp = day.tz_convert("UTC").tz_localize(None).to_datetime64()
        n_orders = _window_sums(order_times, order_user, ones_orders, n_users, stamp, window)
        by_cuisine = _window_sums(order_times, order_user * n_cuisines + cuisine, ones_orders,
                                  n_users * n_cuisines, stamp, window).reshape(n_users, n_cuisines)
        price_sum = _window_sums(order_times, order_user, price, n_users, stamp, window)
        frame = pd.DataFrame({"user_id": users.to_numpy(), "event_timestamp": day})
        frame["feed_sessions_30d"] = _window_sums(session_times_, session_user, ones_sessions, n_users, stamp,
                                                  window).astype(np.int64)
        frame["orders_30d"] = n_orders.astype(np.int64)
        shares = (by_cuisine + TASTE_PRIOR_ORDERS / n_cuisines) / (n_orders[:, None] + TASTE_PRIOR_ORDERS)
        for i, name in enumerate(CUISINES):
            frame[f"taste_{name}_30d"] = shares[:, i]
        frame["price_level_30d"] = np.where(n_orders > 0, price_sum / np.maximum(n_orders, 1), DEFAULT_PRICE_LEVEL)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def simulate_feed(
    rng: np.random.Generator,
    restaurants: pd.DataFrame,
    users: pd.DataFrame,
    orders: pd.DataFrame,
    begin: pd.Timestamp,
    end: pd.Timestamp,
    scale: float,
    radius_km: float,
) -> dict[str, pd.DataFrame]:
    """Every feed table: sessions, impressions and their daily feature snapshots (module doc)."""
    sessions, impressions = simulate_impressions(rng, restaurants, users, begin, end, SESSIONS_PER_DAY * scale, radius_km)
    days = pd.date_range(begin.ceil("D"), end, freq="D")
    return {
        "sessions": sessions,
        "impressions": impressions,
        "restaurant_feed_stats": restaurant_feed_stats(impressions, restaurants["restaurant_id"].to_numpy(), days),
        "user_history": user_history(sessions, impressions, orders, restaurants, users["user_id"].to_numpy(), days),
    }
