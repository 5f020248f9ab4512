"""One deadline per connect, shared by safepg's probes, libpq's attempts and the diagnosis.

libpq's ``connect_timeout`` (T) bounds each of its connection attempts. safepg adds work around
them: the fast path's probe before the first attempt, a retry after a CA rotation or a host that
stopped taking direct TLS, and a diagnosis probe after a failure. Each step used to get its own
timeout, per socket operation, so a peer answering every step just in time could hold a connect
for several times T. Now all of them draw on one budget: a connect to one host ends within
1.5 T. Without ``connect_timeout``, T is psycopg's own default for an attempt (130 s), and
safepg's own probes keep their shorter caps.
"""

from __future__ import annotations

import math
import time

# psycopg's timeout for a connection attempt when connect_timeout is not set.
DEFAULT_ATTEMPT_TIMEOUT = 130.0
# What safepg's probes may take without a connect_timeout.
PROBE_CAP = 10.0
DIAGNOSIS_CAP = 5.0
# libpq's smallest connect_timeout: a retry with less than this left is not started.
MIN_ATTEMPT = 2.0


class Deadline:
    """The time left for one connect: 1.5 times the attempt timeout, from now."""

    def __init__(self, attempt_timeout: float | None) -> None:
        self.explicit = attempt_timeout is not None
        self.attempt = attempt_timeout or DEFAULT_ATTEMPT_TIMEOUT
        self.end = time.monotonic() + 1.5 * self.attempt

    def left(self) -> float:
        return max(self.end - time.monotonic(), 0.0)

    def probe_budget(self) -> float:
        """For the fast path's probe before the first attempt: half the attempt timeout, so
        that a host stalling both the probe and libpq costs at most 1.5 T."""
        cap = self.attempt / 2 if self.explicit else PROBE_CAP
        return min(cap, self.left())

    def diagnosis_budget(self) -> float:
        """For the probe that explains a failure: what is left, at most DIAGNOSIS_CAP."""
        return min(DIAGNOSIS_CAP, self.left())

    def attempt_timeout(self) -> int | None:
        """connect_timeout for another libpq attempt: None when the whole attempt timeout still
        fits (leave the caller's setting alone), 0 when too little is left to start one."""
        left = self.left()
        if left >= self.attempt:
            return None
        return math.floor(left) if left >= MIN_ATTEMPT else 0

    def params_for(self, params: dict[str, str], retry: bool) -> dict[str, str] | None:
        """libpq's parameters for an attempt: *params* as they are for the first; a retry gets
        what is left of the deadline as its connect_timeout, and None means too little is left
        to start one."""
        if not retry:
            return params
        limit = self.attempt_timeout()
        if limit == 0:
            return None
        return params if limit is None else {**params, "connect_timeout": str(limit)}
