"""A small cache of short-lived tokens, for the cloud password providers.

A token is reused only until its expiry minus a margin, by the provider's own clock (which
tests replace), so that it is still valid when the server checks it, even after a slow
handshake or some clock skew.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable

from . import _forksafe
from ._errors import ConfigurationError
from ._params import is_host_name
from ._probe import _is_ip


def elapsed_clock() -> float:
    """Seconds on a clock that keeps running while the machine sleeps.

    ``time.monotonic`` stops during suspend on Linux and macOS, so a token cached before a
    laptop sleeps would look fresh after it wakes, long past its expiry. ``CLOCK_BOOTTIME``
    counts suspend; where it does not exist, wall-clock time is used.
    """
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.time()


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def margin_seconds(margin: float, lifetime: float | None = None) -> float:
    """*margin* checked: not negative, and (for a known lifetime) less than it.

    Raises:
        ConfigurationError: the margin leaves no time to use a token.
    """
    if not margin >= 0 or (lifetime is not None and margin >= lifetime):
        limit = f" and less than the token lifetime ({lifetime:g} s)" if lifetime else ""
        raise ConfigurationError(f"margin must be 0 or more seconds{limit}; got {margin!r}.")
    return float(margin)


def host_patterns(hosts: Iterable[str] | None) -> tuple[str, ...] | None:
    """*hosts* checked: names (``db.example.com``), addresses, or ``*.suffix`` patterns that
    match any name strictly below *suffix*; ``None`` for any host.

    Raises:
        ConfigurationError: *hosts* is a single string, empty, or holds a malformed entry.
    """
    if hosts is None:
        return None
    if isinstance(hosts, str | bytes):
        raise ConfigurationError(f"hosts must be a list of host names, not one string: {hosts!r}")
    patterns = tuple(hosts)
    if not patterns:
        raise ConfigurationError("hosts is empty: give the host names a token may be sent to")
    for pattern in patterns:
        name = pattern.removeprefix("*.") if isinstance(pattern, str) else ""
        if not (name.isascii() and is_host_name(name) and (":" not in name or _is_ip(name))):
            raise ConfigurationError(
                f"hosts entries are host names, addresses or '*.suffix' patterns; got {pattern!r}"
            )
    return tuple(p.lower().removesuffix(".") for p in patterns)


def host_allowed(patterns: tuple[str, ...] | None, host: str) -> bool:
    """*host* matches one of *patterns* (no patterns: every host does)."""
    if patterns is None:
        return True
    name = host.lower().removesuffix(".")
    return any(name.endswith(p[1:]) if p.startswith("*.") else name == p for p in patterns)


def refused_host(patterns: tuple[str, ...] | None, hosts: Iterable[str]) -> str | None:
    """The first of *hosts* that no pattern allows, or None: libpq sends one password to each
    host it tries, so a token may go only where every host is allowed."""
    return next((h for h in hosts if not host_allowed(patterns, h)), None)


class TokenCache:
    """Tokens by key, each with the time (by *clock*) after which it is not reused."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[Hashable, tuple[str, float]] = {}
        _forksafe.reset_in_child(self, TokenCache._after_fork)

    def _after_fork(self) -> None:
        # A parent's thread may have held the lock, fetching, when the child was forked. The
        # tokens stay: they are as valid in the child.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<TokenCache of {len(self._tokens)} token(s)>"  # never the tokens

    def get(self, key: Hashable, fetch: Callable[[], tuple[str, float]]) -> str:
        """The cached token for *key*, or a new one from *fetch*: (token, reuse until)."""
        # Held while fetching: concurrent connects (a pool filling up) share one new token.
        with self._lock:
            held = self._tokens.get(key)
            if held is not None and self._clock() < held[1]:
                return held[0]
            token, until = fetch()
            self._tokens[key] = (token, until)
            return token

    def clear(self) -> None:
        """Forget every token."""
        with self._lock:
            self._tokens.clear()
