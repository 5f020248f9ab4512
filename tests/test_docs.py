"""Every Python snippet in the documentation (docs/**/*.md and README.md) runs, so the docs
cannot drift from the code.

Each ```python block runs on its own, in a fresh namespace, against the session's real TLS test
server: the snippets are written for ``db.example.com`` with user and database ``app``, and run
with that name replaced by the test server's (``localhost``), its port, password and CA given as
libpq's ``PGPORT``, ``PGPASSWORD`` and ``PGSSLROOTCERT``, ``DATABASE_URL`` and ``DB_PASSWORD`` set,
and ``pw`` and ``url`` defined. Top-level ``await`` is allowed (run in an event loop).

A block that cannot run here is marked on the line before it, and listed by
`test_snippets_not_run_here`:

    <!-- snippet: skip needs a cloud: Amazon RDS -->
    <!-- snippet: skip runs in tests/test_x.py: why -->

Only those two kinds of reason are accepted: a cloud (or another external service), or another
test that runs the code in its own harness (a pytest test file, a Django settings module).
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from safepg.testing import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([*(ROOT / "docs").rglob("*.md"), ROOT / "README.md"])
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SKIP = re.compile(r"<!-- snippet: skip (?P<reason>[^>]*?) -->\s*$")
_REASONS = re.compile(r"(needs a cloud|needs [\w ]+|runs in (tests|examples)/[\w/.]+\.py): .+")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _snippets() -> list[Snippet]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
            skip = _SKIP.search(before)
            found.append(Snippet(path, line, match[1], skip["reason"] if skip else None))
    return found


SNIPPETS = _snippets()
RUNNABLE = [s for s in SNIPPETS if s.skip is None]


def test_there_are_snippets() -> None:
    assert len(RUNNABLE) >= 10
    assert {s.path.name for s in RUNNABLE} >= {"README.md", "getting-started.md"}


def test_snippets_not_run_here() -> None:
    """The list of snippets not run here, each with an accepted reason (see the module doc)."""
    skipped = [s for s in SNIPPETS if s.skip is not None]
    for s in skipped:
        assert _REASONS.fullmatch(s.skip or ""), f"{s.id}: not an accepted reason: {s.skip!r}"
        where = re.match(r"runs in ((?:tests|examples)/[\w/.]+\.py)", s.skip or "")
        if where:
            assert (ROOT / where[1]).is_file(), f"{s.id}: {where[1]} does not exist"
    print("\n".join(f"not run here: {s.id}: {s.skip}" for s in skipped))


def _environment(server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    monkeypatch.setenv("PGPORT", str(server.port))
    monkeypatch.setenv("PGPASSWORD", server.password)
    monkeypatch.setenv("PGSSLROOTCERT", str(server.ca_path))
    url = f"postgresql://{server.user}@{server.host}:{server.port}/{server.dbname}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("DB_PASSWORD", server.password)
    # The `safepg` command of this interpreter's environment, as an installed one would be.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return {
        "__name__": "__snippet__",
        "pw": server.password,
        "url": f"{url}?sslrootcert={quote(str(server.ca_path), safe='')}",
    }


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.id for s in RUNNABLE])
def test_snippet_runs(
    snippet: Snippet,
    server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    namespace = _environment(server, monkeypatch)
    monkeypatch.chdir(tmp_path)
    source = snippet.code.replace("db.example.com", server.host)
    code = compile(
        source, snippet.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    result = eval(code, namespace)  # noqa: S307 - the project's own documentation
    if asyncio.iscoroutine(result):
        asyncio.run(result)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every warning is an error, internal links and anchors are
    checked (no network: there is no external link checker)."""
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_broken_anchor_fails_the_build(tmp_path: Path) -> None:
    """The strict build does check anchors: a copy of the docs with a link to a missing one
    fails it."""
    pytest.importorskip("mkdocs")
    import shutil

    copy = tmp_path / "project"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(ROOT / "src", copy / "src")
    page = copy / "docs" / "index.md"
    page.write_text(page.read_text() + "\nSee [nowhere](cli.md#no-such-anchor).\n")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "s")],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode != 0
    assert "no-such-anchor" in result.stderr


def test_readme_links_to_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    pages = [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")]
    missing = [p for p in pages if p not in readme]
    assert not missing, f"README.md does not link to {missing}"
    assert len(readme.splitlines()) <= 260
