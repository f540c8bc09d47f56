"""How `serving.launch` stops: the front door drains, then Serve, then Ray, in seconds (#13).

Ray Serve's own shutdown SIGKILLs HAProxy first (cutting the requests it relays), waits a fixed 30 s for
its controller, and keeps stopping Ingress replicas reachable for 30 s for external load balancers; and the
interpreter then spends seconds finalizing Ray's core worker. Here HAProxy is soft-stopped first, Serve's
drain is bounded by the deployments' own graceful_shutdown_timeout_s, and the process exits once Ray is down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any, NoReturn

from serving import reaper

DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0  # Ray Serve's, for a deployment that does not set one


def stop_timeout_s(schema: Any) -> float:
    """How long a stop waits for Serve to drain: the longest graceful shutdown of a deployment, plus a margin.

    After it, Ray is shut down anyway: a request still running by then is past the HTTP timeout."""
    from ray.serve._private.constants import (
        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S,
        RAY_SERVE_DIRECT_INGRESS_SHUTDOWN_BUFFER_S,
    )

    longest = DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S
    timeouts = [d.graceful_shutdown_timeout_s for app in schema.applications for d in app.deployments
                if isinstance(d.graceful_shutdown_timeout_s, int | float)]
    if timeouts:
        longest = max(timeouts)
    # Ray Serve floors the ingress replicas' timeout at its direct-ingress draining period plus a buffer.
    floor = RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S + RAY_SERVE_DIRECT_INGRESS_SHUTDOWN_BUFFER_S
    return max(longest, floor) + 2


def drain_front_door(timeout_s: float) -> int:
    """Soft-stop the HAProxy processes this launcher started: they stop listening at once and exit when their
    in-flight requests are answered. Returns how many were still running after `timeout_s`.

    Serve's own shutdown SIGKILLs HAProxy first, which cuts the requests it is relaying; draining it before
    is what lets Ctrl-C answer every request already sent."""
    haproxy = reaper.named(reaper.tree({os.getpid()}, reaper.process_table()), "haproxy")
    for pid in haproxy:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)  # HAProxy's soft stop
    deadline = time.monotonic() + timeout_s
    running = haproxy
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [pid for pid in running if _running(pid)]
    return len(running)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited HAProxy stays one until its parent, a Ray worker, reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def stop_serve(timeout_s: float) -> None:
    """Serve's graceful shutdown (in-flight requests finish, replicas drain), waited for at most `timeout_s`."""
    # Serve's own client: serve.shutdown() would wait a fixed 30 s.
    from ray.serve.context import _get_global_client, _set_global_client

    try:
        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # noqa: BLE001 (Serve never started, or its controller is gone: nothing to drain)
        return
    if client is None:
        return
    client.shutdown(timeout_s=timeout_s)
    _set_global_client(None)


def exit_now(code: int) -> NoReturn:
    """Exit once Ray is shut down, skipping the interpreter's teardown: finalizing Ray's C++ core worker took
    another 5-7 s after `ray.shutdown()` returned, with nothing left to clean up (measured on `make serve`)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
