"""Courier's Ray process settings (serving/ray_env.yaml) and how the launcher applies them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_ray_reads_every_shipped_setting_and_haproxy_binds_replicas_on_all_interfaces():
    """Each variable of ray_env.yaml is one Ray 2.60 reads (its serve constants), with our value, or one
    Courier's HAProxy wrapper reads (COURIER_*). With HAProxy on, Ray binds the replicas' ports on all
    interfaces whatever RAY_SERVE_DEFAULT_HTTP_HOST says (constants.py forces it), so HAProxy on another
    node reaches them: the chart need not set that."""
    import importlib.util

    source = Path(importlib.util.find_spec("ray.serve._private.constants").origin).read_text()
    wrapper = (PROJECT_ROOT / "serving" / "haproxy_admission.py").read_text()
    shipped = load_ray_env()
    for name in shipped:
        if name.startswith("COURIER_HAPROXY_"):  # QueueLimits.from_env builds these names from its fields
            field = name.removeprefix("COURIER_HAPROXY_").lower()
            assert f'("{field}",' in wrapper, f"{name} is not a setting serving/haproxy_admission.py reads"
        else:
            assert f'"{name}"' in source, f"{name} is not a setting Ray Serve reads"
    code = ("import json; from ray.serve._private import constants as c; "
            "print(json.dumps([c.DEFAULT_HTTP_HOST, c.RAY_SERVE_HAPROXY_RETRY_ON, c.RAY_SERVE_ENABLE_DIRECT_INGRESS]))")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **shipped, "RAY_SERVE_DEFAULT_HTTP_HOST": "127.0.0.1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    host, retry_on, direct_ingress = json.loads(out.stdout.strip().splitlines()[-1])
    assert host == "0.0.0.0" and direct_ingress is True
    assert retry_on == shipped["RAY_SERVE_HAPROXY_RETRY_ON"]
