"""Raw per-request records: one row per request, shared by every kind of run.

Times are seconds since the run's start; latency is `finished - scheduled` (open loop: from
the scheduled send time). No HTTP client is imported here, so Locust (gevent) can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Final status codes that are not HTTP statuses.
CONNECTION_ERROR = -1
TIMEOUT = -2
DEGRADED_MARK = b'"degraded":true'



@dataclass
class Records:
    """One row per request. Times are seconds since the run's start (a monotonic clock)."""

    endpoints: list[str]
    endpoint: np.ndarray  # index into endpoints
    scheduled: np.ndarray  # when it should have been sent
    started: np.ndarray  # when the first attempt was actually sent
    finished: np.ndarray  # when the final answer (or error) arrived
    status: np.ndarray  # final HTTP status, or CONNECTION_ERROR / TIMEOUT
    first_status: np.ndarray  # status of the first attempt
    attempts: np.ndarray
    degraded: np.ndarray  # the answer said degraded: true (a fallback was used)
    wall_start: float = 0.0  # time.time() at the run's t=0
    meta: dict = field(default_factory=dict)

    @property
    def latency_ms(self) -> np.ndarray:
        return (self.finished - self.scheduled) * 1000.0

    @property
    def ok(self) -> np.ndarray:
        return (self.status >= 200) & (self.status < 300)

    def __len__(self) -> int:
        return len(self.scheduled)

    def select(self, mask: np.ndarray) -> Records:
        return Records(self.endpoints, self.endpoint[mask], self.scheduled[mask], self.started[mask],
                       self.finished[mask], self.status[mask], self.first_status[mask], self.attempts[mask],
                       self.degraded[mask], self.wall_start, dict(self.meta))

    @classmethod
    def empty(cls, endpoints: list[str]) -> Records:
        f, i = np.zeros(0), np.zeros(0, dtype=np.int32)
        return cls(list(endpoints), i, f, f, f, i, i, i, np.zeros(0, dtype=bool))

    @classmethod
    def from_rows(cls, endpoints: list[str], rows: Sequence[tuple], wall_start: float = 0.0) -> Records:
        """rows: (endpoint_index, scheduled, started, finished, status, first_status, attempts, degraded)."""
        if not rows:
            out = cls.empty(endpoints)
            out.wall_start = wall_start
            return out
        cols = list(zip(*rows))
        return cls(list(endpoints), np.asarray(cols[0], dtype=np.int32), np.asarray(cols[1], dtype=float),
                   np.asarray(cols[2], dtype=float), np.asarray(cols[3], dtype=float),
                   np.asarray(cols[4], dtype=np.int32), np.asarray(cols[5], dtype=np.int32),
                   np.asarray(cols[6], dtype=np.int32), np.asarray(cols[7], dtype=bool), wall_start)
