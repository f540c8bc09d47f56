"""Courier's Ray process settings (serving/ray_env.yaml) and how the launcher applies them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.config import RAY_ENV, apply_ray_env, load_ray_env
from serving.launch import isolate_haproxy
from serving.paths import PROJECT_ROOT


def test_the_shipped_settings_are_environment_strings_and_an_explicit_value_wins():
    shipped = load_ray_env()
    assert shipped["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and shipped["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "PATH": "/bin"}
    effective = apply_ray_env(environ)
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0" == effective["RAY_SERVE_ENABLE_HA_PROXY"]
    assert all(environ[key] == value for key, value in shipped.items() if key != "RAY_SERVE_ENABLE_HA_PROXY")
    assert environ["PATH"] == "/bin"


def test_an_unquoted_setting_is_refused_with_what_to_do(tmp_path):
    bad = tmp_path / "ray_env.yaml"
    bad.write_text("RAY_SERVE_THROUGHPUT_OPTIMIZED: 1\n")
    with pytest.raises(ValueError, match="quote the values of \\['RAY_SERVE_THROUGHPUT_OPTIMIZED'\\]"):
        load_ray_env(bad)


def test_each_local_instance_gets_its_own_haproxy_files_and_ports():
    """Two instances on one machine (a test's own server next to the suite's) must not share them."""
    first, second = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}, {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    isolate_haproxy(first)
    isolate_haproxy(second)
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_STATS_PORT",
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"):
        assert first[key] != second[key], key
    kept = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": "8404"}
    isolate_haproxy(kept)
    assert kept["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"
    off = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    isolate_haproxy(off)
    assert off == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}


def test_the_launcher_does_not_import_ray_before_applying_the_settings():
    """Ray reads these when its modules load: serving.launch must get there first."""
    code = "import sys, serving.launch; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert RAY_ENV.parent == PROJECT_ROOT / "serving"
