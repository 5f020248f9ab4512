"""``safepg env [URL]``: shell exports that make other libpq tools verify as safepg does."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._output import EXIT_OK, EXIT_USAGE, Output, add_json, add_verbose, trust_json
from .ca import unverifiable

if TYPE_CHECKING:
    from ._output import Subparsers

SCHEMA = "safepg.env/1"


def register(commands: Subparsers) -> None:
    parser = commands.add_parser("env", help="print shell exports for psql and other libpq tools")
    parser.add_argument("target", nargs="?", metavar="URL|CONNINFO", help="chooses the trust file")
    add_json(parser)
    add_verbose(parser)
    parser.set_defaults(run=run)


# What each export must leave libpq with: a URL's or service file's own value beats the
# environment, so psql would use that one instead.
_WANTED: dict[str, Callable[[str, dict[str, str]], bool]] = {
    "sslmode": lambda value, exports: value == exports["PGSSLMODE"],
    "sslrootcert": lambda value, exports: value == exports["PGSSLROOTCERT"],
    "gssencmode": lambda value, exports: value == "disable",
    "ssl_min_protocol_version": lambda value, exports: value in ("TLSv1.2", "TLSv1.3"),
}


def _overridden(target: str, exports: dict[str, str], skip: str = "") -> str | None:
    """Why psql, given *target* and these *exports*, would not verify as safepg does, or None.

    libpq takes a keyword from the conninfo or URL first, then from the service file it names
    (or ``PGSERVICE``), and only then from the environment: libpq itself is asked what it would
    use, with the exports in place.
    """
    import os

    from psycopg.conninfo import conninfo_to_dict

    from .._params import _libpq_view

    given = {k: str(v) for k, v in conninfo_to_dict(target).items() if v is not None}
    saved = {key: os.environ.get(key) for key in exports}
    os.environ.update(exports)
    try:
        view = _libpq_view(given, (given.get("password"), given.get("sslpassword")))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for key, wanted in _WANTED.items():
        value = view.get(key, "")
        if key == skip or wanted(value, exports):
            continue
        service = given.get("service") or os.environ.get("PGSERVICE", "")
        where = "the URL" if key in given else f"service {service!r} in the service file"
        return (
            f"{where} sets {key}={shlex.quote(value)}, and libpq would use it instead of the "
            f"exported setting, so psql would not verify as safepg does. Remove {key} from "
            f"{where}, then run safepg env again."
        )
    return None


def run(args: argparse.Namespace, out: Output) -> int:
    import psycopg

    from .._errors import ConfigurationError
    from .._params import MIN_TLS_VERSION, REQUIRED_SSLMODE, build_plan

    doc = out.start(SCHEMA, env=None, trust=None)
    exports = {
        "PGSSLMODE": REQUIRED_SSLMODE,
        "PGSSLROOTCERT": "",  # known once the trust anchors are
        "PGGSSENCMODE": "disable",
        "PGSSLMINPROTOCOLVERSION": MIN_TLS_VERSION,
    }
    # First what the URL (or its service) sets that psql would use over the exports: refused
    # before safepg's own hardening says it raised it, which psql would not.
    try:
        overridden = _overridden(args.target or "", exports, skip="sslrootcert")
    except (psycopg.Error, ConfigurationError):
        overridden = None  # a malformed target: build_plan says what is wrong with it
    if overridden is not None:
        return out.refuse(EXIT_USAGE, "ConfigurationError", overridden)
    try:
        # Without a TCP host, the trust anchors for "any server": a socket host is not refused.
        plan = build_plan(args.target or "", {}, allow_unencrypted_unix_socket=True)
    except ConfigurationError as ex:
        return out.fail(ex)
    trust = plan.trust
    doc["trust"] = trust_json(trust)
    problem = unverifiable([t.host for t in plan.targets if not t.socket], trust)
    # A socket named anywhere (the target, PGHOST, a service): psql would use it. Only libpq's
    # built-in default (no host at all) passes without a target: psql will be given a host.
    if any(t.socket and (t.host or args.target) for t in plan.targets):
        problem = (
            "a host (of the target, PGHOST or the service) is a Unix-domain socket, which "
            "libpq never encrypts: no export can make psql verify it. Give a TCP host name, "
            "or unset PGHOST."
        )
    if problem is not None:
        return out.refuse(EXIT_USAGE, "ConfigurationError", problem)
    exports["PGSSLROOTCERT"] = trust.path
    overridden = _overridden(args.target or "", exports)
    if overridden is not None:
        return out.refuse(EXIT_USAGE, "ConfigurationError", overridden)
    doc["env"] = exports
    if not out.json:
        out.line(f"# trust anchors: {trust.label}")
        for key, value in exports.items():
            out.line(f"export {key}={shlex.quote(value)}")
    return out.finish(EXIT_OK)
