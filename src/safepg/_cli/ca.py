"""``safepg ca [--host HOST] [--fetch] [-o FILE]``: the path of the trust file safepg would use.

So that ``PGSSLROOTCERT=$(safepg ca --host H) psql "host=H sslmode=verify-full ..."`` works, a
host whose provider issues its own CA per instance or cluster gets no path at all unless the
caller named that CA, or safepg can fetch it from the provider's API (Cloud SQL, DigitalOcean,
Aiven: with the provider's credentials, cached): the OS store could never verify it.

``--fetch`` fetches the provider's CA anew, even when cached (after a rotation); ``-o FILE``
copies the trust file to FILE (atomically, mode 0644: it holds public certificates only) and
prints FILE, for a psql or CI configuration that wants a stable name.
"""

from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="fetch the CA from the provider's API now, even if cached (Cloud SQL, "
        "DigitalOcean, Aiven hosts)",
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="copy the trust file to FILE and print FILE"
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


def _copy(trust: TrustSource, output: str) -> TrustSource:
    """*trust*'s certificates, as safepg read them, written atomically to *output*."""
    import dataclasses
    import os
    import tempfile
    from pathlib import Path

    from .. import _x509

    certs = _x509.parse_pem(Path(trust.path).read_bytes())
    target = Path(output)
    fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=".safepg-ca-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(c.pem() for c in certs))
        os.chmod(tmp, 0o644)  # public certificates: psql and others may read them
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dataclasses.replace(trust, path=str(target))


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
        output=None,
    )
    if args.fetch and (profile is None or profile.trust != "fetched"):
        return out.refuse(
            EXIT_USAGE,
            "ConfigurationError",
            "--fetch needs --host with a host of a provider whose CA safepg fetches from its "
            "API (Google Cloud SQL *.sql.goog, DigitalOcean *.db.ondigitalocean.com, Aiven "
            "*.aivencloud.com).",
        )
    extra: dict[str, Any] = {"host": args.host} if args.host else {}
    if args.port is not None:
        extra["port"] = args.port
    try:
        if args.fetch and profile is not None:
            from .. import _fetch

            _fetch.fetch(profile.key, host=args.host, force=True)
        # Without a TCP host, the trust anchors for "any server": a socket host is not refused.
        trust = safepg.resolve_trust(allow_unencrypted_unix_socket=True, **extra)
        if args.output:
            trust = _copy(trust, args.output)
            doc["output"] = trust.path
    except safepg.ConfigurationError as ex:
        return out.fail(ex)
    except OSError as ex:
        return out.fail(ex, f"could not write {args.output}: {ex.strerror}")
    problem = unverifiable([args.host] if args.host else [], trust)
    if problem is not None:
        return out.refuse(EXIT_USAGE, "ConfigurationError", problem)
    doc.update(trust_json(trust) or {})
    if not out.json:
        out.line(trust.path)
        if args.verbose:
            out.note(trust.label)
    return out.finish(EXIT_OK)
