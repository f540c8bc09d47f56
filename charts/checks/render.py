"""Render the chart with the real helm binary (scripts/tools.sh finds or fetches the pinned one)."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "courier"
RELEASE = NAMESPACE = "courier"


class RenderError(RuntimeError):
    """helm template refused the values; the message is helm's."""


@cache
def helm_binary() -> str:
    """Path of the pinned helm v4 (PATH first, else extracted into .tools/bin)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "tools.sh"), "helm"], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/tools.sh helm failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def helm(*args: str) -> subprocess.CompletedProcess:
    """Run helm in the project root; the caller checks the return code."""
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, cwd=ROOT, check=False)


@cache
def render_text(values_files: tuple[str, ...] = (), sets: tuple[str, ...] = (), chart: str = str(CHART),
                release: str = RELEASE, namespace: str = NAMESPACE) -> tuple[str, str, int]:
    """(stdout, stderr, exit code) of `helm template`; sets are --set-json items ("a.b=1")."""
    args = ["template", release, chart, "--namespace", namespace]
    for path in values_files:
        args += ["-f", path]
    for item in sets:
        args += ["--set-json", item]
    out = helm(*args)
    return out.stdout, out.stderr, out.returncode


def render(values_files: tuple[str, ...] = (), sets: tuple[str, ...] = (), chart: str = str(CHART),
           release: str = RELEASE) -> list[dict[str, Any]]:
    """The rendered objects; RenderError with helm's message when the render fails."""
    stdout, stderr, code = render_text(tuple(values_files), tuple(sets), chart, release)
    if code != 0:
        raise RenderError(stderr.strip())
    return [doc for doc in yaml.safe_load_all(stdout) if doc]
