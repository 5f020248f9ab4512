"""``safepg ca [--host HOST]``: the path of the trust file safepg would use.

So that ``PGSSLROOTCERT=$(safepg ca --host H) psql "host=H sslmode=verify-full ..."`` works, a
host whose provider issues its own CA per instance or cluster (Cloud SQL, DigitalOcean, ...)
gets no path at all unless the caller named that CA: the OS store could never verify it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._output import EXIT_OK, EXIT_USAGE, Output, add_json, add_verbose, port_arg, trust_json

if TYPE_CHECKING:
    from .._trust import TrustSource
    from ._output import Subparsers

SCHEMA = "safepg.ca/1"
# Trust safepg fell back to, rather than a file the caller named (sslrootcert, PGSSLROOTCERT,
# ~/.postgresql/root.crt) or a set it ships.
_FALLBACK_ORIGINS = ("os-store", "certifi")


def register(commands: Subparsers) -> None:
    parser = commands.add_parser("ca", help="print the path of the trust file safepg would use")
    parser.add_argument("--host", help="the server's host name (chooses provider roots)")
    parser.add_argument(
        "--port",
        type=port_arg,
        help="the server's port (accepted for symmetry: only the host name chooses the file)",
    )
    add_json(parser)
    add_verbose(parser)
    parser.set_defaults(run=run)


def unverifiable(hosts: Sequence[str], trust: TrustSource) -> str | None:
    """Why *trust* cannot verify one of *hosts*, or None: a provider that issues its own CA per
    instance or cluster, which safepg does not ship and no OS store holds, while *trust* is
    only the fallback (the caller named no CA file). The provider's own advice, for people."""
    from .. import providers

    if trust.origin not in _FALLBACK_ORIGINS:
        return None
    for host in hosts:
        profile = providers.profile_for_host(host)
        if profile is not None and profile.trust == "not-bundled":
            return (
                f"{host} is a host of {profile.name}, whose CA safepg does not ship and neither "
                "the OS trust store nor certifi holds: no trust file safepg could choose "
                f"would verify it. {profile.untrusted_hint(host)}"
            )
    return None


def run(args: argparse.Namespace, out: Output) -> int:
    import safepg

    from .. import providers
    from .._params import is_host_name

    profile = providers.profile_for_host(args.host) if args.host else None
    doc = out.start(
        SCHEMA,
        # Shown once checked: a mistyped URL may put a password in it.
        host=args.host if args.host and is_host_name(args.host) else None,
        port=args.port,
        path=None,
        label=None,
        origin=None,
        provider=(
            {"key": profile.key, "name": profile.name, "trust": profile.trust} if profile else None
        ),
    )
    extra: dict[str, Any] = {"host": args.host} if args.host else {}
    if args.port is not None:
        extra["port"] = args.port
    try:
        # Without a TCP host, the trust anchors for "any server": a socket host is not refused.
        trust = safepg.resolve_trust(allow_unencrypted_unix_socket=True, **extra)
    except safepg.ConfigurationError as ex:
        return out.fail(ex)
    problem = unverifiable([args.host] if args.host else [], trust)
    if problem is not None:
        return out.refuse(EXIT_USAGE, "ConfigurationError", problem)
    doc.update(trust_json(trust) or {})
    if not out.json:
        out.line(trust.path)
        if args.verbose:
            out.note(trust.label)
    return out.finish(EXIT_OK)
