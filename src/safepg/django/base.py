"""The ``safepg.django`` backend: Django's PostgreSQL backend, connecting through safepg.

- Without a pool, Django's ``Database.connect(**params)`` is `safepg.connect` (psycopg 3) or
  `safepg.psycopg2.connect` (when Django uses psycopg2: only if it cannot import psycopg 3,
  which safepg itself needs, so in practice never).
- With ``OPTIONS["pool"]`` (psycopg 3, Django 5.1+), Django's psycopg_pool pool opens its
  connections with a connection class from `safepg.pool.verified_class`, so every connection
  the pool makes, later ones included, is hardened and checked.
- ``manage.py dbshell`` runs psql with a conninfo string on its command line that holds
  ``sslmode=verify-full``, the ``sslrootcert`` safepg resolves, ``gssencmode=disable`` and a
  TLS minimum, which a service file or ``PG*`` variables cannot override; the password goes
  in ``PGPASSWORD``, never on the command line.

``OPTIONS`` are libpq parameters as with Django's backend (``sslrootcert``, ``application_name``,
``options``, ...); a weaker ``sslmode`` is raised to verify-full and logged. safepg's own
options go there too: ``allow_unencrypted_unix_socket``, ``verify_as``, and for psycopg 3
``fast_path`` and ``direct_tls``. Connection errors reach you as Django wraps them
(``django.db.utils.OperationalError``), with safepg's error as ``__cause__``.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

try:
    from django.core.exceptions import ImproperlyConfigured
    from django.db.backends.base.base import NO_DB_ALIAS
    from django.db.backends.postgresql import base as _postgresql
    from django.db.backends.postgresql.client import DatabaseClient as _PostgreSQLClient
    from django.db.backends.postgresql.psycopg_any import is_psycopg3
except ImportError as _ex:  # pragma: no cover - the extra is missing
    raise ImportError("safepg.django needs Django: pip install 'safepg-tls[django]'") from _ex

from .._errors import ConfigurationError
from .._options import KEYWORDS
from .._params import REQUIRED_SSLMODE, KeywordSource, _join, build_plan, keywords_from
from .._password import target, with_password

__all__ = ["DatabaseClient", "DatabaseWrapper"]

# safepg's options in OPTIONS: for safepg, never for libpq.
_SAFEPG_OPTIONS = ("allow_unencrypted_unix_socket", "fast_path", "verify_as", "direct_tls")
# Never on psql's command line: other users of the machine can read it.
_SECRETS = ("password", "sslpassword")


# Django's settings that become libpq's parameters; the rest come from OPTIONS.
_SETTINGS = {
    "dbname": "NAME",
    "user": "USER",
    "password": "PASSWORD",
    "host": "HOST",
    "port": "PORT",
}


def _origin(key: str) -> str:
    if key in _SETTINGS:
        return f"{_SETTINGS[key]} in settings.DATABASES"
    return f'OPTIONS["{key}"] in settings.DATABASES'


def _spelling(key: str, value: str) -> str:
    if key in _SETTINGS:
        return f'"{_SETTINGS[key]}": "{value}" in settings.DATABASES'
    return f'OPTIONS["{key}"] = "{value}" in settings.DATABASES'


# Messages name a setting as settings.py spells it (OPTIONS["sslrootcert"]), not as a keyword.
DJANGO_NAMES = KeywordSource(_origin, _spelling)


def _named(verified: type[Any]) -> type[Any]:
    """*verified*, whose connections (opened in the pool's own threads) name their settings as
    settings.py spells them."""

    class Named(verified):  # type: ignore[misc]
        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:
            with keywords_from(DJANGO_NAMES):
                return super().connect(*args, **kwargs)

    Named.__name__, Named.__qualname__ = verified.__name__, verified.__qualname__
    Named.__module__ = verified.__module__
    return Named


def _driver() -> types.ModuleType:
    """Django's driver module (psycopg or psycopg2), with ``connect`` going through safepg."""
    module = _postgresql.DatabaseWrapper.Database
    driver = types.ModuleType(module.__name__, module.__doc__)
    driver.__dict__.update(vars(module))
    opener: Callable[..., Any]
    if is_psycopg3:
        from .._connect import connect

        opener = connect
    else:
        from ..psycopg2 import connect as connect_psycopg2

        opener = connect_psycopg2

    @functools.wraps(opener)
    def connect_named(*args: Any, **kwargs: Any) -> Any:
        with keywords_from(DJANGO_NAMES):
            return opener(*args, **kwargs)

    driver.connect = connect_named  # type: ignore[attr-defined]
    return driver


# psql's options that take a value (its getopt string "c:d:f:F:h:L:o:p:P:R:T:U:v:"), and their
# long names.
_VALUE_SHORT = frozenset("cdfFhLopPRTUv")
_VALUE_LONG = (
    "command", "dbname", "file", "field-separator", "host", "log-file", "output", "port",
    "pset", "record-separator", "set", "table-attr", "username", "variable",
)  # fmt: skip


def _value_option(arg: str) -> tuple[str, bool] | None:
    """The psql option taking a value that *arg* gives (``d``, ``dbname``; ``""`` for an
    ambiguous long prefix), and whether its value is the next argument; None for others."""
    if arg.startswith("--"):
        # getopt_long takes an unambiguous prefix of a long name too (--dbn).
        name, equals, _ = arg[2:].partition("=")
        found = [n for n in _VALUE_LONG if name and n.startswith(name)]
        if not found:
            return None
        return (found[0] if len(found) == 1 else ""), not equals
    if not arg.startswith("-"):
        return None
    for i, char in enumerate(arg[1:], start=1):
        if char in _VALUE_SHORT:  # takes the rest of the bundle, or the next argument
            return char, i == len(arg) - 1
    return None


class DatabaseClient(_PostgreSQLClient):
    """``dbshell``: psql with the TLS settings safepg would connect with, on its command line."""

    @classmethod
    def settings_to_cmd_args_env(
        cls, settings_dict: dict[str, Any], parameters: Any
    ) -> tuple[list[str], dict[str, str] | None]:
        """psql's command line: ``--dbname`` with a conninfo string, then Django's *parameters*.
        The conninfo is built from safepg's plan (verify-full, safepg's sslrootcert,
        ``gssencmode=disable``, a TLS minimum). libpq takes what the conninfo names over a
        service file and ``PG*`` variables, which only fill the gaps. The password never goes
        on the command line (other users can read it): it goes in ``PGPASSWORD``, as with
        Django's backend; a password callable is called now, for a TCP host only.

        Raises:
            safepg.ConfigurationError: the settings cannot give a verified session, or
                *parameters* hold ``--``, name the database, or end with an option that
                lacks its value.
        """
        parameters = [str(p) for p in parameters]
        if "--" in parameters:
            raise ConfigurationError(
                "dbshell parameters must not hold '--': psql would read what follows it as "
                "positional arguments, not as options."
            )
        last = _value_option(parameters[-1]) if parameters else None
        if last is not None and last[1]:
            raise ConfigurationError(
                f"the last dbshell parameter, {parameters[-1]!r}, is a psql option that takes a "
                "value and has none. Give the option its value."
            )
        given = {(_value_option(p) or ("", False))[0] for p in parameters}
        if given & {"d", "dbname"}:
            raise ConfigurationError(
                "dbshell parameters must not name the database (-d, --dbname): safepg gives "
                "psql the connection to open, hardened; set NAME or OPTIONS instead."
            )
        options = settings_dict.get("OPTIONS") or {}
        # Every libpq option of the policy table goes to build_plan, which refuses what it
        # refuses (a libpq that does not know one refuses it too): none is dropped.
        where: dict[str, Any] = {
            k: v for k, v in options.items() if k in KEYWORDS and k not in _SECRETS
        }
        where.update(
            host=settings_dict.get("HOST") or None,
            port=settings_dict.get("PORT") or None,
            user=settings_dict.get("USER") or None,
            # Django's default when neither names a database.
            dbname=settings_dict.get("NAME") or (None if options.get("service") else "postgres"),
        )
        with keywords_from(DJANGO_NAMES):
            plan = build_plan(
                "",
                where,
                allow_unencrypted_unix_socket=options.get("allow_unencrypted_unix_socket", False),
                verify_as=options.get("verify_as"),
            )
        shown = {k: v for k, v in plan.params.items() if k not in _SECRETS}
        # First, so that psql reads it as an option in every getopt mode (with POSIXLY_CORRECT
        # set, options after a positional argument would be read as positional too).
        args = [cls.executable_name, "--dbname=" + _join(shown), *parameters]
        env = {
            # Also in the environment, for anything psql starts that reads them.
            "PGSSLMODE": REQUIRED_SSLMODE,
            "PGSSLROOTCERT": plan.trust.path,
            "PGGSSENCMODE": "disable",
            "PGSSLMINPROTOCOLVERSION": plan.params["ssl_min_protocol_version"],
        }
        password = settings_dict.get("PASSWORD")
        if callable(password):
            minted = with_password({}, password, target(plan))
            env["PGPASSWORD"] = minted["password"]
        elif password:
            env["PGPASSWORD"] = str(password)
        return args, env


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

        try:
            from ..pool import verified_class
        except ImportError as ex:
            # Django's own wording for a missing psycopg_pool, and safepg's extra that brings it.
            raise ImproperlyConfigured(
                "Error loading psycopg_pool module.\nDid you install psycopg[pool]? "
                'OPTIONS["pool"] needs safepg\'s pool extra too: '
                "pip install 'safepg-tls[django,pool]'"
            ) from ex

        pool_options = {} if pool_options is True else dict(pool_options)
        safety = {k: options[k] for k in _SAFEPG_OPTIONS if k in options}
        base = pool_options.get("connection_class", Connection)
        pool_options["connection_class"] = _named(verified_class(base, **safety))
        # Django builds the pool from settings_dict: show it these options for that one call.
        libpq = {k: v for k, v in options.items() if k not in _SAFEPG_OPTIONS}
        settings = self.settings_dict
        self.settings_dict = {**settings, "OPTIONS": {**libpq, "pool": pool_options}}
        try:
            return super().pool
        finally:
            self.settings_dict = settings
