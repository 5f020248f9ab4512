#!/usr/bin/env python3
"""Check safepg's built distributions against the source tree, and the wheel once installed.

    scripts/check_wheel.py artifacts WHEEL [SDIST]
        Without installing anything: the wheel's metadata (name, version, extras, requirements,
        entry points) against pyproject.toml; its RECORD; every file under src/safepg (the CA
        files, py.typed, and whatever data files are added later) in the wheel, byte for byte,
        and nothing else; the CA files against inventory.json and PROVENANCE.md. The same for
        the sdist, if given.

    scripts/check_wheel.py installed
        Run by the interpreter of a fresh venv where the wheel is installed (with the extras
        binary, sqlalchemy, pytest, django and psycopg2), from outside the source tree (python
        -I): safepg comes
        from that venv, holds every file of src/safepg, its CA files load in OpenSSL, every
        entry point loads (pytest11 safepg; sqlalchemy.dialects postgresql.safepg and
        postgresql.safepg_async, through SQLAlchemy's registry too; pytest autoloads the
        plugin), Django loads the backend "safepg.django" (and, with the demo, connects with
        it), safepg.psycopg2 imports, `safepg --version` names the source's version, and
        `python -m safepg demo` succeeds (it needs PostgreSQL's server binaries).

Both compare with the source tree given by --project (default: this script's repository). The
package's files are those under src/safepg that git does not ignore (hatchling's rule), or,
outside a git checkout, all but __pycache__ and *.pyc. Exit status: 0 when all is well, 1
with one line per problem otherwise, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import csv
import email.parser
import email.policy
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

PACKAGE = "safepg"
# PyPI names this project must never depend on: "safepg" is an unrelated statistics package.
TAKEN_NAMES = frozenset({"safepg"})
# Entry points that must be present and load, whatever pyproject.toml says: (group, name).
REQUIRED_ENTRY_POINTS = (
    ("console_scripts", "safepg"),
    ("pytest11", "safepg"),
    ("sqlalchemy.dialects", "postgresql.safepg"),
    ("sqlalchemy.dialects", "postgresql.safepg_async"),
)
PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


def canonical(name: str) -> str:
    """PEP 503's normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def normal_version(version: str) -> str:
    try:
        from packaging.version import Version
    except ImportError:  # the installed check runs where packaging may be absent
        return version
    return str(Version(version))


class Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)


# -- the source tree ---------------------------------------------------------------------------


@dataclass
class Project:
    root: Path
    version: str
    files: dict[str, bytes]  # path under src/safepg -> content
    pyproject: dict[str, Any] = field(default_factory=dict)

    @property
    def package_dir(self) -> Path:
        return self.root / "src" / PACKAGE


def _git_listed(root: Path) -> list[str] | None:
    """Files under src/safepg that git tracks or would track (not ignored), or None."""
    try:
        proc = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
                "--full-name",
                "--",
                f"src/{PACKAGE}",
            ],
            capture_output=True,
            check=False,
            timeout=60,
        )
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 or top.returncode != 0:
        return None
    if Path(top.stdout.strip()).resolve() != root.resolve():
        return None
    prefix = f"src/{PACKAGE}/"
    names = {n for n in proc.stdout.decode().split("\0") if n.startswith(prefix)}
    # Tracked files deleted in the work tree are listed too; hatchling builds from the tree.
    return sorted(n[len(prefix) :] for n in names if (root / n).is_file())


def source_files(root: Path) -> dict[str, bytes]:
    package_dir = root / "src" / PACKAGE
    names = _git_listed(root)
    if names is None:
        names = sorted(
            p.relative_to(package_dir).as_posix()
            for p in package_dir.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
        )
    return {name: (package_dir / name).read_bytes() for name in names}


def source_version(root: Path) -> str:
    text = (root / "src" / PACKAGE / "__init__.py").read_text()
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    if not match:
        raise SystemExit(f"no __version__ in {root / 'src' / PACKAGE / '__init__.py'}")
    return match[1]


def load_pyproject(root: Path) -> dict[str, Any]:
    toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    data: dict[str, Any] = toml.loads((root / "pyproject.toml").read_text())
    return data


def load_project(root: Path, *, with_pyproject: bool) -> Project:
    return Project(
        root=root,
        version=source_version(root),
        files=source_files(root),
        pyproject=load_pyproject(root) if with_pyproject else {},
    )


# -- comparisons shared by the wheel and the sdist ---------------------------------------------


def compare_package(
    label: str, where: str, found: dict[str, bytes], project: Project, problems: Problems
) -> None:
    """``found``: the archive's files of the package, keyed by their path under the package."""
    for name, data in project.files.items():
        if name not in found:
            problems.add(f"{label}: {where}{name} is in src/{PACKAGE} but missing from it")
        elif found[name] != data:
            problems.add(f"{label}: {where}{name} differs from src/{PACKAGE}/{name} (stale build?)")
    for name in sorted(set(found) - set(project.files)):
        problems.add(f"{label}: {where}{name} is not in src/{PACKAGE} (stale or generated?)")
    for needed in ("__init__.py", "py.typed"):
        if needed not in found:
            problems.add(f"{label}: {where}{needed} is missing")
    if not any(n.startswith("cacerts/") and n.endswith(".pem") for n in found):
        problems.add(f"{label}: no CA file ({where}cacerts/*.pem) at all")


def check_cacerts(label: str, found: dict[str, bytes], problems: Problems) -> None:
    """Every shipped PEM file is recorded, with its digest and count, in the archive's own
    inventory.json and PROVENANCE.md."""
    pems = sorted(n for n in found if n.startswith("cacerts/") and n.endswith(".pem"))
    try:
        inventory = json.loads(found["cacerts/inventory.json"])
        provenance = found["cacerts/PROVENANCE.md"].decode()
    except (KeyError, ValueError) as ex:
        problems.add(f"{label}: cannot read cacerts/inventory.json and PROVENANCE.md: {ex!r}")
        return
    for name in pems:
        file_name = name.removeprefix("cacerts/")
        digest = hashlib.sha256(found[name]).hexdigest()
        count = found[name].count(PEM_BEGIN)
        entry = inventory.get(file_name)
        if not isinstance(entry, dict):
            problems.add(f"{label}: {name} has no entry in cacerts/inventory.json")
        elif entry.get("file_sha256") != digest or entry.get("count") != count:
            problems.add(
                f"{label}: {name} (sha256 {digest[:12]}…, {count} certificates) does not match "
                "its entry in cacerts/inventory.json"
            )
        row = re.search(
            rf"^\| `{re.escape(file_name)}` \| (\d+) \| `([0-9a-f]{{64}})` \|", provenance, re.M
        )
        if not row:
            problems.add(f"{label}: {name} has no row in cacerts/PROVENANCE.md")
        elif row[2] != digest or int(row[1]) != count:
            problems.add(f"{label}: {name} does not match its row in cacerts/PROVENANCE.md")


def requirement_name(requirement: str) -> tuple[str, set[str]]:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    if not match:
        return "", set()
    extras = {canonical(e.strip()) for e in (match[2] or "").split(",") if e.strip()}
    return canonical(match[1]), extras


def check_metadata(label: str, meta: Message, project: Project, problems: Problems) -> None:
    """Core metadata (a wheel's METADATA, an sdist's PKG-INFO) against pyproject.toml."""
    proj = project.pyproject["project"]
    name = str(meta.get("Name", ""))
    if canonical(name) != canonical(proj["name"]):
        problems.add(f"{label}: Name is {name!r}, pyproject.toml says {proj['name']!r}")
    if canonical(name) in TAKEN_NAMES or canonical(proj["name"]) in TAKEN_NAMES:
        problems.add(f"{label}: the name {name!r} belongs to another project on PyPI")
    version = str(meta.get("Version", ""))
    if normal_version(version) != normal_version(project.version):
        problems.add(f"{label}: Version is {version!r}, src/{PACKAGE} says {project.version!r}")
    if meta.get("Requires-Python") != proj.get("requires-python"):
        problems.add(f"{label}: Requires-Python is {meta.get('Requires-Python')!r}")
    if meta.get("Summary") != proj.get("description"):
        problems.add(f"{label}: Summary differs from pyproject.toml's description")
    if not str(meta.get("Description-Content-Type", "")).startswith("text/markdown"):
        problems.add(f"{label}: Description-Content-Type is not text/markdown")
    body = meta.get_payload()
    readme = (project.root / "README.md").read_text()
    if not isinstance(body, str) or body.strip() != readme.strip():
        problems.add(f"{label}: the long description is not README.md")

    extras = {canonical(e) for e in meta.get_all("Provides-Extra") or []}
    wanted_extras = {canonical(e) for e in proj.get("optional-dependencies", {})}
    if extras != wanted_extras:
        problems.add(f"{label}: Provides-Extra is {sorted(extras)}, not {sorted(wanted_extras)}")

    # Requirements: the same names per extra as pyproject.toml, and never the taken name.
    # Self-references (safepg-tls[testing]) stand for that extra's requirements: hatchling
    # writes those out, other backends may keep the reference.
    own = canonical(proj["name"])
    extra_requirements = {canonical(k): v for k, v in proj.get("optional-dependencies", {}).items()}

    def names(requirements: Iterable[str], seen: frozenset[str]) -> set[str]:
        out: set[str] = set()
        for requirement in requirements:
            req, req_extras = requirement_name(requirement)
            if req != own:
                out.add(req)
            for extra in req_extras - seen if req == own else set():
                if extra not in extra_requirements:
                    problems.add(f"{label}: {requirement!r} names an unknown extra {extra!r}")
                out |= names(extra_requirements.get(extra, []), seen | {extra})
        return out

    found: set[tuple[str, str]] = set()
    for requirement in meta.get_all("Requires-Dist") or []:
        req = requirement_name(requirement)[0]
        marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        extra = canonical(marker[1]) if marker else ""
        found |= {(n, extra) for n in names([requirement], frozenset({extra}))}
        if req in TAKEN_NAMES:
            problems.add(
                f"{label}: Requires-Dist {requirement!r} names {req!r}, another project on "
                f"PyPI; a self-reference must use {own!r}"
            )
    wanted = {(n, "") for n in names(proj.get("dependencies", []), frozenset())}
    for extra, requirements in extra_requirements.items():
        wanted |= {(n, extra) for n in names(requirements, frozenset({extra}))}
    for req, extra in sorted(wanted - found):
        problems.add(f"{label}: no Requires-Dist for {req}" + (f" [{extra}]" if extra else ""))
    for req, extra in sorted(found - wanted):
        problems.add(f"{label}: unexpected Requires-Dist {req}" + (f" [{extra}]" if extra else ""))


def wanted_entry_points(project: Project) -> dict[tuple[str, str], str]:
    proj = project.pyproject["project"]
    wanted = {("console_scripts", k): v for k, v in proj.get("scripts", {}).items()}
    wanted |= {("gui_scripts", k): v for k, v in proj.get("gui-scripts", {}).items()}
    for group, entries in proj.get("entry-points", {}).items():
        wanted |= {(group, k): v for k, v in entries.items()}
    return wanted


def check_entry_points_txt(label: str, text: str, project: Project, problems: Problems) -> None:
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error as ex:
        problems.add(f"{label}: entry_points.txt does not parse: {ex}")
        return
    found = {(g, k): v.strip() for g in parser.sections() for k, v in parser.items(g)}
    wanted = wanted_entry_points(project)
    for key in REQUIRED_ENTRY_POINTS:
        if key not in wanted:
            problems.add(f"pyproject.toml: entry point {key[1]!r} in group {key[0]!r} is gone")
    for (group, name), value in sorted(wanted.items()):
        if found.get((group, name)) != value.strip():
            problems.add(
                f"{label}: entry point {group}: {name} = {value} is "
                + ("missing" if (group, name) not in found else f"{found[(group, name)]!r}")
            )
    for group, name in sorted(set(found) - set(wanted)):
        problems.add(f"{label}: unexpected entry point {group}: {name}")


# -- the wheel ---------------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def check_wheel(path: Path, project: Project, problems: Problems) -> None:
    label = path.name
    dist = re.sub(r"[-_.]+", "_", project.pyproject["project"]["name"]).lower()
    version = normal_version(project.version)
    expected_name = f"{dist}-{version}-py3-none-any.whl"
    if path.name != expected_name:
        problems.add(f"{label}: expected a wheel named {expected_name}")
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as ex:
        problems.add(f"{label}: not a readable wheel: {ex}")
        return
    with archive:
        bad = archive.testzip()
        if bad:
            problems.add(f"{label}: {bad} is corrupt")
            return
        members = {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
    info_dir = f"{dist}-{version}.dist-info/"
    for needed in ("METADATA", "WHEEL", "RECORD", "entry_points.txt"):
        if info_dir + needed not in members:
            problems.add(f"{label}: {info_dir}{needed} is missing")
    if problems.lines:
        return

    # RECORD: every file listed with its digest and size, and nothing listed that is absent.
    rows = list(csv.reader(io.StringIO(members[info_dir + "RECORD"].decode())))
    recorded = {row[0]: row[1:] for row in rows if row}
    for name, data in members.items():
        if name == info_dir + "RECORD":
            continue
        if name not in recorded:
            problems.add(f"{label}: {name} is not in RECORD")
        elif recorded[name] != [_record_hash(data), str(len(data))]:
            problems.add(f"{label}: {name} does not match its RECORD entry")
    for name in recorded:
        if name not in members:
            problems.add(f"{label}: RECORD lists {name}, which the wheel lacks")

    wheel_meta = email.parser.Parser(policy=email.policy.compat32).parsestr(
        members[info_dir + "WHEEL"].decode()
    )
    if wheel_meta.get("Root-Is-Purelib", "").strip().lower() != "true":
        problems.add(f"{label}: WHEEL says Root-Is-Purelib is not true")
    if wheel_meta.get_all("Tag") != ["py3-none-any"]:
        problems.add(f"{label}: WHEEL tags are {wheel_meta.get_all('Tag')}, not py3-none-any")
    meta = email.parser.Parser(policy=email.policy.compat32).parsestr(
        members[info_dir + "METADATA"].decode()
    )
    check_metadata(label, meta, project, problems)
    check_entry_points_txt(
        label, members[info_dir + "entry_points.txt"].decode(), project, problems
    )

    prefix = f"{PACKAGE}/"
    package = {n[len(prefix) :]: d for n, d in members.items() if n.startswith(prefix)}
    for name in sorted(members):
        if not name.startswith((prefix, info_dir)):
            problems.add(f"{label}: unexpected file {name} outside the package")
    compare_package(label, prefix, package, project, problems)
    check_cacerts(label, package, problems)


# -- the sdist ---------------------------------------------------------------------------------


def check_sdist(path: Path, project: Project, problems: Problems) -> None:
    label = path.name
    dist = re.sub(r"[-_.]+", "_", project.pyproject["project"]["name"]).lower()
    top = f"{dist}-{normal_version(project.version)}"
    if path.name != f"{top}.tar.gz":
        problems.add(f"{label}: expected an sdist named {top}.tar.gz")
    try:
        with tarfile.open(path) as archive:
            members: dict[str, bytes] = {}
            for info in archive.getmembers():
                if not info.isfile():
                    continue
                handle = archive.extractfile(info)
                if handle is not None:
                    members[info.name] = handle.read()
    except (OSError, tarfile.TarError) as ex:
        problems.add(f"{label}: not a readable sdist: {ex}")
        return
    for name in sorted(members):
        if not name.startswith(top + "/"):
            problems.add(f"{label}: {name} is outside {top}/")
    files = {n[len(top) + 1 :]: d for n, d in members.items() if n.startswith(top + "/")}
    for needed in ("PKG-INFO", "pyproject.toml", "README.md"):
        if needed not in files:
            problems.add(f"{label}: {top}/{needed} is missing")
    if "PKG-INFO" in files:
        meta = email.parser.Parser(policy=email.policy.compat32).parsestr(
            files["PKG-INFO"].decode()
        )
        check_metadata(label, meta, project, problems)
    for pattern in project.pyproject["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]:
        pattern = pattern.strip("/")
        if not any(n == pattern or n.startswith(pattern + "/") for n in files):
            problems.add(f"{label}: nothing from {pattern!r} (sdist include) is in it")
    if files.get("pyproject.toml") != (project.root / "pyproject.toml").read_bytes():
        problems.add(f"{label}: pyproject.toml differs from the source tree's")
    prefix = f"src/{PACKAGE}/"
    package = {n[len(prefix) :]: d for n, d in files.items() if n.startswith(prefix)}
    compare_package(label, f"{top}/{prefix}", package, project, problems)


# -- the installed wheel -----------------------------------------------------------------------


def _isolate_environment(tmp: Path) -> None:
    """No PG*/SSL_CERT_* settings, and a private cache, for what runs from here on."""
    for name in list(os.environ):
        if name.startswith(("PG", "SSL_CERT_", "SAFEPG_")) or name == "PYTEST_ADDOPTS":
            del os.environ[name]
    os.environ.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    os.environ["SAFEPG_CACHE_DIR"] = str(tmp / "cache")


def _run(args: Iterable[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _tail(text: str, lines: int = 15) -> str:
    return "\n    ".join(text.strip().splitlines()[-lines:])


_DJANGO_CHECK = """
import sys
from django.conf import settings
from django.db.utils import load_backend
from django.db.backends.postgresql.base import DatabaseWrapper

backend = load_backend("safepg.django")
assert issubclass(backend.DatabaseWrapper, DatabaseWrapper), backend
if sys.argv[1:] == ["connect"]:
    import django
    from safepg.testing import PostgresServer

    with PostgresServer() as server:
        db = {"ENGINE": "safepg.django", "NAME": server.dbname, "USER": server.user,
              "PASSWORD": server.password, "HOST": server.host, "PORT": str(server.port),
              "OPTIONS": {"sslrootcert": str(server.ca_path)}}
        settings.configure(DATABASES={"default": db})
        django.setup()
        from django.db import connection

        with connection.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert cur.fetchone() == (True,)
        connection.close()
print("django backend OK")
"""


def check_installed(project: Project, problems: Problems, *, demo: bool) -> None:
    import importlib.metadata as md
    import ssl
    import sysconfig

    tmp = Path(tempfile.mkdtemp(prefix="safepg-check-"))
    _isolate_environment(tmp)

    # Which distribution provides the import package: exactly one, and not the taken name.
    providers_of = md.packages_distributions().get(PACKAGE, [])
    if len(set(map(canonical, providers_of))) != 1:
        problems.add(f"distributions providing {PACKAGE!r}: {providers_of}, expected one")
        return
    dist = md.distribution(providers_of[0])
    name = canonical(dist.metadata["Name"])
    if name in TAKEN_NAMES:
        problems.add(f"{PACKAGE!r} is provided by {name!r}, another project's name on PyPI")
    if normal_version(dist.version) != normal_version(project.version):
        problems.add(f"installed version {dist.version}, src/{PACKAGE} says {project.version}")

    import safepg

    package_dir = Path(safepg.__file__).resolve().parent
    if package_dir.is_relative_to(project.root.resolve()):
        problems.add(f"safepg was imported from the source tree ({package_dir}), not the wheel")
        return
    if not package_dir.is_relative_to(Path(sys.prefix).resolve()):
        problems.add(f"safepg was imported from {package_dir}, outside this venv ({sys.prefix})")

    # Every file of the source package is installed, recorded, and the same.
    recorded = {Path(str(f)).as_posix() for f in dist.files or []}
    for rel, data in project.files.items():
        path = package_dir / rel
        if not path.is_file():
            problems.add(f"installed: {PACKAGE}/{rel} is missing")
            continue
        if path.read_bytes() != data:
            problems.add(f"installed: {PACKAGE}/{rel} differs from src/{PACKAGE}/{rel}")
        if f"{PACKAGE}/{rel}" not in recorded:
            problems.add(f"installed: {PACKAGE}/{rel} is not in the distribution's RECORD")

    # The CA files: every one the code names, and every one shipped, loads in OpenSSL.
    from safepg import providers

    inventory = json.loads((package_dir / "cacerts" / "inventory.json").read_text())
    named = {f for bundle in providers.BUNDLES for f in bundle.files}
    shipped = {p.name for p in (package_dir / "cacerts").glob("*.pem")}
    for file_name in sorted(named | shipped):
        try:
            ctx = ssl.create_default_context(cafile=providers.shipped_path(file_name))
        except (OSError, ssl.SSLError) as ex:
            problems.add(f"installed: cacerts/{file_name} does not load in OpenSSL: {ex}")
            continue
        count = len(ctx.get_ca_certs())
        if count != inventory.get(file_name, {}).get("count"):
            problems.add(f"installed: cacerts/{file_name} loads {count} certificates")
    try:
        trust = safepg.resolve_trust(host="mydb.abc123.eu-central-1.rds.amazonaws.com")
    except Exception as ex:
        problems.add(f"installed: resolve_trust for an RDS host failed: {ex!r}")
    else:
        if not Path(trust.path).resolve().is_relative_to(package_dir / "cacerts"):
            problems.add(f"installed: an RDS host is trusted with {trust.path}, not cacerts/")

    # Entry points: the required ones exist (once), and every one of ours loads.
    ours = {(ep.group, ep.name): ep for ep in dist.entry_points}
    for group, ep_name in REQUIRED_ENTRY_POINTS:
        if (group, ep_name) not in ours:
            problems.add(f"installed: no entry point {ep_name!r} in group {group!r}")
        found = list(md.entry_points(group=group, name=ep_name))
        if len(found) > 1:
            problems.add(f"installed: {len(found)} entry points {ep_name!r} in group {group!r}")
    for (group, ep_name), ep in sorted(ours.items()):
        try:
            ep.load()
        except Exception as ex:
            problems.add(f"installed: entry point {group}: {ep_name} = {ep.value}: {ex!r}")

    # SQLAlchemy finds the dialects by URL, through its registry and the entry points.
    try:
        import sqlalchemy
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = sqlalchemy.create_engine("postgresql+safepg://app@db.example.com/app")
        async_engine = create_async_engine("postgresql+safepg_async://app@db.example.com/app")
        dialects = [type(e.dialect).__name__ for e in (engine, async_engine)]
        engine.dispose()
        if dialects != ["SafePGDialect", "SafePGAsyncDialect"] or not async_engine.dialect.is_async:
            problems.add(f"installed: SQLAlchemy's dialects for safepg URLs are {dialects}")
    except Exception as ex:
        problems.add(f"installed: SQLAlchemy cannot make an engine for postgresql+safepg: {ex!r}")

    # Django finds the backend by its ENGINE name, and it connects (extra django), to a
    # throwaway server when the demo runs; safepg.psycopg2 imports (extra psycopg2).
    proc = _run([sys.executable, "-c", _DJANGO_CHECK, "connect" if demo else ""], tmp, 300)
    if proc.returncode != 0 or "django backend OK" not in proc.stdout:
        problems.add(
            f"installed: the Django backend failed:\n    {_tail(proc.stdout + proc.stderr)}"
        )
    try:
        importlib.import_module(f"{PACKAGE}.psycopg2")
    except Exception as ex:
        problems.add(f"installed: {PACKAGE}.psycopg2 does not import: {ex!r}")

    # pytest loads the plugin by itself.
    proc = _run([sys.executable, "-m", "pytest", "--help"], cwd=tmp, timeout=120)
    if proc.returncode != 0 or "--safepg-strict" not in proc.stdout:
        output = _tail(proc.stdout + proc.stderr)
        problems.add(f"installed: pytest did not load the plugin:\n    {output}")

    # The command line, as an installed script and as a module.
    expected = f"safepg {safepg.__version__}"
    if normal_version(safepg.__version__) != normal_version(project.version):
        problems.add(f"installed: safepg.__version__ is {safepg.__version__}")
    script = Path(sysconfig.get_path("scripts")) / ("safepg.exe" if os.name == "nt" else "safepg")
    for args in ([str(script), "--version"], [sys.executable, "-m", PACKAGE, "--version"]):
        proc = _run(args, cwd=tmp, timeout=60)
        if proc.returncode != 0 or proc.stdout.strip() != expected:
            shown = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(args))
            problems.add(
                f"installed: `{shown}` printed {proc.stdout.strip()!r} (exit {proc.returncode}),"
                f" not {expected!r} {proc.stderr.strip()[-300:]}"
            )

    if demo:
        proc = _run([sys.executable, "-m", PACKAGE, "demo"], cwd=tmp, timeout=300)
        ok = proc.returncode == 0 and "verified TLSv1." in proc.stdout
        if not ok or "Server stopped." not in proc.stdout:
            problems.add(
                f"installed: `python -m safepg demo` failed (exit {proc.returncode}):\n    "
                + _tail(proc.stdout + proc.stderr)
            )


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check safepg's built distributions, and the wheel once installed."
    )
    parser.add_argument(
        "--project",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the source tree to compare with (default: this script's repository)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    artifacts = commands.add_parser("artifacts", help="check a wheel, and an sdist if given")
    artifacts.add_argument("wheel", type=Path)
    artifacts.add_argument("sdist", type=Path, nargs="?")
    installed = commands.add_parser("installed", help="check the wheel installed in this venv")
    installed.add_argument(
        "--no-demo", action="store_true", help="skip `python -m safepg demo` (needs a server)"
    )
    args = parser.parse_args(argv)

    problems = Problems()
    root: Path = args.project.resolve()
    if args.command == "artifacts":
        project = load_project(root, with_pyproject=True)
        check_wheel(args.wheel, project, problems)
        if args.sdist is not None:
            check_sdist(args.sdist, project, problems)
        checked = " and ".join(p.name for p in (args.wheel, args.sdist) if p is not None)
        what = "metadata, RECORD, entry points"
    else:
        project = load_project(root, with_pyproject=False)
        check_installed(project, problems, demo=not args.no_demo)
        checked = f"the wheel installed in {sys.prefix}"
        what = "entry points load, CA files load, Django's backend, --version" + (
            "" if args.no_demo else ", demo"
        )

    for line in problems.lines:
        print(f"check_wheel: {line}", file=sys.stderr)
    if problems.lines:
        print(f"check_wheel: {len(problems.lines)} problem(s) in {checked}", file=sys.stderr)
        return 1
    data = sum(not name.endswith(".py") for name in project.files)
    print(
        f"check_wheel: OK: {checked}: {what}; all {len(project.files)} files of src/{PACKAGE}"
        f" ({data} data files)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
