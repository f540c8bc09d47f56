"""Typed errors of the serving path; each maps to exactly one HTTP status.

Bad input never becomes a 500: validation raises one of these with the field, the
value and the rule, and the ingress turns it into a JSON body `{"error": ..., "field": ...}`.
Anything else is the server's fault: `internal_error` logs it with the request id and gives
the client a 500 carrying only that id (no traceback, no internals).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

logger = logging.getLogger("ray.serve")


class CourierError(Exception):
    """Base class: a message for the user, and optionally the field and rule it concerns."""

    status = 500

    def __init__(self, message: str, field: str | None = None, rule: str | None = None, value: Any = None):
        super().__init__(message)
        self.message, self.field, self.rule, self.value = message, field, rule, value

    def body(self) -> dict[str, Any]:
        """The JSON error body (Open Inference Protocol style: an `error` string, plus details)."""
        body: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.rule is not None:
            body["rule"] = self.rule
        return body


class MalformedRequest(CourierError):
    """400: the body is not JSON at all."""

    status = 400


class NotFound(CourierError):
    """404: unknown route, model or restaurant."""

    status = 404


class MethodNotAllowed(CourierError):
    """405: the route exists but not for this HTTP method."""

    status = 405


class PayloadTooLarge(CourierError):
    """413: the body is larger than the configured limit."""

    status = 413


class InvalidInput(CourierError):
    """422: well-formed JSON whose content breaks a rule (type, range, shape, datatype...)."""

    status = 422


class NotReady(CourierError):
    """503: the model is not loaded yet; retry with backoff."""

    status = 503


def serve_request_id() -> str:
    """The id Ray Serve gave this request (the caller's X-Request-Id when it sent one; Ray answers with it in
    its X-Request-ID header), else a new uuid4 (outside a Serve request)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # noqa: BLE001 (no Serve context, e.g. a unit test: still an id to search the log for)
        return uuid.uuid4().hex


def internal_error(exc: BaseException, method: str, path: str) -> dict[str, Any]:
    """The 500 body for a server fault, after logging it (traceback and request id) so the id finds the line."""
    rid = serve_request_id()
    # %r: the path is the client's text; a decoded newline must not forge a log line
    logger.exception("internal error, request_id=%s: %s %r: %s", rid, method, path, exc.__class__.__name__,
                     exc_info=exc)
    return {"error": "internal error", "request_id": rid}
