"""``safepg providers``: the cloud provider profiles, and the CA files safepg ships."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from .._text import shown
from ._output import EXIT_OK, Output, add_json, add_verbose, iso, plural

if TYPE_CHECKING:
    from ._output import Subparsers

SCHEMA = "safepg.providers/1"


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "providers", help="list the cloud provider profiles and the CA files safepg ships"
    )
    add_json(parser)
    add_verbose(parser)
    parser.set_defaults(run=run)


def _profiles() -> list[dict[str, Any]]:
    from .. import providers

    return [
        {
            "key": p.key,
            "name": p.name,
            "patterns": list(p.patterns),
            "trust": p.trust,
            "bundle": p.bundle.key if p.bundle else None,
            "notes": p.notes,
        }
        for p in providers.PROFILES
    ]


def _bundle_files() -> list[dict[str, Any]]:
    """Each CA file in use: shipped, or a newer copy that passed its checks.

    Raises:
        ConfigurationError: an override fails its checks (never skipped quietly).
    """
    from .. import _x509, providers

    rows = []
    for bundle in providers.BUNDLES:
        for path, override in providers.bundle_paths(bundle):
            with open(path, "rb") as f:
                certs = _x509.parse_pem(f.read())
            expiries = [c.not_after for c in certs if c.not_after]
            rows.append(
                {
                    "bundle": bundle.key,
                    "file": os.path.basename(path),
                    "path": path,
                    "override": override,
                    "certificates": len(certs),
                    "earliest_expiry": iso(min(expiries)) if expiries else None,
                }
            )
    return rows


def run(args: argparse.Namespace, out: Output) -> int:
    import safepg

    from .. import providers

    doc = out.start(
        SCHEMA,
        profiles=_profiles(),
        bundle_files=[],
        override_dir=str(providers.override_dir()),
    )
    try:
        files = _bundle_files()
    except safepg.ConfigurationError as ex:  # a bad override: say so, do not hide it
        return out.fail(ex)
    doc["bundle_files"] = files
    if not out.json:
        _print(out, doc)
    return out.finish(EXIT_OK)


def _print(out: Output, doc: dict[str, Any]) -> None:
    from .. import providers

    files_of = {b.key: ", ".join(b.files) for b in providers.BUNDLES}
    trust_text = {
        "bundled": "bundled ({files})",
        "fetched": "fetched from the provider's API (with its standard credentials), cached",
        "os-store": "OS trust store, then certifi",
        "not-bundled": "not bundled: pass the CA file (sslrootcert or PGSSLROOTCERT)",
    }
    for p in doc["profiles"]:
        out.line(out.bold(p["name"]))
        out.field("hosts", ", ".join(p["patterns"]))
        out.field("trust", trust_text[p["trust"]].format(files=files_of.get(p["bundle"], "")))
        out.field("notes", p["notes"])
    out.line()
    out.line(out.bold("CA files") + f" (overrides are read from {doc['override_dir']})")
    width = max((len(row["file"]) for row in doc["bundle_files"]), default=0)
    for row in doc["bundle_files"]:
        source = "override" if row["override"] else "shipped"
        until = (row["earliest_expiry"] or "-")[:10]
        out.field(
            shown(row["file"]),
            f"{plural(row['certificates'], 'certificate')}, {source}, earliest expiry {until}",
            width=width,
        )
