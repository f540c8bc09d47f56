"""How much of the ETA pipeline's per-request work a cross-request batch would save (in-process).

    python -m loadtest.batch_probe

One request at a time (`EtaPipeline.predict`) against one batched call for n requests
(`EtaPipeline.predict_many`: one Feast read and one ONNX call), as `@serve.batch` would make.
Needs the default data, features and model (`make data features train`).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from serving.eta import EtaPipeline
from serving.paths import PROJECT_ROOT
from serving.schemas import EtaRequest


def _ms(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    """Print the Markdown table of docs/benchmarks.md."""
    from models.registry import Registry

    champion = Registry().resolve("eta", "champion").path  # what `make serve` serves after `make train`
    pipeline = EtaPipeline(str(champion), "sqlite", "data", feature_timeout_ms=5000)
    orders = pd.read_parquet(PROJECT_ROOT / "data/offline/orders.parquet").tail(64)
    requests = [EtaRequest(restaurant_id=int(o.restaurant_id), delivery_lat=float(o.delivery_lat),
                           delivery_lon=float(o.delivery_lon)) for o in orders.itertuples()]

    def one_at_a_time(n: int) -> float:
        return _ms(lambda: [pipeline.predict(r) for r in requests[:n]])

    def batched(n: int) -> float:  # same drop-off for the whole call: the work per row is what matters here
        first = requests[0]
        return _ms(lambda: pipeline.predict_many([r.restaurant_id for r in requests[:n]], first.delivery_lat,
                                                 first.delivery_lon, time.time()))

    one_at_a_time(8), batched(8)  # warm
    print("| requests per call | one at a time (ms per request) | one batched call (ms per request) |")
    print("|---|---|---|")
    for n in (1, 4, 8, 16, 32):
        single = np.median([one_at_a_time(n) for _ in range(15)]) / n
        batch = np.median([batched(n) for _ in range(15)]) / n
        print(f"| {n} | {single:.3f} | {batch:.3f} |")


if __name__ == "__main__":
    main()
