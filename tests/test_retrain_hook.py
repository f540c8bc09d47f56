"""Retraining triggered by alerts (monitoring/retrain_hook.py): Alertmanager's webhook in, one run per model out."""

from __future__ import annotations

import sys
import threading

import httpx

from loadtest.server import free_port
from monitoring.retrain_hook import RetrainHook, server


def firing(*alerts: tuple[str, dict]) -> dict:
    """An Alertmanager webhook payload with these (alertname, extra labels) firing."""
    return {"version": "4", "status": "firing",
            "alerts": [{"status": "firing", "labels": {"alertname": name, **labels}} for name, labels in alerts]}


def test_a_stale_model_alert_starts_one_retraining_per_model(tmp_path):
    marker = tmp_path / "retrained"
    # The command stands in for `python -m models.retrain --model {model}`: it records which model it was asked for.
    command = [sys.executable, "-c", f"import sys; open({str(marker)!r} + '-' + sys.argv[1], 'w').write('x')", "{model}"]
    hook = RetrainHook(command, cooldown_s=3600, log_dir=tmp_path / "logs")
    port = free_port()
    httpd = server(hook, port)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{url}/alerts", json=firing(("CourierLiveEtaErrorHigh", {}),
                                                         ("CourierModelTooOld", {"model": "ranker"}),
                                                         ("CourierFeatureViewStale", {"view": "x"}))).json()
        assert sorted(s["model"] for s in answer["started"]) == ["eta", "ranker"]  # freshness is not a model's fault
        assert hook.wait_idle(30)
        assert (tmp_path / "retrained-eta").exists() and (tmp_path / "retrained-ranker").exists()
        again = httpx.post(f"{url}/alerts", json=firing(("CourierLiveEtaErrorHigh", {}))).json()
        assert again["started"] == [] and "cooling down" in again["skipped"][0]["reason"]
        runs = httpx.get(f"{url}/runs").json()
        assert [r["exit_code"] for r in runs] == [0, 0]
        resolved = {"alerts": [{"status": "resolved", "labels": {"alertname": "CourierConversionDrop"}}]}
        assert httpx.post(f"{url}/alerts", json=resolved).json() == {"started": [], "skipped": []}
        assert httpx.post(f"{url}/alerts", content=b"not json").status_code == 400
        assert httpx.post(f"{url}/nope", json={}).status_code == 404
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_running_retraining_is_not_started_twice(tmp_path):
    hook = RetrainHook([sys.executable, "-c", "import time; time.sleep(2)"], cooldown_s=0, log_dir=tmp_path)
    first = hook.handle(firing(("CourierConversionDrop", {})))
    second = hook.handle(firing(("CourierCalibrationDrift", {})))
    assert [s["model"] for s in first["started"]] == ["ranker"]
    assert second["skipped"][0]["reason"] == "a retraining of this model is running"
    assert hook.wait_idle(30)
