"""``safepg env [URL]``: shell exports that make other libpq tools verify as safepg does."""

from __future__ import annotations

import argparse
import shlex
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


def run(args: argparse.Namespace, out: Output) -> int:
    from .._errors import ConfigurationError
    from .._params import MIN_TLS_VERSION, REQUIRED_SSLMODE, build_plan

    doc = out.start(SCHEMA, env=None, trust=None)
    try:
        # Without a TCP host, the trust anchors for "any server": a socket host is not refused.
        plan = build_plan(args.target or "", {}, allow_unencrypted_unix_socket=True)
    except ConfigurationError as ex:
        return out.fail(ex)
    trust = plan.trust
    doc["trust"] = trust_json(trust)
    problem = unverifiable([t.host for t in plan.targets if not t.socket], trust)
    if problem is not None:
        return out.refuse(EXIT_USAGE, "ConfigurationError", problem)
    exports = {
        "PGSSLMODE": REQUIRED_SSLMODE,
        "PGSSLROOTCERT": trust.path,
        "PGGSSENCMODE": "disable",
        "PGSSLMINPROTOCOLVERSION": MIN_TLS_VERSION,
    }
    doc["env"] = exports
    if not out.json:
        out.line(f"# trust anchors: {trust.label}")
        for key, value in exports.items():
            out.line(f"export {key}={shlex.quote(value)}")
    return out.finish(EXIT_OK)
