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
    install.add_argument(
        "--allow-new-root",
        metavar="SHA256",
        action="append",
        default=[],
        type=_fingerprint,
        help="trust a certificate the file adds that is not among the provider's known issuers, "
        "named by its SHA-256 fingerprint (check it against the provider's published one); "
        "once for each such certificate",
    )
    for action in (check, install):
        add_json(action)
        add_verbose(action)
        action.set_defaults(run=run)


def _fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as given on the command line: 64 hex digits, colons allowed."""
    value = text.replace(":", "").upper()
    if len(value) != 64 or not all(c in "0123456789ABCDEF" for c in value):
        raise argparse.ArgumentTypeError(
            f"{shown(text)!r} is not a SHA-256 fingerprint (64 hexadecimal digits)"
        )
    return value


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


def _new_roots_refused(
    replace: str, added: list[dict[str, Any]], allowed: list[str]
) -> tuple[int, str, str] | None:
    """Why an install must not go on, as (exit code, error class, message), or None.

    A provider's file that gains a certificate safepg does not know as that provider's issuer
    would make every connection to that provider trust it: only if the operator names each one.
    An allowance that names no such certificate is refused too (a typo, or the wrong file).
    """
    from .._bundles import BundleError

    unknown = {row["sha256"]: row["subject"] for row in added if not row["known"]}
    stray = [fp for fp in dict.fromkeys(allowed) if fp not in unknown]
    if stray:
        return (
            EXIT_USAGE,
            "ConfigurationError",
            "--allow-new-root names no certificate that this file adds to the known issuers "
            f"of {replace}: " + ", ".join(stray),
        )
    missing = [fp for fp in sorted(unknown) if fp not in allowed]
    if not missing:
        return None
    listing = "\n".join(f"- {shown(unknown[fp])}  SHA-256 {fp}" for fp in missing)
    return (
        EXIT_INSECURE,
        BundleError.__name__,
        f"the file adds {plural(len(missing), 'certificate')} that safepg does not know as an "
        f"issuer of {replace}'s provider, and every connection to that provider would trust "
        f"{'it' if len(missing) == 1 else 'them'}:\n{listing}\nCompare each fingerprint with "
        "the one the provider publishes; if it is theirs, name it: "
        + " ".join(f"--allow-new-root {fp}" for fp in missing),
    )


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
        known = _bundles.known_issuers(args.replace)
        new = {c.sha256: c.subject for c in certs}
        doc["added"] = [
            {"sha256": fp, "subject": new[fp], "known": fp in known}
            for fp in sorted(set(new) - set(current))
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
                unknown = "" if row.get("known", True) else "  (not a known issuer)"
                out.line(f"  {sign} {shown(row['subject'])}  {row['sha256'][:16]}{unknown}")
    if args.bundle_command == "install":
        refused = _new_roots_refused(args.replace, doc["added"], args.allow_new_root)
        if refused is not None:
            return out.refuse(*refused)
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
