"""COURIER_REDIS: how every Courier process finds Redis, in Feast's connection-string form.

`host:port[,password=...][,ssl=true][,db=N]` is what Feast's Redis online store takes, so one
variable serves the online store, the prediction log, the live city's outcomes and the monitor
(on Kubernetes the chart sets it, password included). No Feast import here: it takes seconds.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT = "127.0.0.1:6379"


def redis_address(address: str | None = None) -> str:
    """The address given, else COURIER_REDIS, else 127.0.0.1:6379."""
    return address or os.environ.get("COURIER_REDIS", DEFAULT)


def redis_options(address: str | None = None) -> dict[str, Any]:
    """Keyword arguments of redis.Redis (and redis.asyncio.Redis) for an address (module doc)."""
    where, *options = redis_address(address).split(",")
    host, _, port = where.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"a Redis address is host:port[,password=...], got {where!r}: set COURIER_REDIS")
    extra = dict(option.split("=", 1) for option in options if "=" in option)
    return {"host": host, "port": int(port), "password": extra.get("password") or None,
            "db": int(extra.get("db", 0)), "ssl": extra.get("ssl", "false").lower() == "true"}
