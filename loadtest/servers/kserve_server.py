"""Variant (c): the ETA pipeline as a KServe Python ModelServer model.

    python -m loadtest.servers.kserve_server --http_port 8400
    curl -d '{"restaurant_id": 1, "delivery_lat": 52.37, "delivery_lon": 4.9}' \
        localhost:8400/v1/models/eta:predict

KServe's defaults (one uvicorn worker, its FastAPI app, its logging), with gRPC off since the
benchmark speaks HTTP only. The body is the same JSON as Courier's /v1/eta; `predict` runs the
same parse + pipeline code.
"""

from __future__ import annotations

import argparse
from typing import Any

import kserve
import orjson

from loadtest.pipeline import load_pipeline
from serving.errors import CourierError


class EtaKServeModel(kserve.Model):
    def __init__(self, name: str = "eta"):
        super().__init__(name)
        self.pipeline = None

    def load(self) -> bool:
        self.pipeline = load_pipeline()
        self.ready = True
        return self.ready

    def predict(self, payload: dict, headers: dict[str, str] | None = None) -> dict[str, Any]:
        from serving.schemas import parse_eta_request

        try:
            return self.pipeline.predict(parse_eta_request(orjson.dumps(payload)))
        except CourierError as exc:  # KServe maps InvalidInput to a 400
            raise kserve.errors.InvalidInput(exc.message) from exc


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    args, _ = parser.parse_known_args()
    model = EtaKServeModel("eta")
    model.load()
    kserve.ModelServer(http_port=args.http_port, workers=1, enable_grpc=False).start([model])


if __name__ == "__main__":
    main()
