"""Hardened plans remembered per input, so that a warm connect does not harden them again.

`_params.build_plan` costs more than the rest of safepg's work on a warm connect (a pool opens
connections with the same parameters again and again). `plan_for` returns the plan built
earlier for the same input while nothing it depended on can have changed:

- the same conninfo string, keywords (less the secrets, below), socket opt-in and effective
  user (a process that drops privileges reads another home directory's files);
- the same environment, every variable of it (libpq's ``PG*``, ``SSL_CERT_FILE``, ``HOME``...);
- the trust file chosen is unchanged (device, inode, size and mtime in ns), and libpq's default
  ``~/.postgresql/root.crt`` has not appeared or gone since;
- CRL files libpq would read (``sslcrl``, ``sslcrldir``, the default ``root.crl``) are checked
  again on every use, once per version on disk: they may hold certificates libpq would trust;
- a trust set of the caller's, the OS store or certifi: never a provider's bundle (which may be
  refreshed), a service file (read again by libpq) or ``verify_as`` (a DNS lookup each time).

Nothing is remembered while the ``safepg`` logger shows debug messages: `build_plan` then runs,
and says what it decides, on every connect. Secrets given as keywords (``password``,
``sslpassword``) are not kept: they are checked as `build_plan` checks them and put back into
the remembered plan's parameters. A password written into the conninfo string is part of the
string, which `_params` already remembers for libpq's parse of it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from . import _options, _trust
from ._environ import getenv
from ._params import Plan, build_plan, check_text

logger = logging.getLogger("safepg")

_SECRETS = ("password", "sslpassword")
_CACHEABLE_ORIGINS = frozenset({"sslrootcert", "PGSSLROOTCERT", "os-store", "certifi"})
_MAX = 64

_Key = tuple[str, tuple[tuple[str, str], ...], tuple[str, ...], bool, int]
_StatKey = tuple[int, int, int, int]
# input -> the plan (without keyword secrets), the environment, the trust file's stat key, and
# libpq's default root file (path, whether it existed).
_memo: OrderedDict[_Key, tuple[Plan, dict[Any, Any], _StatKey, tuple[str | None, bool]]] = (
    OrderedDict()
)
_lock = threading.Lock()
_ENVIRON: Any = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _geteuid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0


def _environment() -> dict[Any, Any] | None:
    """The whole environment, as os.environ holds it (None where it cannot be read cheaply)."""
    return dict(_ENVIRON) if isinstance(_ENVIRON, dict) else None


def _same_environment(snapshot: dict[Any, Any]) -> bool:
    return isinstance(_ENVIRON, dict) and snapshot == _ENVIRON


def _default_root() -> tuple[str | None, bool]:
    root = _trust.libpq_default_root()
    return (None, False) if root is None else (str(root), os.path.exists(root))


def _same_default_root(found: tuple[str | None, bool]) -> bool:
    path, existed = found  # the environment (HOME) is unchanged: the same path
    return path is None or os.path.exists(path) == existed


def plan_for(
    conninfo: str,
    kwargs: Mapping[str, Any],
    *,
    allow_unencrypted_unix_socket: object = False,
    verify_as: str | None = None,
) -> Plan:
    """`_params.build_plan`, remembered as the module docstring says.

    Raises:
        ConfigurationError: as `_params.build_plan`.
    """
    if verify_as is not None or logger.isEnabledFor(logging.DEBUG):
        return build_plan(
            conninfo,
            kwargs,
            allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
            verify_as=verify_as,
        )
    secrets = {k: kwargs[k] for k in _SECRETS if kwargs.get(k) is not None}
    try:
        key: _Key | None = (
            conninfo,
            tuple(
                sorted((k, str(v)) for k, v in kwargs.items() if k not in secrets and v is not None)
            ),
            tuple(sorted(secrets)),
            allow_unencrypted_unix_socket is True,
            # The effective user: without HOME, libpq's files are those of its home directory.
            _geteuid(),
        )
    except TypeError:
        key = None
    if key is not None and type(allow_unencrypted_unix_socket) is bool:
        with _lock:
            found = _memo.get(key)
        if found is not None:
            kept, snapshot, trust_key, default_root = found
            if (
                _same_environment(snapshot)
                and _trust.file_key(kept.trust.path) == trust_key
                and _same_default_root(default_root)
            ):
                # libpq loads certificates from CRL files as trust anchors: a file that changed
                # (or a default root.crl that appeared) since is checked again, per version.
                _options.check_crl_files(kept.resolved)
                with _lock:
                    if key in _memo:
                        _memo.move_to_end(key)
                if not secrets:
                    return kept
                values = {k: str(v) for k, v in secrets.items()}
                for name, value in values.items():
                    check_text(name, value)
                return replace(kept, params={**kept.params, **values})
    environ = _environment()
    plan = build_plan(
        conninfo,
        kwargs,
        allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
        verify_as=verify_as,
    )
    if (
        key is None
        or environ is None
        or type(allow_unencrypted_unix_socket) is not bool
        or plan.trust.origin not in _CACHEABLE_ORIGINS
        or plan.resolved.get("service")
        or "service" in plan.params
        # libpq before 16 does not report a service that PGSERVICE names among its options.
        or getenv("PGSERVICE")
        or not _same_environment(environ)
    ):
        return plan
    stat_key = _trust.file_key(plan.trust.path)
    if stat_key is None:
        return plan
    without = replace(plan, params={k: v for k, v in plan.params.items() if k not in secrets})
    with _lock:
        _memo[key] = (without, environ, stat_key, _default_root())
        while len(_memo) > _MAX:
            _memo.popitem(last=False)
    return plan


def clear_memory() -> None:
    """Forget the plans remembered in this process."""
    with _lock:
        _memo.clear()
