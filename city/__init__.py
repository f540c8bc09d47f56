"""The live city: the simulated city's people ordering through serving, with the truth kept.

`python -m city` runs it (see city/__main__.py); `City` (city.live) is the drill's Python API,
`World` (city.world) the state and truth. Imports are lazy so the CLI can quiet the simulator's
progress bars before the simulator is loaded.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SCENARIOS", "City", "World"]


def __getattr__(name: str) -> Any:
    if name == "City":
        from city.live import City

        return City
    if name in ("World", "SCENARIOS"):
        from city import world

        return getattr(world, name)
    raise AttributeError(f"module 'city' has no attribute {name!r}")
