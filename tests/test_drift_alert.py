"""The ETA error alert end to end: logged predictions and reported deliveries through the real monitor,
scraped by a real Prometheus with the repository's rules: quiet while deliveries match the model's
offline error, firing once the world gets slower than the model thinks (what `make drift-drill`
shows with the live city, here in seconds with records written straight to the streams)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import orjson
import pytest
import redis

from monitoring.monitor import Monitor
from monitoring.prometheus import PrometheusServer
from tests.conftest import free_port
from tests.test_monitor import eta_record, settings_for

pytestmark = pytest.mark.integration
RATE = 12  # deliveries per second: the rule wants >= 100 in its 5-minute window


def _write(client: redis.Redis, keys: dict, stop: threading.Event, shift: list[float], offline_rmse: float) -> None:
    """Predictions of 30 minutes and their deliveries: 30 + shift + noise of the model's own error."""
    rng = np.random.default_rng(0)
    while not stop.is_set():
        started = time.monotonic()
        pipe = client.pipeline()
        for _ in range(RATE):
            rid = uuid.uuid4().hex
            pipe.xadd(keys["predictions"], {"r": orjson.dumps(eta_record(rid, 30.0, order_time=time.time()))})
            minutes = 30.0 + shift[0] + rng.normal(0, offline_rmse)
            pipe.xadd(keys["outcomes"], {"r": orjson.dumps({"request_id": rid, "ts": time.time(), "kind": "delivery",
                                                           "delivered_minutes": minutes, "true_eta_minutes": minutes,
                                                           "scenario": "test"})})
        pipe.execute()
        stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))


def test_the_live_eta_error_alert_fires_on_a_slower_world_and_not_before(tmp_path, fake_eta):
    client = redis.Redis(host="127.0.0.1", port=6379)
    prefix = f"courier-test-alert:{uuid.uuid4().hex[:8]}"
    keys = {"predictions": f"{prefix}:predictions", "outcomes": f"{prefix}:outcomes", "group": "alert-test"}
    offline = json.loads((fake_eta / "manifest.json").read_text())["metrics"]["rmse"]
    monitor = Monitor(settings_for(keys), client, tmp_path / "data", fake_eta.artifacts)
    port, stop, shift = free_port(), threading.Event(), [0.0]
    writer = threading.Thread(target=_write, args=(client, keys, stop, shift, offline), daemon=True)
    monitor.start(port, "127.0.0.1")
    try:
        with PrometheusServer(serving_metrics=None, monitor=f"127.0.0.1:{port}", port=free_port(),
                              run_dir=tmp_path / "prometheus") as prometheus:
            prometheus.wait_ready()
            writer.start()
            deadline = time.monotonic() + 80  # healthy: >= 100 deliveries in the window, the RMSE at the offline one
            while time.monotonic() < deadline:
                assert not prometheus.firing(), prometheus.firing()
                time.sleep(5)
            rmse = prometheus.query("max(model_version:courier_eta_rmse_minutes:5m)")
            assert rmse and float(rmse[0]["value"][1]) == pytest.approx(offline, rel=0.2)
            shift[0] = 8.0  # the world is 8 minutes slower than the model thinks
            changed = time.monotonic()
            while time.monotonic() - changed < 150 and not prometheus.firing("CourierLiveEtaErrorHigh"):
                time.sleep(3)
            fired = prometheus.firing("CourierLiveEtaErrorHigh")
            assert fired, f"no alert {time.monotonic() - changed:.0f} s after the shift: {prometheus.alerts()}"
            assert fired[0]["labels"]["model_version"] == "eta-20260101000000-abcdef"
    finally:
        stop.set()
        monitor.stop()
        client.delete(keys["predictions"], keys["outcomes"])
