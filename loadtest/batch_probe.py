"""How much of the ETA pipeline's per-request work a cross-request batch would save (in-process).

    python -m loadtest.batch_probe

One request at a time (`EtaPipeline.predict`) against one batched call for n requests
(`EtaPipeline.predict_many`: one Feast read and one ONNX call), as `@serve.batch` would make.
Needs the default data, features and model (`make data features train`).
"""
import time

import numpy as np
import pandas as pd

from serving.eta import EtaPipeline
from serving.schemas import parse_eta_request

p = EtaPipeline("artifacts/eta/current", "sqlite", "data", feature_timeout_ms=5000)
orders = pd.read_parquet("data/offline/orders.parquet").tail(64)
reqs = [parse_eta_request(('{"restaurant_id": %d, "delivery_lat": %f, "delivery_lon": %f}' % (o.restaurant_id, o.delivery_lat, o.delivery_lon)).encode()) for o in orders.itertuples()]
def single(n):
    t=time.perf_counter()
    for r in reqs[:n]: p.predict(r)
    return (time.perf_counter()-t)*1000
def batched(n):
    # what @serve.batch would do: one feature read and one ONNX call for n requests (same drop-off area per call here)
    t=time.perf_counter()
    p.predict_many([r.restaurant_id for r in reqs[:n]], reqs[0].delivery_lat, reqs[0].delivery_lon, time.time())
    return (time.perf_counter()-t)*1000
for f in (single, batched): f(8)
print("| requests per call | one at a time (ms per request) | one batched call (ms per request) |")
print("|---|---|---|")
for n in (1, 4, 8, 16, 32):
    s = np.median([single(n) for _ in range(15)])/n; b = np.median([batched(n) for _ in range(15)])/n
    print(f"| {n} | {s:.3f} | {b:.3f} |")
