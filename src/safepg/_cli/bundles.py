"""``safepg bundles check|install FILE``: check a CA bundle as safepg checks its own data, and
make a newer copy of a shipped file the one safepg uses (no download, ever)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._text import shown
from ._output import (
    EXIT_INSECURE,
    EXIT_OK,
    EXIT_USAGE,
    Output,
    add_json,
    add_verbose,
    iso,
    plural,
)

if TYPE_CHECKING:
    from .._bundles import CheckedCert
    from ._output import Subparsers

SCHEMA = "safepg.bundles/1"


def register(commands: Subparsers) -> None:
    from ..providers import BUNDLES

    shipped = sorted(name for b in BUNDLES for name in b.files)
    parser = commands.add_parser("bundles", help="check or install newer copies of CA files")
    actions = parser.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="check a CA bundle file")
    check.add_argument("file", help="the PEM file to check")
    check.add_argument("--replace", choices=shipped, help="show the difference to this file")
    install = actions.add_parser(
        "install", help="check a newer copy of a shipped CA file and use it from now on"
    )
    install.add_argument("file", help="the newer copy (PEM), checked before it is used")
    install.add_argument("--replace", choices=shipped, required=True, help="the file it replaces")
    for action in (check, install):
        add_json(action)
        add_verbose(action)
        action.set_defaults(run=run)


def _fingerprints(path: str) -> dict[str, str]:
    """The certificates of a PEM file, read as OpenSSL and `_bundles.check_bundle` read it."""
    from .. import _x509

    with open(path, "rb") as f:
        blocks = _x509.read_pem(f.read())
    certs = [_x509.certificate(b) for b in blocks if b.label in _x509.CERTIFICATE_LABELS]
    return {c.sha256.upper(): _x509.common_name(c.subject) or "?" for c in certs}


def _cert(cert: CheckedCert) -> dict[str, Any]:
    return {
        "sha256": cert.sha256,
        "subject": cert.subject,
        "issuer": cert.issuer,
        "not_after": iso(cert.not_after),
        "self_signed": cert.self_signed,
    }


def run(args: argparse.Namespace, out: Output) -> int:
    doc = out.start(
        SCHEMA,
        action=args.bundle_command,
        file=args.file,
        replace=args.replace,
        certificates=[],
        added=[],
        removed=[],
        installed_as=None,
    )
    from .. import _bundles, _cache, providers

    try:
        with open(args.file, "rb") as f:
            pem = f.read()
        certs = _bundles.check_bundle(pem)
    except ImportError as ex:  # pragma: no cover - cryptography is missing
        return out.refuse(
            EXIT_USAGE, "ImportError", f"{ex}: install it with pip install 'safepg-tls[bundles]'"
        )
    except OSError as ex:
        return out.refuse(
            EXIT_USAGE, type(ex).__name__, f"cannot read {args.file}: {ex.strerror or ex}"
        )
    except _bundles.BundleError as ex:
        return out.refuse(EXIT_INSECURE, type(ex).__name__, f"{args.file}: {ex}")
    doc["certificates"] = [_cert(c) for c in certs]
    if args.replace:
        current = _fingerprints(providers.shipped_path(args.replace))
        new = {c.sha256: c.subject for c in certs}
        doc["added"] = [
            {"sha256": fp, "subject": new[fp]} for fp in sorted(set(new) - set(current))
        ]
        doc["removed"] = [
            {"sha256": fp, "subject": current[fp]} for fp in sorted(set(current) - set(new))
        ]
    if not out.json:
        out.line(
            f"{args.file}: {plural(len(certs), 'certificate')}, all CAs, signatures verify, "
            "none expired"
        )
        for sign, key in (("+", "added"), ("-", "removed")):
            for row in doc[key]:
                out.line(f"  {sign} {shown(row['subject'])}  {row['sha256'][:16]}")
    if args.bundle_command == "install":
        directory = providers.override_dir()
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The certificates checked, re-encoded: never the file's own bytes, which could
            # hold more than was checked.
            _cache.write_private_file(directory / args.replace, _bundles.canonical_pem(certs))
        except OSError as ex:
            return out.refuse(
                EXIT_USAGE, type(ex).__name__, f"cannot write to {directory}: {ex.strerror or ex}"
            )
        doc["installed_as"] = str(directory / args.replace)
        if not out.json:
            out.line(
                f"installed as {doc['installed_as']}; safepg now uses it instead of its own copy"
            )
            out.line(f"(remove that file to go back to the data shipped with safepg {__version__})")
    return out.finish(EXIT_OK)
