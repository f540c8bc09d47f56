"""`POST /v1/feed`: retrieval -> (ranking || ETA) -> blending, composed over deployment handles.

Ranking and ETA each take all candidates in one batched call and run at the same time;
blending places sponsored cards by the configured policy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from serving.blending import Card, SponsoredPolicy, blend
from serving.metrics import ServingMetrics
from serving.schemas import FeedRequest


class FeedComposer:
    """Builds one feed page from the three model deployments."""

    def __init__(self, retrieval: DeploymentHandle, ranker: DeploymentHandle, eta: DeploymentHandle,
                 policy: SponsoredPolicy, candidates: int, metrics: ServingMetrics):
        self.retrieval, self.ranker, self.eta = retrieval, ranker, eta
        self.policy, self.candidates, self.metrics = policy, candidates, metrics

    async def page(self, request: FeedRequest, request_id: str = "") -> tuple[dict[str, Any], bool]:
        """The response body of one feed request, and whether the ranker's challenger should also
        score the shown cards (shadow, after the answer is sent: `shadow_scores`)."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        when = request.request_time_utc().timestamp()
        where = (request.user_id, request.user_lat, request.user_lon, when)
        with self.metrics.stage("feed", "retrieval_call", timings):
            found = await self.retrieval.candidates.remote(*where, self.candidates)
        ids = found["restaurant_ids"]
        with self.metrics.stage("feed", "ranking_and_eta_calls", timings):
            ranked, etas = await asyncio.gather(
                self.ranker.score.remote(*where, ids, request_id),
                self.eta.predict_many.remote(ids, request.user_lat, request.user_lon, when, request.user_id),
            )
        with self.metrics.stage("feed", "blending", timings):
            cards = [Card(rid, p, p, bool(s)) for rid, p, s in zip(ids, ranked["p_order"], found["sponsored"])]
            organic = sorted(cards, key=lambda c: -c.p_order)
            page = blend(organic, [c for c in cards if c.sponsored], self.policy, request.page_size)
            eta_of = dict(zip(ids, etas["eta_minutes"]))
        body: dict[str, Any] = {
            "user_id": request.user_id,
            "cold_start": not found["known_user"],
            "cards": [{"restaurant_id": c.restaurant_id, "score": round(c.score, 6), "p_order": round(c.p_order, 6),
                       "eta_minutes": eta_of.get(c.restaurant_id), "sponsored": c.sponsored} for c in page],
            "candidates": {"eligible": found["eligible"], "retrieved": len(ids)},
            "model_versions": {"retrieval": found["model_version"], "ranker": ranked["model_version"],
                               "eta": etas["model_version"]},
            "variants": {"ranker": ranked["variant"], "eta": etas["variant"]},
            "sponsored_policy": self.policy.model_dump(),
            "degraded": any(x["fallback"] for x in (found, ranked, etas)),
        }
        if body["degraded"]:
            body["fallbacks"] = [x["fallback"] for x in (found, ranked, etas) if x["fallback"]]
        timings["total"] = round((time.perf_counter() - started) * 1000, 3)
        self.metrics.stage_ms.observe(timings["total"], tags={"endpoint": "feed", "stage": "total"})
        if request.include_timings:
            body["timings_ms"] = {**timings, **found["timings_ms"], **ranked["timings_ms"]}
        return body, bool(ranked.get("shadow"))

    async def shadow_scores(self, request: FeedRequest, restaurant_ids: list[int]) -> dict[str, Any]:
        """The ranker challenger's p_order of the shown cards (for the prediction log, never the page)."""
        when = request.request_time_utc().timestamp()
        return await self.ranker.shadow_score.remote(request.user_id, request.user_lat, request.user_lon, when,
                                                     restaurant_ids)
