"""Reading the prediction and outcome streams with a Redis consumer group.

Each stream entry has one field `r`: the record as orjson bytes (docs/monitoring.md). The monitor
reads through a consumer group, so a restarted monitor goes on where it stopped: entries it had
read but not acknowledged (it died first) come back first, then new ones. An entry is acknowledged
once the monitor has taken it into its join state; that state is in memory, so a crash loses the
records waiting for their other half (counted as never joined), never the ones still unread.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from feature_repo.connection import redis_options


@dataclass
class Entry:
    """One stream entry: which stream (its role, "predictions" or "outcomes"), its id, its record."""

    stream: str
    entry_id: bytes
    record: dict[str, Any] | None  # None: not decodable (acknowledged and counted, never retried)
    error: str | None = None


def connect(address: str | None) -> redis.Redis:
    """A Redis client for COURIER_REDIS's form (feature_repo/connection.py; default: COURIER_REDIS)."""
    return redis.Redis(**redis_options(address), socket_timeout=10, socket_connect_timeout=3)


def decode(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """The record of one entry; ValueError or TypeError saying what is wrong with it otherwise."""
    raw = fields.get(b"r")
    if raw is None:
        raise ValueError(f"entry has no field 'r' (fields: {sorted(k.decode(errors='replace') for k in fields)})")
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"field 'r' is not JSON: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("request_id"), str):
        raise TypeError("record is not an object with a string request_id")
    return record


class StreamConsumer:
    """One consumer of a group over several streams: `read()` then `ack()` what was taken in."""

    def __init__(self, client: redis.Redis, streams: dict[str, str], group: str, consumer: str | None = None,
                 start_id: str = "0"):
        """`streams` maps a role ("predictions", "outcomes") to its key; a new group starts at
        `start_id` ("0": everything still in the stream, "$": only what arrives from now on)."""
        self.client, self.streams, self.group = client, dict(streams), group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.start_id = start_id
        self.role_of = {key.encode(): role for role, key in self.streams.items()}
        self._recovering = True  # first our own pending entries (delivered before a crash), then new ones

    def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream itself) unless it exists: safe to repeat."""
        for key in self.streams.values():
            try:
                self.client.xgroup_create(key, self.group, id=self.start_id, mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def read(self, count: int = 500, block_ms: int = 1000) -> list[Entry]:
        """Up to `count` entries per stream; waits up to `block_ms` when there are none."""
        if self._recovering:
            entries = self._read({key: "0" for key in self.streams.values()}, count, None)
            if entries:
                return entries
            self._recovering = False
        return self._read({key: ">" for key in self.streams.values()}, count, block_ms)

    def _read(self, ids: dict[str, str], count: int, block_ms: int | None) -> list[Entry]:
        try:
            answer = self.client.xreadgroup(self.group, self.consumer, ids, count=count, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_groups()  # the stream was deleted (or Redis restarted empty): start over
            return []
        entries = []
        for key, items in answer or []:
            role = self.role_of[key if isinstance(key, bytes) else key.encode()]
            for entry_id, fields in items:
                if fields is None:  # a pending entry trimmed from the stream meanwhile
                    entries.append(Entry(role, entry_id, None, "trimmed before it was acknowledged"))
                    continue
                try:
                    entries.append(Entry(role, entry_id, decode(fields)))
                except (ValueError, TypeError) as exc:
                    entries.append(Entry(role, entry_id, None, str(exc)))
        return entries

    def ack(self, entries: list[Entry]) -> None:
        """Acknowledge entries: the group will not hand them out again."""
        by_stream: dict[str, list[bytes]] = {}
        for entry in entries:
            by_stream.setdefault(self.streams[entry.stream], []).append(entry.entry_id)
        if not by_stream:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, ids in by_stream.items():
            pipe.xack(key, self.group, *ids)
        pipe.execute()
