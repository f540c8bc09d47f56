"""The one place a load run's numbers come from: `loadtest/config.yaml`.

It holds the SLO, the target rate (the highest rate this machine holds with margin; the
measurement behind it is in docs/benchmarks.md), the scenarios, the chaos plan and the
benchmark's rates. Rates in scenarios may be a number or `target` / `<k>x target`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = Path(__file__).resolve().parent / "config.yaml"


def load_config(path: Path | str | None = None) -> dict[str, Any]:
    """The config as a dict (a fresh copy each call)."""
    return copy.deepcopy(yaml.safe_load(Path(path or CONFIG_FILE).read_text()))


def resolve_rate(value: Any, target: float) -> float:
    """A rate from the config: 150, "target", "0.5x target" or "2x target" -> req/s."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower().replace(" ", "")
    if text == "target":
        return float(target)
    if text.endswith("xtarget"):
        return float(text[: -len("xtarget")]) * float(target)
    raise ValueError(f"rate must be a number, 'target' or '<k>x target', got {value!r}")


def scenario(config: dict[str, Any], name: str) -> dict[str, Any]:
    """One scenario's settings with its rates resolved against the target rate."""
    scenarios = config["scenarios"]
    if name not in scenarios:
        raise KeyError(f"no scenario {name!r} in {CONFIG_FILE.name}; scenarios: {sorted(scenarios)}")
    spec = copy.deepcopy(scenarios[name])
    target = float(config["target_rate"])
    if "rate" in spec:
        spec["rate"] = resolve_rate(spec["rate"], target)
    if "stages" in spec:
        spec["stages"] = [{"duration_s": float(s["duration_s"]), "rate": resolve_rate(s["rate"], target)}
                          for s in spec["stages"]]
    if "rates" in spec:
        spec["rates"] = [resolve_rate(r, target) for r in spec["rates"]]
    spec["name"] = name
    return spec
