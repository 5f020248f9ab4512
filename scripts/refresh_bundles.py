"""Refresh the CA files safepg ships, from their publishers, with integrity checks (maintainers).

For each shipped file it fetches the sources (or reads them from --from DIR), keeps what the file
should hold (for GovCloud: the roots only), checks the result as safepg checks every bundle
(every certificate a CA, every signature verifying, none expired), and prints the fingerprints
added and removed. With --write it replaces the file and updates ``inventory.json`` and the
file's row in ``PROVENANCE.md``; review the diff, then describe the sources in PROVENANCE.md.

    .venv/bin/python scripts/refresh_bundles.py                  # fetch, check, show the diff
    .venv/bin/python scripts/refresh_bundles.py --write rds-global-bundle.pem
    .venv/bin/python scripts/refresh_bundles.py --from ~/downloads --write

Exit status: 0 nothing to change or written, 1 a check failed (nothing written), 2 bad usage,
3 changes found but not written (run again with --write).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from safepg import ConfigurationError, _bundles, _x509

CACERTS = Path(__file__).resolve().parent.parent / "src" / "safepg" / "cacerts"


def _roots_only(certs: list[_bundles.CheckedCert]) -> list[_bundles.CheckedCert]:
    return [c for c in certs if c.self_signed]


@dataclass(frozen=True)
class Source:
    """Where a shipped file comes from. Each URL is fetched over verified HTTPS."""

    urls: tuple[str, ...]
    keep: Callable[[list[_bundles.CheckedCert]], list[_bundles.CheckedCert]] | None = None


SOURCES: dict[str, Source] = {
    "rds-global-bundle.pem": Source(
        ("https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem",)
    ),
    "rds-govcloud-roots.pem": Source(
        (
            "https://truststore.pki.us-gov-west-1.rds.amazonaws.com/us-gov-west-1/us-gov-west-1-bundle.pem",
            "https://truststore.pki.us-gov-east-1.rds.amazonaws.com/us-gov-east-1/us-gov-east-1-bundle.pem",
        ),
        keep=_roots_only,
    ),
    "azure-postgres-roots.pem": Source(
        (
            "https://cacerts.digicert.com/DigiCertGlobalRootG2.crt.pem",
            "https://www.microsoft.com/pkiops/certs/Microsoft%20RSA%20Root%20Certificate%20Authority%202017.crt",
            "https://cacerts.digicert.com/DigiCertGlobalRootCA.crt.pem",
        )
    ),
    "supabase-root-2021.pem": Source(
        (
            "https://raw.githubusercontent.com/supabase/cli/main/apps/cli-go/internal/gen/types/"
            "templates/prod-ca-2021.crt",
        )
    ),
    "supabase-prod-ca-2025.pem": Source(
        (
            "https://raw.githubusercontent.com/supabase/cli/main/apps/cli-go/internal/gen/types/"
            "templates/prod-ca-2025.crt",
        )
    ),
}


def certificates(data: bytes) -> list[bytes]:
    """The DER certificates in *data*: PEM, read as OpenSSL reads it, or one DER certificate.

    Raises:
        BundleError: a block that is not a plain certificate (TRUSTED CERTIFICATE, a CRL, a
            key) or that OpenSSL would read otherwise: published files hold certificates only.
    """
    if data[:1] == b"\x30":  # DER
        return [data]
    try:
        blocks = _x509.read_pem(data)
        if not all(b.label in _x509.CERTIFICATE_LABELS for b in blocks):
            odd = next(b for b in blocks if b.label not in _x509.CERTIFICATE_LABELS)
            raise _bundles.BundleError(f"{odd} is not a certificate block")
        return [_x509.certificate(b).der for b in blocks]
    except _x509.PemError as ex:
        raise _bundles.BundleError(str(ex)) from None


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - https only
        data: bytes = response.read()
    return data


def build(name: str, raw: Sequence[bytes]) -> tuple[bytes, list[_bundles.CheckedCert]]:
    """The new file's bytes and its checked certificates. Raises BundleError."""
    ders: dict[str, bytes] = {}  # by SHA-256 fingerprint: de-duplicated, order kept
    for data in raw:
        for der in certificates(data):
            ders.setdefault(hashlib.sha256(der).hexdigest().upper(), der)
    # Written in canonical form from the parsed certificates, never the publisher's bytes.
    pem = b"".join(_x509.pem_encode(der) for der in ders.values())
    certs = _bundles.check_bundle(pem)
    keep = SOURCES[name].keep if name in SOURCES else None
    if keep is not None:
        kept = {c.sha256 for c in keep(certs)}
        pem = b"".join(_x509.pem_encode(der) for fp, der in ders.items() if fp in kept)
        certs = _bundles.check_bundle(pem)
    return pem, certs


def diff(old: Path, certs: Sequence[_bundles.CheckedCert]) -> tuple[list[str], list[str]]:
    """Lines for fingerprints added and removed, compared with the shipped *old* file."""
    before = {c.sha256: c for c in _bundles.check_bundle(old.read_bytes())} if old.exists() else {}
    after = {c.sha256: c for c in certs}
    added = [f"+ {after[fp].subject}  {fp}" for fp in sorted(set(after) - set(before))]
    removed = [f"- {before[fp].subject}  {fp}" for fp in sorted(set(before) - set(after))]
    return added, removed


def write(name: str, pem: bytes, certs: Sequence[_bundles.CheckedCert], cacerts: Path) -> None:
    """Replace the file and its records in inventory.json and PROVENANCE.md."""
    (cacerts / name).write_bytes(pem)
    digest = hashlib.sha256(pem).hexdigest()
    inventory_path = cacerts / "inventory.json"
    inventory = json.loads(inventory_path.read_text())
    today = dt.date.today().isoformat()
    inventory[name] = {
        "count": len(certs),
        "file_sha256": digest,
        "refreshed": today,
        "certs": [
            {
                "subject": c.subject,
                "self_signed": c.self_signed,
                "not_after": c.not_after.isoformat(),
                "sha256": c.sha256,
            }
            for c in certs
        ],
    }
    inventory_path.write_text(json.dumps(inventory, indent=1) + "\n")
    provenance_path = cacerts / "PROVENANCE.md"
    provenance = provenance_path.read_text()
    row = re.compile(rf"^\| `{re.escape(name)}` \| \d+ \| `[0-9a-f]{{64}}` \|", re.M)
    new_row = f"| `{name}` | {len(certs)} | `{digest}` |"
    if row.search(provenance):
        provenance = row.sub(new_row, provenance, count=1)
    else:
        provenance += f"\n{new_row} refreshed {today} |\n"
    fingerprints = "\n".join(f"- `{c.sha256}` {c.subject}" for c in certs)
    provenance += (
        f"\n## {name}: refreshed {today} by scripts/refresh_bundles.py\n\n"
        f"{len(certs)} certificates, checked (CA, signatures, validity). Sources: "
        f"{', '.join(SOURCES[name].urls) if name in SOURCES else 'local files'}.\n\n"
        f"{fingerprints}\n"
    )
    provenance_path.write_text(provenance)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="files to refresh (default: all)")
    parser.add_argument(
        "--from", dest="source_dir", type=Path, help="read <name> from this directory instead"
    )
    parser.add_argument("--write", action="store_true", help="write the changes")
    parser.add_argument("--cacerts", type=Path, default=CACERTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.names or sorted(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        print(f"unknown files: {', '.join(unknown)}; known: {', '.join(SOURCES)}")
        return 2
    changed = failed = 0
    for name in names:
        try:
            if args.source_dir:
                raw = [(args.source_dir / name).read_bytes()]
            else:
                raw = [fetch(url) for url in SOURCES[name].urls]
            pem, certs = build(name, raw)
        except (OSError, ConfigurationError) as ex:
            print(f"{name}: FAILED, nothing written: {ex}")
            failed += 1
            continue
        added, removed = diff(args.cacerts / name, certs)
        if not added and not removed:
            print(f"{name}: {len(certs)} certificates, unchanged")
            continue
        changed += 1
        print(f"{name}: {len(certs)} certificates, {len(added)} added, {len(removed)} removed")
        for line in added + removed:
            print(f"  {line}")
        if args.write:
            write(name, pem, certs, args.cacerts)
            print(f"  written to {args.cacerts / name}; describe the sources in PROVENANCE.md")
    if failed:
        return 1
    return 3 if changed and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
