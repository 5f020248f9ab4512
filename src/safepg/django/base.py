"""The ``safepg.django`` backend: Django's PostgreSQL backend, connecting through safepg.

- Without a pool, Django's ``Database.connect(**params)`` is `safepg.connect` (psycopg 3) or
  `safepg.psycopg2.connect` (when Django uses psycopg2: only if it cannot import psycopg 3,
  which safepg itself needs, so in practice never).
- With ``OPTIONS["pool"]`` (psycopg 3, Django 5.1+), Django's psycopg_pool pool opens its
  connections with a connection class from `safepg.pool.verified_class`, so every connection
  the pool makes, later ones included, is hardened and checked.
- ``manage.py dbshell`` runs psql with ``PGSSLMODE=verify-full``, the ``PGSSLROOTCERT`` safepg
  resolves, ``PGGSSENCMODE=disable`` and a TLS 1.2 minimum (what ``safepg env`` prints).

``OPTIONS`` are libpq parameters as with Django's backend (``sslrootcert``, ``application_name``,
``options``, ...); a weaker ``sslmode`` is raised to verify-full and logged. safepg's own
options go there too: ``allow_unencrypted_unix_socket``, ``verify_as``, and for psycopg 3
``fast_path`` and ``direct_tls``. Connection errors reach you as Django wraps them
(``django.db.utils.OperationalError``), with safepg's error as ``__cause__``.
"""

from __future__ import annotations

import types
from typing import Any

from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base as _postgresql
from django.db.backends.postgresql.client import DatabaseClient as _PostgreSQLClient
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from .._params import MIN_TLS_VERSION, REQUIRED_SSLMODE, build_plan

__all__ = ["DatabaseClient", "DatabaseWrapper"]

# safepg's options in OPTIONS: for safepg, never for libpq.
_SAFEPG_OPTIONS = ("allow_unencrypted_unix_socket", "fast_path", "verify_as", "direct_tls")


def _driver() -> types.ModuleType:
    """Django's driver module (psycopg or psycopg2), with ``connect`` going through safepg."""
    module = _postgresql.DatabaseWrapper.Database
    driver = types.ModuleType(module.__name__, module.__doc__)
    driver.__dict__.update(vars(module))
    if is_psycopg3:
        from .._connect import connect

        driver.connect = connect  # type: ignore[attr-defined]
    else:
        from ..psycopg2 import connect as connect_psycopg2

        driver.connect = connect_psycopg2  # type: ignore[attr-defined]
    return driver


class DatabaseClient(_PostgreSQLClient):
    """``dbshell``: psql with the TLS settings safepg would connect with."""

    @classmethod
    def settings_to_cmd_args_env(
        cls, settings_dict: dict[str, Any], parameters: Any
    ) -> tuple[list[str], dict[str, str] | None]:
        """Django's psql command line, with safepg's environment on top of Django's.

        Raises:
            safepg.ConfigurationError: the settings cannot give a verified session.
        """
        args, env = super().settings_to_cmd_args_env(settings_dict, parameters)
        options = settings_dict.get("OPTIONS") or {}
        where = {
            "host": settings_dict.get("HOST") or None,
            "port": settings_dict.get("PORT") or None,
            "service": options.get("service"),
            "sslrootcert": options.get("sslrootcert"),
        }
        plan = build_plan(
            "",
            where,
            allow_unencrypted_unix_socket=options.get("allow_unencrypted_unix_socket", False),
        )
        return args, {
            **(env or {}),
            # Django passes OPTIONS["sslmode"] as PGSSLMODE: never less than verify-full.
            "PGSSLMODE": REQUIRED_SSLMODE,
            "PGSSLROOTCERT": plan.trust.path,
            "PGGSSENCMODE": "disable",
            "PGSSLMINPROTOCOLVERSION": MIN_TLS_VERSION,
        }


class DatabaseWrapper(_postgresql.DatabaseWrapper):
    """Django's PostgreSQL `DatabaseWrapper`, opening every connection through safepg."""

    Database = _driver()
    client_class = DatabaseClient

    @property
    def pool(self) -> Any:
        """Django's psycopg_pool pool, whose connection class goes through safepg."""
        options = self.settings_dict["OPTIONS"]
        pool_options = options.get("pool")
        made = self._connection_pools  # type: ignore[attr-defined]  # Django's, not in its stubs
        if not pool_options or self.alias == NO_DB_ALIAS or self.alias in made:
            return super().pool
        from psycopg import Connection

        from ..pool import verified_class

        pool_options = {} if pool_options is True else dict(pool_options)
        safety = {k: options[k] for k in _SAFEPG_OPTIONS if k in options}
        base = pool_options.get("connection_class", Connection)
        pool_options["connection_class"] = verified_class(base, **safety)
        # Django builds the pool from settings_dict: show it these options for that one call.
        libpq = {k: v for k, v in options.items() if k not in _SAFEPG_OPTIONS}
        settings = self.settings_dict
        self.settings_dict = {**settings, "OPTIONS": {**libpq, "pool": pool_options}}
        try:
            return super().pool
        finally:
            self.settings_dict = settings
