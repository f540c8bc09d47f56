"""Retraining triggered by the alerts: an Alertmanager webhook receiver.

    python -m monitoring.retrain_hook [--port 9109] [--data-dir data] [--artifacts artifacts]

Alertmanager POSTs its webhook payload (`{"alerts": [{"status": "firing", "labels": {...}}]}`) to
`/alerts`; each firing alert that says a model went stale starts `python -m models.retrain` for
that model (at most one run per model at a time, then a cool-down), and the answer says what
started. `GET /runs` lists the runs and their exit codes. The retrained model is only registered
as the challenger when it passes the gate: nothing reaches users without a rollout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from serving.paths import PROJECT_ROOT

logger = logging.getLogger("monitoring.retrain_hook")
# Which model each alert says is stale (CourierModelTooOld names it in its `model` label).
MODEL_OF_ALERT = {"CourierLiveEtaErrorHigh": "eta", "CourierPredictionDrift": "eta", "CourierConversionDrop": "ranker",
                  "CourierCalibrationDrift": "ranker", "CourierModelTooOld": None}


@dataclass
class Run:
    """One retraining the hook started."""

    model: str
    alert: str
    started: float
    argv: list[str]
    exit_code: int | None = None
    ended: float | None = None
    log: str = ""


@dataclass
class RetrainHook:
    """Starts a retraining per stale model, one at a time, with a cool-down between runs."""

    command: Sequence[str] = (sys.executable, "-m", "models.retrain", "--model", "{model}")
    cooldown_s: float = 600.0
    log_dir: Path = PROJECT_ROOT / "reports" / "retrain"
    env: dict[str, str] = field(default_factory=dict)  # over this process's environment (e.g. COURIER_REGISTRY)
    runs: list[Run] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def models_of(self, payload: dict[str, Any]) -> list[tuple[str, str]]:
        """(model, alert) for each firing alert of the payload that names a stale model."""
        found: list[tuple[str, str]] = []
        for alert in payload.get("alerts", []):
            labels = alert.get("labels") or {}
            name = labels.get("alertname", "")
            if alert.get("status", "firing") != "firing" or name not in MODEL_OF_ALERT:
                continue
            model = MODEL_OF_ALERT[name] or labels.get("model")
            if model and (model, name) not in found and model not in [m for m, _ in found]:
                found.append((model, name))
        return found

    def handle(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Start what the payload asks for; say what started and what was skipped, and why."""
        started, skipped = [], []
        for model, alert in self.models_of(payload):
            reason = self._busy(model)
            if reason:
                skipped.append({"model": model, "alert": alert, "reason": reason})
                continue
            run = self._start(model, alert)
            started.append({"model": model, "alert": alert, "log": run.log})
        return {"started": started, "skipped": skipped}

    def _busy(self, model: str) -> str | None:
        with self.lock:
            last = next((r for r in reversed(self.runs) if r.model == model), None)
        if last is None:
            return None
        if last.exit_code is None:
            return "a retraining of this model is running"
        if time.time() - (last.ended or last.started) < self.cooldown_s:
            return f"cooling down ({self.cooldown_s:g} s after the last run)"
        return None

    def _start(self, model: str, alert: str) -> Run:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [part.format(model=model) for part in self.command]
        log_path = self.log_dir / f"{model}-{time.strftime('%Y%m%dT%H%M%S')}.log"
        run = Run(model, alert, time.time(), argv, log=str(log_path))
        with self.lock:
            self.runs.append(run)
        logger.warning("%s fired: retraining %s (%s), log %s", alert, model, " ".join(argv), log_path)
        threading.Thread(target=self._wait, args=(run, log_path), daemon=True, name=f"retrain-{model}").start()
        return run

    def _wait(self, run: Run, log_path: Path) -> None:
        with log_path.open("w") as out:
            code = subprocess.run(run.argv, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, check=False,
                                  env={**os.environ, **self.env}).returncode
        run.exit_code, run.ended = code, time.time()
        logger.warning("retraining %s exited %d (%s)", run.model, code, "challenger registered" if code == 0 else
                       "refused by the gate or failed: see the log")

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no run is going (tests, the experiment)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if all(r.exit_code is not None for r in self.runs):
                    return True
            time.sleep(0.2)
        return False


def server(hook: RetrainHook, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """The HTTP receiver: POST /alerts (Alertmanager's webhook), GET /runs."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/alerts":
                return self._send(404, {"error": f"no route {self.path}: POST /alerts"})
            length = int(self.headers.get("Content-Length") or 0)
            try:
                payload = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                return self._send(400, {"error": f"not JSON: {exc}"})
            if not isinstance(payload, dict):
                return self._send(400, {"error": "expected Alertmanager's webhook object"})
            return self._send(202, hook.handle(payload))

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/runs":
                return self._send(404, {"error": f"no route {self.path}: GET /runs"})
            with hook.lock:
                return self._send(200, [asdict(r) for r in hook.runs])

        def log_message(self, *args: Any) -> None:  # quiet: the hook logs what matters
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    """Command line: serve the webhook until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9109)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a pod")
    parser.add_argument("--cooldown", type=float, default=600.0, help="seconds between two retrainings of a model")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--artifacts", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = [sys.executable, "-m", "models.retrain", "--model", "{model}", "--data-dir", args.data_dir]
    if args.artifacts:
        command += ["--artifacts", args.artifacts]
    httpd = server(RetrainHook(command, args.cooldown), args.port, args.host)
    print(f"retrain hook on http://{args.host}:{args.port}/alerts", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
