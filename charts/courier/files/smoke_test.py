"""`helm test`: real inference requests against the release's serving endpoint (stdlib only).

Waits for readiness, then asks for one ETA through the product endpoint and one through the
Open Inference Protocol, and fails with the status and body of the first answer that is wrong.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

URL = os.environ["COURIER_URL"].rstrip("/")
READY_TIMEOUT_S = float(os.environ.get("COURIER_READY_TIMEOUT_S", "300"))
# A restaurant the simulator always creates, delivering to the city centre.
# The chart's internal key (auth.enabled): /v2 raw inference needs the internal scope.
AUTH = {"Authorization": f"Bearer {os.environ['COURIER_API_KEY']}"} if os.environ.get("COURIER_API_KEY") else {}
ETA_REQUEST = {"restaurant_id": 1, "delivery_lat": 52.370, "delivery_lon": 4.900}


def call(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request; HTTP errors are answers, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **AUTH})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def expect(ok: bool, what: str, status: int, body: dict) -> None:
    if not ok:
        sys.exit(f"FAIL {what}: HTTP {status} {json.dumps(body)[:500]}")
    print(f"ok   {what}: HTTP {status} {json.dumps(body)[:200]}")


def wait_ready() -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            status, body = call("GET", "/v2/health/ready")
            if status == 200:
                return expect(True, "GET /v2/health/ready", status, body)
        except OSError as exc:  # connection refused while the proxy starts
            status, body = 0, {"error": str(exc)}
        if time.monotonic() > deadline:
            expect(False, f"ready within {READY_TIMEOUT_S:.0f} s", status, body)
        time.sleep(5)


def main() -> None:
    wait_ready()
    status, body = call("POST", "/v1/eta", ETA_REQUEST)
    expect(status == 200 and float(body.get("eta_minutes", 0)) > 0, "POST /v1/eta", status, body)
    status, meta = call("GET", "/v2/models/eta")
    expect(status == 200 and meta.get("inputs"), "GET /v2/models/eta", status, meta)
    inputs = []
    for spec in meta["inputs"]:
        shape = [1 if d == -1 else d for d in spec["shape"]]
        count = 1
        for d in shape:
            count *= d
        zero = 0 if spec["datatype"].startswith(("INT", "UINT")) else 0.0
        inputs.append({"name": spec["name"], "datatype": spec["datatype"], "shape": shape, "data": [zero] * count})
    status, body = call("POST", "/v2/models/eta/infer", {"id": "helm-test", "inputs": inputs})
    expect(status == 200 and body.get("outputs"), "POST /v2/models/eta/infer", status, body)
    print("PASS: the release answers inference requests")


if __name__ == "__main__":
    main()
