"""The experiment's own bookkeeping (monitoring/experiment.py); the whole run is `make experiment`."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loadtest.server import free_port
from monitoring.experiment import GuardProbe, _last_json, private_offline
from serving.variants import in_canary


def test_the_last_json_a_command_printed_is_its_summary():
    text = 'progress {"not": "this"}\nmore lines\n{\n  "models": {"eta": {"registered": true}},\n  "seconds": 8.1\n}\n'
    assert _last_json(text) == {"models": {"eta": {"registered": True}}, "seconds": 8.1}
    assert _last_json("no summary at all") is None


def test_a_private_data_dir_links_the_city_but_keeps_its_own_logged_rows(tmp_path):
    offline = tmp_path / "data" / "offline"
    (offline / "logged" / "eta_outcomes").mkdir(parents=True)
    (offline / "orders.parquet").write_bytes(b"orders")
    (offline / "snapshots").mkdir()
    private = private_offline(tmp_path / "data", tmp_path / "run")
    assert (private / "offline" / "orders.parquet").read_bytes() == b"orders"
    assert (private / "offline" / "snapshots").is_symlink()
    assert not (private / "offline" / "logged").exists()  # this run's outcomes never mix with earlier ones


def test_the_guard_probe_charges_each_arm_with_its_own_failures_and_latency():
    """A real HTTP server failing every request of the challenger's users: the challenger's arm gets the
    failures, the champion's none, whatever the answers say (the arm comes from the user id)."""
    salt, share = "eta:eta-2", 0.5

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            import json

            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(503 if in_canary(body["user_id"], share, salt) else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        bodies = [{"restaurant_id": 1, "delivery_lat": 0.0, "delivery_lon": 0.0, "user_id": u} for u in range(1, 200)]
        probe = GuardProbe(f"http://127.0.0.1:{port}", bodies, share, salt, rate=100).start()
        threading.Event().wait(2.0)
        figures = probe.stop()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert figures["challenger_error_rate"] == 1.0 and figures["champion_error_rate"] == 0.0
    assert figures["champion_p99_ms"] < 1000 and figures["challenger_p99_ms"] == float("inf")
    assert len(probe.samples) > 100  # ~100 req/s for 2 s, open loop
