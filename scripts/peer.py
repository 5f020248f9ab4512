"""``scripts/dev peer``: SQLAlchemy's and Django's own test suites, in part, through safepg and
through the stock driver on TLS servers of their own, compared test by test.

1. Downloads the sdists of the SQLAlchemy and Django versions installed here (``pip download
   --no-deps --no-binary NAME NAME==VERSION``) into the cache directory and unpacks them (once).
2. Starts two PostgreSQL servers with TLS (`safepg.testing.PostgresServer`), one per side (the
   sides run at once, and prepared transactions are a cluster's), a certificate from a CA
   made for this run, and a superuser role ``peer`` (Django's postgres_tests create extensions).
3. Runs each part for each configuration, the stock side (psycopg with ``sslmode=verify-full``
   and the test CA, in the URL and in libpq's environment) and the safepg side at once, each in
   its own database (the test CA in ``PGSSLROOTCERT`` for both):

   - SQLAlchemy (pytest, SQLAlchemy's plugin, ``--junitxml``): SQLALCHEMY_PATHS, sync
     (``postgresql+psycopg`` / ``postgresql+safepg``) and async (``postgresql+psycopg_async`` /
     ``postgresql+safepg_async``), with safepg's requirements class
     (`safepg.sqlalchemy.requirements.PsycopgAlias` over SQLAlchemy's own DefaultRequirements).
   - Django (``tests/runtests.py --parallel=1``, a result collector as the test runner): the
     apps in DJANGO_APPS, ``django.db.backends.postgresql`` / ``safepg.django``, without and
     with ``OPTIONS["pool"]``.
4. Compares the outcome (passed, failed, skipped) of every test between stock and safepg, and
   fails on any difference that scripts/peer_allowlist.json does not explain.
5. Writes the counts, the differences, the date, the versions, the times and the command to
   scripts/peer_results.json (``--results``).

Usage: python scripts/peer.py [--only sqlalchemy|django] [--config NAME ...] [-k EXPR]
       [--cache DIR] [--results FILE] [--sqlalchemy-paths P ...] [--django-apps A ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ALLOWLIST = ROOT / "scripts" / "peer_allowlist.json"
RESULTS = ROOT / "scripts" / "peer_results.json"

SQLALCHEMY_PATHS = [
    "test/dialect/postgresql",
    "test/sql/test_types.py",
    "test/engine",
    "test/dialect/test_suite.py",
]
DJANGO_APPS = [
    "backends",
    "postgres_tests",
    "transactions",
    "basic",
    "queries",
    "db_functions",
    "model_fields",
    "schema",
    "migrations",
]
# Pairs compared: (part, configuration) -> (stock URL scheme or engine, safepg's).
SQLALCHEMY_CONFIGS = {
    "sync": ("postgresql+psycopg", "postgresql+safepg"),
    "async": ("postgresql+psycopg_async", "postgresql+safepg_async"),
}
DJANGO_CONFIGS = {
    "no-pool": ("django.db.backends.postgresql", "safepg.django", False),
    "pool": ("django.db.backends.postgresql", "safepg.django", True),
}
OUTCOMES = ("passed", "failed", "skipped")
SIDES = ("stock", "safepg")


def log(message: str) -> None:
    print(f"scripts/peer: {message}", file=sys.stderr, flush=True)


# -- the sdists ---------------------------------------------------------------------------------


def sdist_tree(name: str, cache: Path) -> tuple[str, Path]:
    """The installed *name*'s version, and its sdist unpacked in *cache* (downloaded once)."""
    version = importlib.metadata.version(name)
    sdists = cache / "sdists"
    found = [p for p in sdists.glob("*.tar.gz") if p.name.lower() == f"{name}-{version}.tar.gz"]
    if not found:
        log(f"downloading the sdist of {name}=={version}")
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                # Only this package from source: with :all:, pip would build its build
                # dependencies (Cython) from source too, only to read the metadata.
                "--no-deps", "--no-binary", name, f"{name}=={version}", "-d", str(sdists),
            ],
            check=True,
        )  # fmt: skip
        found = [p for p in sdists.glob("*.tar.gz") if p.name.lower() == f"{name}-{version}.tar.gz"]
    archive = found[0]
    tree = cache / "src" / archive.name.removesuffix(".tar.gz")
    if not tree.is_dir():
        log(f"unpacking {archive.name}")
        with tarfile.open(archive) as tar:
            tar.extractall(cache / "src", filter="data")
    return version, tree


# -- the server ---------------------------------------------------------------------------------


class Server:
    """One TLS server for every run, and a fresh database per run."""

    def __init__(self, start: bool = True) -> None:
        from safepg.testing import PostgresServer

        self.start = start
        self.server = PostgresServer()
        self.password = ""

    def __enter__(self) -> Server:
        import secrets

        from psycopg import sql

        if not self.start:
            return self
        self.server.__enter__()
        # SQLAlchemy's TwoPhaseCommitTest needs prepared transactions (off by default).
        with open(self.server.data_dir / "postgresql.conf", "a") as conf:
            conf.write("max_prepared_transactions = 10\n")
        self.server.restart()
        self.password = secrets.token_hex(16)
        with self.server.admin_connect() as admin:
            admin.execute(
                sql.SQL("CREATE ROLE peer LOGIN SUPERUSER PASSWORD {}").format(
                    sql.Literal(self.password)
                )
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.start:
            self.server.stop()

    def database(self, name: str) -> str:
        from psycopg import sql

        with self.server.admin_connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))  # fmt: skip
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER peer").format(sql.Identifier(name)))
        import psycopg

        with psycopg.connect(
            self.server.conninfo(user="peer", password=self.password, dbname=name,
                                 sslmode="verify-full"), autocommit=True
        ) as conn:  # fmt: skip
            # What SQLAlchemy's suite expects of its database.
            conn.execute("CREATE SCHEMA test_schema")
            conn.execute("CREATE SCHEMA test_schema_2")
            conn.execute("CREATE EXTENSION IF NOT EXISTS hstore")
            conn.execute("CREATE EXTENSION IF NOT EXISTS citext")
        return name

    def environment(self, side: str) -> dict[str, str]:
        """libpq's environment for *side*'s runs: the test CA as the default trust anchor, and
        for the stock driver verify-full as the default sslmode. The suites' tests that build
        URLs of their own (multiple hosts, options in the query) lose the URL's sslrootcert: the
        stock driver would then fall back to libpq's sslmode=prefer, unverified, and safepg
        to trust anchors that do not hold the test CA."""
        env = {"PGSSLROOTCERT": str(self.server.ca_path)}
        if side == "stock":
            env["PGSSLMODE"] = "verify-full"
        return env

    def url(self, scheme: str, dbname: str) -> str:
        from urllib.parse import quote

        srv = self.server
        query = f"sslrootcert={quote(str(srv.ca_path), safe='')}"
        if "safepg" not in scheme:
            query += "&sslmode=verify-full"  # the stock driver, verified by libpq alone
        return f"{scheme}://peer:{self.password}@{srv.host}:{srv.port}/{dbname}?{query}"


# -- SQLAlchemy ---------------------------------------------------------------------------------

SQLA_REQUIREMENTS = """\
# Written by safepg's scripts/peer.py: SQLAlchemy's own requirements, with safepg's engines
# matching its "+psycopg" exclusions (nothing changes for other drivers).
from safepg.sqlalchemy.requirements import PsycopgAlias
from test.requirements import DefaultRequirements


class Requirements(PsycopgAlias, DefaultRequirements):
    pass
"""


def sqlalchemy_job(
    tree: Path, url: str, name: str, report: Path, paths: list[str], select: str | None
) -> tuple[list[str], Path, dict[str, str]]:
    """The command that runs SQLAlchemy's tests on *url*, where it runs, and its environment."""
    import configparser
    import fcntl

    (tree / "peer_requirements.py").write_text(SQLA_REQUIREMENTS)
    # In a file rather than on the command line (which shows the password); test.cfg is read
    # after setup.cfg and wins. One [db] entry per run, added under a lock: runs of other
    # configurations (another scripts/peer.py) may start at the same time.
    with (tree / "test.cfg.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cfg = configparser.ConfigParser(interpolation=None)
        cfg.read(tree / "test.cfg")
        cfg["sqla_testing"] = {"requirement_cls": "peer_requirements:Requirements"}
        if not cfg.has_section("db"):
            cfg.add_section("db")
        cfg["db"][name] = url.replace("%", "%%")  # SQLAlchemy's parser interpolates
        with (tree / "test.cfg").open("w") as f:
            cfg.write(f)
    cmd = [
        sys.executable, "-s", "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
        "--db", name, f"--junitxml={report}", "-q", "-o", "junit_family=xunit1",
        "-W", "ignore", *(["-k", select] if select else []), *paths,
    ]  # fmt: skip
    return cmd, tree, {}


def run_jobs(jobs: dict[str, tuple[list[str], Path, dict[str, str], Path]]) -> dict[str, Any]:
    """Run the jobs (side -> command, directory, environment, log file) at once; per side, the
    seconds it took and whether it was interrupted (SIGINT: pytest still writes its report)."""
    started: dict[str, tuple[subprocess.Popen[bytes], float, Any]] = {}
    for side, (cmd, cwd, extra_env, log_file) in jobs.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PG"))}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(ROOT / "src"), str(cwd), env.get("PYTHONPATH", "")] if p
        )
        env.update(extra_env)
        out = log_file.open("w")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        (log_file.with_suffix(".pid")).write_text(str(proc.pid))
        started[side] = (proc, time.monotonic(), out)
    done: dict[str, Any] = {}
    while len(done) < len(started):
        for side, (proc, start, out) in started.items():
            if side in done or proc.poll() is None:
                continue
            out.close()
            interrupted = proc.returncode == 2 and "KeyboardInterrupt" in jobs[side][3].read_text()
            done[side] = {"seconds": time.monotonic() - start, "interrupted": interrupted}
        time.sleep(1)
    return done


_BACKEND_CLASS = re.compile(r"_postgresql\+[A-Za-z0-9_]+$")


def sqlalchemy_outcomes(report: Path, side: str) -> dict[str, str]:
    """test id -> outcome, the per-database class suffix (``_postgresql+psycopg_15_4``) cut.

    Raises SystemExit when a per-database class names another driver than *side*'s.
    """
    outcomes: dict[str, str] = {}
    if not report.exists():
        return outcomes
    driver = "safepg" if side == "safepg" else "psycopg"
    for case in ET.parse(report).iter("testcase"):  # noqa: S314 - our own subprocess's report
        classname = case.get("classname", "")
        suffix = _BACKEND_CLASS.search(classname)
        if suffix and not suffix.group().startswith(f"_postgresql+{driver}_"):
            raise SystemExit(f"{report}: {classname} ran on another driver than {driver}")
        cls = _BACKEND_CLASS.sub("", classname)
        name = re.sub(r"postgresql\+(safepg|psycopg)(_async)?", "postgresql+DRIVER",
                      case.get("name", ""))  # fmt: skip
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcome = "failed" if kinds - {"skipped"} else "skipped" if kinds else "passed"
        key = f"{cls}::{name}"
        if outcomes.get(key) != "failed":  # a teardown error after a pass: failed
            outcomes[key] = outcome
    return outcomes


# -- Django -------------------------------------------------------------------------------------

DJANGO_SETTINGS = """\
# Written by safepg's scripts/peer.py.
import json
import os

_db = json.loads(os.environ["PEER_DATABASE"])
DATABASES = {
    "default": dict(_db, NAME=_db["NAME"]),
    "other": dict(_db, NAME=_db["NAME"] + "_other"),
}
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
TEST_RUNNER = "peer_runner.PeerRunner"
"""

DJANGO_RUNNER = """\
# Written by safepg's scripts/peer.py: Django's runner, recording each test's outcome.
import json
import os

from django.test.runner import DebugSQLTextTestResult, DiscoverRunner

OUTCOMES = {}


def _record(test, outcome):
    key = test.id()
    if OUTCOMES.get(key) != "failed":
        OUTCOMES[key] = outcome


class PeerResult(DebugSQLTextTestResult):
    def addSuccess(self, test):
        super().addSuccess(test)
        _record(test, "passed")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        _record(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        _record(test, "failed")

    def addError(self, test, err):
        super().addError(test, err)
        _record(test, "failed")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        _record(test, "failed")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        _record(test, "skipped")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            _record(test, "failed")

    def stopTestRun(self):
        super().stopTestRun()
        from django.db import connections

        with open(os.environ["PEER_RESULT"], "w") as f:
            backend = type(connections["default"]).__module__
            json.dump({"backend": backend, "outcomes": OUTCOMES}, f, indent=0, sort_keys=True)


class PeerRunner(DiscoverRunner):
    def get_resultclass(self):
        return PeerResult
"""


def django_job(
    tree: Path, engine: str, options: dict[str, Any], server: Server, dbname: str,
    result: Path, apps: list[str],
) -> tuple[list[str], Path, dict[str, str]]:  # fmt: skip
    """The command that runs Django's tests with *engine*, where it runs, its environment."""
    tests = tree / "tests"
    (tests / "peer_settings.py").write_text(DJANGO_SETTINGS)
    (tests / "peer_runner.py").write_text(DJANGO_RUNNER)
    srv = server.server
    database: dict[str, Any] = {
        "ENGINE": engine,
        "NAME": dbname,
        "USER": "peer",
        "PASSWORD": server.password,
        "HOST": srv.host,
        "PORT": str(srv.port),
        "OPTIONS": {"sslrootcert": str(srv.ca_path), **options},
    }
    if engine != "safepg.django":
        database["OPTIONS"]["sslmode"] = "verify-full"
    cmd = [sys.executable, "-s", "runtests.py", "--settings=peer_settings", "--parallel=1",
           "--noinput", "-v", "1", *apps]  # fmt: skip
    env = {"PEER_DATABASE": json.dumps(database), "PEER_RESULT": str(result)}
    return cmd, tests, env


def django_outcomes(result: Path, side: str) -> dict[str, str]:
    """test id -> outcome. Raises SystemExit when the run used another backend than *side*'s."""
    if not result.exists():
        return {}
    loaded: dict[str, Any] = json.loads(result.read_text())
    expected = "safepg.django.base" if side == "safepg" else "django.db.backends.postgresql.base"
    if loaded["backend"] != expected:
        raise SystemExit(f"{result}: the run used {loaded['backend']}, not {expected}")
    outcomes: dict[str, str] = loaded["outcomes"]
    return outcomes


# -- comparing ------------------------------------------------------------------------------


def load_allowlist(path: Path) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = json.loads(path.read_text())["differences"]
    for entry in entries:
        missing = {"suite", "config", "test", "stock", "safepg", "reason"} - entry.keys()
        if missing:
            raise SystemExit(f"{path}: an entry lacks {sorted(missing)}: {entry}")
    return entries


def allowed(entries: list[dict[str, str]], suite: str, config: str, test: str,
            stock: str, safepg: str) -> dict[str, str] | None:  # fmt: skip
    for entry in entries:
        if (
            entry["suite"] == suite
            and fnmatch.fnmatchcase(config, entry["config"])
            and fnmatch.fnmatchcase(test, entry["test"])
            and fnmatch.fnmatchcase(stock, entry["stock"])
            and fnmatch.fnmatchcase(safepg, entry["safepg"])
        ):
            return entry
    return None


def compare(
    suite: str, config: str, stock: dict[str, str], safepg: dict[str, str],
    entries: list[dict[str, str]],
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:  # fmt: skip
    """(unexplained, explained) differences: outcomes that differ, tests run by one only."""
    unexplained, explained = [], []
    for test in sorted(stock.keys() | safepg.keys()):
        a, b = stock.get(test, "absent"), safepg.get(test, "absent")
        if a == b:
            continue
        diff = {"test": test, "stock": a, "safepg": b}
        entry = allowed(entries, suite, config, test, a, b)
        if entry is None:
            unexplained.append(diff)
        else:
            explained.append({**diff, "reason": entry["reason"]})
    return unexplained, explained


def counts(outcomes: dict[str, str]) -> dict[str, int]:
    found = Counter(outcomes.values())
    return {"total": len(outcomes), **{k: found.get(k, 0) for k in OUTCOMES}}


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["sqlalchemy", "django"], action="append")
    parser.add_argument("--config", action="append", help="sync, async, no-pool, pool")
    parser.add_argument("-k", dest="select", help="SQLAlchemy: pytest -k")
    parser.add_argument("--sqlalchemy-paths", nargs="+", default=SQLALCHEMY_PATHS)
    parser.add_argument("--django-apps", nargs="+", default=DJANGO_APPS)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("SAFEPG_PEER_CACHE") or Path.home() / ".cache" / "safepg-peer"),
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--allowlist", type=Path, default=ALLOWLIST)
    parser.add_argument(
        "--compare-only", type=Path, metavar="RUN_DIR",
        help="compare the reports of an earlier run (its directory) again, running nothing",
    )  # fmt: skip
    args = parser.parse_args(argv)
    parts = args.only or ["sqlalchemy", "django"]
    entries = load_allowlist(args.allowlist)
    cache: Path = args.cache.resolve()
    if args.compare_only:
        work = args.compare_only.resolve()
        trees = {}
    else:
        work = cache / "runs" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        work.mkdir(parents=True)
        trees = {
            name: sdist_tree(name, cache) for name in ("sqlalchemy", "django") if name in parts
        }
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "scripts/dev peer " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "versions": {
            "python": sys.version.split()[0],
            "psycopg": importlib.metadata.version("psycopg"),
            **{name: version for name, (version, _) in trees.items()},
        },
        "parts": {},
    }
    if args.compare_only:
        results = json.loads((work / "run.json").read_text())
        results["parts"] = {}
    failed = False
    # A server per side: prepared transactions (SQLAlchemy's TwoPhaseCommitTest names them) are
    # the cluster's, not a database's, and the two sides run at once.
    with (
        Server(start=not args.compare_only) as stock_server,
        Server(start=not args.compare_only) as safepg_server,
    ):
        servers = {"stock": stock_server, "safepg": safepg_server}
        if not args.compare_only:
            results["versions"]["postgresql"] = stock_server.server.major_version
            (work / "run.json").write_text(json.dumps(results, indent=1))
        plan: list[tuple[str, str]] = []
        if "sqlalchemy" in parts:
            plan += [("sqlalchemy", c) for c in SQLALCHEMY_CONFIGS]
        if "django" in parts:
            plan += [("django", c) for c in DJANGO_CONFIGS]
        for suite, config in plan:
            if args.config and config not in args.config:
                continue
            runs: dict[str, dict[str, str]] = {}
            names = {side: f"peer_{suite}_{config}_{side}".replace("-", "_") for side in SIDES}
            if not args.compare_only:
                log(f"{suite} {config}: stock and safepg at once (logs: {work})")
                _, tree = trees[suite]
                jobs = {}
                for side, name in names.items():
                    server = servers[side]
                    dbname = server.database(name)
                    if suite == "sqlalchemy":
                        url = server.url(SQLALCHEMY_CONFIGS[config][side == "safepg"], dbname)
                        job = sqlalchemy_job(tree, url, name, work / f"{name}.xml",
                                             args.sqlalchemy_paths, args.select)  # fmt: skip
                    else:
                        stock_engine, safepg_engine, pool = DJANGO_CONFIGS[config]
                        engine = safepg_engine if side == "safepg" else stock_engine
                        options = {"pool": True} if pool else {}
                        job = django_job(tree, engine, options, server, dbname,
                                         work / f"{name}.json", args.django_apps)  # fmt: skip
                    cmd, cwd, env = job
                    jobs[side] = (
                        cmd,
                        cwd,
                        {**env, **server.environment(side)},
                        work / f"{name}.log",
                    )
                for side, done in run_jobs(jobs).items():
                    (work / f"{names[side]}.done").write_text(json.dumps(done))
            timings = {}
            for side, name in names.items():
                if not (work / f"{name}.done").exists():
                    continue
                timings[side] = json.loads((work / f"{name}.done").read_text())
                runs[side] = (
                    sqlalchemy_outcomes(work / f"{name}.xml", side)
                    if suite == "sqlalchemy"
                    else django_outcomes(work / f"{name}.json", side)
                )
                log(f"  {side}: {counts(runs[side])} in {timings[side]['seconds']:.0f} s"
                    + (" (interrupted)" if timings[side]["interrupted"] else ""))  # fmt: skip
            if len(runs) < 2:
                continue
            interrupted = any(t["interrupted"] for t in timings.values())
            if interrupted:
                # Compared where both ran; the tests only one side reached are counted.
                both = runs["stock"].keys() & runs["safepg"].keys()
                only = {side: len(runs[side].keys() - both) for side in SIDES}
                runs = {side: {k: runs[side][k] for k in both} for side in SIDES}
            unexplained, explained = compare(suite, config, runs["stock"], runs["safepg"], entries)
            empty = [side for side, outcome in runs.items() if not outcome]
            part: dict[str, Any] = {
                side: {**counts(runs[side]), "seconds": round(timings[side]["seconds"])}
                for side in SIDES
            }
            part.update(explained=explained, unexplained=unexplained)
            if interrupted:
                part["interrupted"] = {
                    "compared": "only the tests both runs reached",
                    "tests_reached_by_one_run_only": only,
                }
            if empty:
                part["no_results"] = empty
            results["parts"][f"{suite} {config}"] = part
            if unexplained or empty:
                failed = True
                log(
                    f"  {len(unexplained)} unexplained difference(s); runs without results: {empty}"
                )
                for diff in unexplained[:30]:
                    log(f"    {diff}")
            else:
                log(f"  the same outcome per test, {len(explained)} difference(s) allow-listed")
    results["result"] = "differences" if failed else "same"
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results: {args.results}; logs and reports: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
