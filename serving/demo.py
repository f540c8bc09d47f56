"""`make demo`: the whole path on one machine, narrated, then everything stopped.

simulate -> feast apply + materialize -> train, evaluate, export, gate, register -> Ray Serve ->
sample requests -> a short open-loop load -> a minute of the live city, watched by the
monitor -> a retrained challenger in shadow, rolled back -> stop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import httpx
import pandas as pd

from serving.launch import BackgroundServer
from serving.paths import PROJECT_ROOT

PY = sys.executable


def banner(step: int, total: int, text: str) -> None:
    """One visible line per step, so a newcomer sees where the time goes."""
    print(f"\n=== [{step}/{total}] {text} ===", flush=True)


def run(*args: str) -> None:
    """Run a step as its own process, streaming its output; stop the demo if it fails."""
    subprocess.run([PY, *args], cwd=PROJECT_ROOT, check=True)


def sample_requests(base: str, quiet: bool = False) -> None:
    """A few real requests, printed: a normal one, one at rush hour, and two bad ones (`quiet`: sent, not printed)."""
    restaurants = pd.read_parquet(PROJECT_ROOT / "data/offline/restaurants.parquet")
    orders = pd.read_parquet(PROJECT_ROOT / "data/offline/orders.parquet").tail(3)
    requests = [
        {"restaurant_id": int(o.restaurant_id), "delivery_lat": float(o.delivery_lat), "delivery_lon": float(o.delivery_lon)}
        for o in orders.itertuples()
    ]
    requests.append({**requests[0], "order_time": "2026-11-25T18:00:00Z"})
    requests.append({**requests[0], "delivery_lat": 95.0})
    requests.append({**requests[0], "restaurant_id": int(restaurants.restaurant_id.max()) + 1000})
    with httpx.Client(timeout=10) as client:
        for body in requests:
            response = client.post(f"{base}/v1/eta", json=body)
            if not quiet:
                print(f"POST /v1/eta {json.dumps(body)}\n  -> {response.status_code} {response.text}")
        ready = client.get(f"{base}/v2/health/ready")
        if not quiet:
            print(f"GET /v2/health/ready -> {ready.status_code} {ready.text}")


def print_metrics() -> None:
    """The headline figures of each model against its baseline and the simulator's truth."""
    eta = json.loads((PROJECT_ROOT / "reports/eta/metrics.json").read_text())
    retrieval = json.loads((PROJECT_ROOT / "reports/retrieval/metrics.json").read_text())
    ranker = json.loads((PROJECT_ROOT / "reports/ranker/metrics.json").read_text())
    print(f"ETA        RMSE {eta['rmse']:.2f} min | heuristic {eta['baseline_rmse']:.2f} | noise floor "
          f"{eta['noise_floor_rmse']:.2f} | targets met: {eta['targets_met']}")
    print(f"retrieval  recall@10 {retrieval['recall_at_10']:.3f} | popularity {retrieval['baseline_recall_at_10']:.3f}")
    print(f"ranker     AUC {ranker['auc']:.3f} logloss {ranker['logloss']:.4f} | baseline AUC {ranker['baseline_auc']:.3f}"
          f" | oracle logloss {ranker['oracle_logloss']:.4f} | targets met: {ranker['targets_met']}")


def sample_feed(base: str) -> None:
    """A feed for a sample user, printed as the app would show it."""
    users = pd.read_parquet(PROJECT_ROOT / "data/offline/users.parquet")
    restaurants = pd.read_parquet(PROJECT_ROOT / "data/offline/restaurants.parquet").set_index("restaurant_id")
    user = users.iloc[0]
    body = {"user_id": int(user.user_id), "user_lat": float(user.home_lat), "user_lon": float(user.home_lon),
            "page_size": 10, "include_timings": True}
    answer = httpx.post(f"{base}/v1/feed", json=body, timeout=30).json()
    print(f"POST /v1/feed {json.dumps(body)}")
    for i, card in enumerate(answer["cards"], 1):
        r = restaurants.loc[card["restaurant_id"]]
        tag = "  [sponsored]" if card["sponsored"] else ""
        print(f"  {i:2d}. restaurant {card['restaurant_id']:4d} {r.cuisine:<8} p(order) {card['p_order']:.3f}"
              f"  ETA {card['eta_minutes']:5.1f} min{tag}")
    print(f"  models {answer['model_versions']}\n  stage timings (ms) {answer['timings_ms']}")


def run_locust(base: str, seconds: int) -> None:
    """Simulated app users (loadtest/locustfile.py) for a short while; Locust prints the summary."""
    env = {**os.environ, "COURIER_LOCUST_NAME": "demo", "COURIER_LOCUST_TIME_SCALE": "0.2"}
    subprocess.run([PY, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "--users", "20",
                    "--spawn-rate", "10", "--run-time", f"{seconds}s", "--host", base, "--only-summary",
                    "--exit-code-on-error", "0"], cwd=PROJECT_ROOT, env=env, check=True)


def live_city(base: str, seconds: float, speed: float, stream: str) -> None:
    """The live city against the demo's server for a while, on a compressed clock, with the monitor
    joining its outcomes to the prediction log; one line of online metrics at the end."""
    import math

    os.environ.setdefault("TQDM_DISABLE", "1")  # the city calls the simulator's batch steps every tick
    from city.live import City
    from city.push import open_online_store
    from city.world import World
    from monitoring.monitor import Monitor, MonitorSettings, from_serve_config
    from monitoring.streams import connect
    from serving.config import SERVE_CONFIG

    data = PROJECT_ROOT / "data"
    settings = MonitorSettings.load()
    settings.streams.predictions, settings.streams.outcomes = stream, stream.replace("predictions", "outcomes")
    settings.drift.min_count = 100  # a minute of the city logs a few hundred predictions
    settings.progress_s = 3600  # the demo prints one summary instead
    client = connect(None)
    from feature_repo.store import open_store

    monitor = Monitor(settings, client, data, from_serve_config(SERVE_CONFIG)["artifacts"], time_scale=speed,
                      store=open_store("sqlite", data_dir=data))
    monitor.start()
    city = City(World.load(data, speed=speed), base, store=open_online_store("sqlite", data),
                outcomes_stream=settings.streams.outcomes, prefix=stream.rsplit(":", 1)[0], out=None)
    try:
        stats = city.run(duration_s=seconds)
        time.sleep(3)  # the last outcomes reach the monitor
    finally:
        monitor.stop()
        client.delete(stream, settings.streams.outcomes, *client.keys(stream.rsplit(":", 1)[0] + ":city:*"))
    value = monitor.metrics.value
    import httpx

    def served(model: str) -> str:  # the version the server answers with (its champion)
        return httpx.get(f"{base}/v2/models/{model}", timeout=10).json()["versions"][0]

    eta = served("eta")
    answered = {"model_version": eta, "variant": "champion"}  # the online metrics are per version and variant
    n = value("courier_eta_outcomes_total", answered) or 0
    rmse = math.sqrt((value("courier_eta_squared_error_minutes2_total", answered) or 0) / max(n, 1))
    offline = value("courier_eta_offline_rmse_minutes", {"model_version": eta}) or float("nan")
    bias = (value("courier_eta_error_minutes_total", answered) or 0) / max(n, 1)
    ranker = {"model_version": served("ranker"), "variant": "champion"}
    shown = sum(value("courier_feed_impressions_total", {**ranker, "position": str(p)}) or 0 for p in range(1, 51))
    ordered = sum(value("courier_feed_orders_total", {**ranker, "position": str(p)}) or 0 for p in range(1, 51))
    ages = [value("courier_feature_view_newest_age_seconds", {"view": v}) for v in ("restaurant_load_15m",
                                                                                      "area_congestion_15m")]
    print(f"live city: {stats['orders']} orders and {stats['sessions']} feed sessions in {seconds:g} s "
          f"({seconds * speed / 60:.0f} world-minutes at {speed:g}x), {stats['outcomes']} outcomes reported")
    print(f"online metrics: live ETA RMSE {rmse:.2f} min over {n:.0f} deliveries (offline {offline:.2f}), "
          f"bias {bias:+.2f} min; feed conversion {ordered / max(shown, 1):.1%} of {shown:.0f} cards shown")
    if stats["orders"] == 0:  # the city keeps the wall clock's time of day: at night its kitchens are closed
        print(f"  (no orders: it is {time.strftime('%H:%M', time.gmtime())} UTC and the city's kitchens are closed; "
              "run the demo in the daytime, or `make world` then, to see deliveries and online metrics)")
    if any(a is not None for a in ages):
        print(f"freshness: newest live features {max(a for a in ages if a is not None):.0f} s old (TTL 900 s)")


def challenger(server: BackgroundServer, stream: str) -> None:
    """Retrain the ETA model (the city's outcomes included), gate it, shadow it, then take it out again."""
    import tempfile
    from pathlib import Path

    import redis

    from feature_repo.connection import redis_options
    from models.registry import Registry
    from serving.rollout import Dashboard, Rollouts, served_versions

    retrained = subprocess.run([PY, "-m", "models.retrain", "--model", "eta"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=False)
    print("\n".join(line for line in retrained.stdout.splitlines() if line.startswith(("gate", "  [", "registered"))))
    if retrained.returncode != 0:
        print("the gate refused the challenger (above): the champion keeps serving alone")
        return
    rollouts = Rollouts(Dashboard(server.dashboard_url), Registry(), Path(tempfile.mkdtemp()) / "rollouts.jsonl",
                        server.url)
    rollouts.rollout("eta", challenger="challenger", shadow=1.0)
    print(f"versions answering /v1/eta: {sorted(served_versions(server.url, 'eta'))} (the challenger only shadows)")
    sample_requests(server.url, quiet=True)
    time.sleep(1)  # the prediction log and the shadow tasks send within milliseconds
    client = redis.Redis(**redis_options())
    records = [json.loads(fields[b"r"]) for _, fields in client.xrevrange(stream, count=50)]
    shadows = [r for r in records if r.get("variant") == "shadow"]
    if shadows:
        print(f"{len(shadows)} shadow answers logged, never returned: e.g. request {shadows[0]['request_id']} "
              f"{shadows[0]['model_version']} said {shadows[0]['eta_minutes']:.1f} min")
    rollouts.rollback("eta")
    client.delete(stream)  # the demo's log: the live city's step deleted it once already


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (`make demo`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8080)
    parser.add_argument("--load-seconds", type=int, default=30)
    parser.add_argument("--city-seconds", type=float, default=60)
    args = parser.parse_args(argv)
    base = f"http://127.0.0.1:{args.port}"
    total = 8
    started = time.monotonic()

    banner(1, total, "simulating the city (restaurants, users, couriers, orders)")
    run("-m", "models.simulator", "--out", "data/offline")
    banner(2, total, "feast apply, then materialize the online store (SQLite)")
    run("-m", "feature_repo.store", "apply")
    run("-m", "feature_repo.store", "materialize")
    banner(3, total, "training, evaluating, exporting, gating and registering the models: ETA, retrieval "
           "(two-tower), ranker; each becomes its champion")
    for model in ("eta", "retrieval", "ranker"):
        run("-m", f"models.{model}.train", "--promote")  # this run's city is new: its models serve
    print_metrics()
    banner(4, total, f"starting Ray Serve on {base} (log: .run/serve.log)")
    stream = f"courier:demo-{os.getpid()}:predictions"  # the demo's own prediction log, deleted at the end
    log_stream = ["--set", f'prediction_log={json.dumps({"stream": stream, "maxlen": 100000})}']
    with BackgroundServer(args.port, args.metrics_port, PROJECT_ROOT / ".run/serve.log", extra=log_stream) as server:
        banner(5, total, "sample requests")
        sample_requests(base)
        sample_feed(base)
        banner(6, total, f"headless Locust load for {args.load_seconds} s (p50/p99 from raw latencies)")
        run_locust(base, args.load_seconds)
        banner(7, total, f"the live city for {args.city_seconds:g} s at 60x (customers, deliveries, live features), "
               "watched by the monitor")
        live_city(base, args.city_seconds, 60.0, stream)
        banner(8, total, "a challenger: the ETA model retrained on recent data and the city's outcomes, gated, "
               "shadowed in place, then rolled back")
        challenger(server, stream)
        print("\nstopping Ray Serve ...")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; reports in reports/, models in artifacts/ (registry: artifacts/registry.db)")


if __name__ == "__main__":
    main()
