"""Readiness that means it: a model is ready when its deployment answers the ingress within a bounded wait.

`GET /v2/health/ready` and `GET /v2/models/{name}/ready` ask each model deployment for its metadata (a
cheap call every model answers from memory) and wait at most `timeout_s`. A deployment with no live
replica, a replica whose process or event loop is stuck, or a network path from the ingress that does not
deliver all show up the same way: no answer in time, so not ready (503), and ready again once the answer
comes back. The wait is bounded so a probe never hangs on the thing it probes, and all models are
asked at once so the whole server's answer takes no longer than the slowest one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

logger = logging.getLogger("ray.serve")
READY_TIMEOUT_S = 1.0  # a model answers its metadata in milliseconds; 1 s is a stall, not a slow answer


async def not_ready_reason(name: str, ask: Callable[[], Awaitable[object]],
                           timeout_s: float = READY_TIMEOUT_S) -> str | None:
    """None when `ask()` (a call to the model's deployment) answers within `timeout_s`, else why not."""
    try:
        await asyncio.wait_for(ask(), timeout_s)
        return None
    except TimeoutError:
        reason = f"no answer from the {name} deployment within {timeout_s:g} s"
    except Exception as exc:  # noqa: BLE001 (not ready is an answer here, not an error)
        reason = f"the {name} deployment failed: {exc.__class__.__name__}: {str(exc)[:200]}"
    logger.warning("model %s is not ready: %s", name, reason)
    return reason


async def not_ready(names: Iterable[str], ask: Callable[[str], Awaitable[object]],
                    timeout_s: float = READY_TIMEOUT_S) -> dict[str, str]:
    """The models that are not ready, each with its reason (empty: all ready); asked concurrently."""
    names = list(names)
    reasons = await asyncio.gather(*(not_ready_reason(n, lambda n=n: ask(n), timeout_s) for n in names))
    return {name: reason for name, reason in zip(names, reasons, strict=True) if reason is not None}
