"""scripts/check_wheel.py fails a wheel that lacks a data file, or is otherwise not what
src/safepg and pyproject.toml describe.

The wheel is built here without isolation (hatchling from the test extra), or is the one named
by SAFEPG_TEST_WHEEL: scripts/dev wheel passes the wheel it built, so that CI shows the check
failing on copies of the very artifact it ships.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT / "scripts" / "check_wheel.py"
PACKAGE_DIR = ROOT / "src" / "safepg"
# The package's data files, as the checker sees them (a generic list: new ones join it).
DATA_FILES = sorted(
    p.relative_to(PACKAGE_DIR).as_posix()
    for p in PACKAGE_DIR.rglob("*")
    if p.is_file() and p.suffix not in (".py", ".pyc", ".pyo") and "__pycache__" not in p.parts
)


@pytest.fixture(scope="module")
def checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_wheel", CHECKER)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_wheel"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("SAFEPG_TEST_WHEEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("*.whl")
    return built


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def doctor(wheel: Path, out_dir: Path, change: Callable[[dict[str, bytes]], object]) -> Path:
    """A copy of the wheel (same file name) with ``change`` applied to its members, and its
    RECORD rewritten to match: only the content checks can tell."""
    with zipfile.ZipFile(wheel) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
    (record,) = (n for n in members if n.endswith(".dist-info/RECORD"))
    change(members)
    members.pop(record)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for name, data in members.items():
        writer.writerow(_record_line(name, data))
    writer.writerow([record, "", ""])
    members[record] = buffer.getvalue().encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / wheel.name
    with zipfile.ZipFile(copy, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return copy


def check(
    checker: ModuleType, capsys: pytest.CaptureFixture[str], *args: object
) -> tuple[int, str]:
    code = checker.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_built_wheel_passes(
    checker: ModuleType, wheel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without this, the failures below would prove nothing.
    code, out = check(checker, capsys, "artifacts", wheel)
    assert code == 0, out
    assert "OK" in out


def test_data_files_are_found() -> None:
    assert "py.typed" in DATA_FILES
    assert "cacerts/inventory.json" in DATA_FILES
    assert sum(name.endswith(".pem") for name in DATA_FILES) >= 1


@pytest.mark.parametrize("missing", DATA_FILES)
def test_a_missing_data_file_fails(
    checker: ModuleType,
    wheel: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    missing: str,
) -> None:
    doctored = doctor(wheel, tmp_path, lambda members: members.pop(f"safepg/{missing}"))
    code, out = check(checker, capsys, "artifacts", doctored)
    assert code == 1
    assert f"safepg/{missing} is in src/safepg but missing from it" in out


def test_a_data_file_added_to_the_source_must_be_shipped(
    checker: ModuleType, wheel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A copy of the source tree with one more data file (a JSON schema, say) than the wheel.
    project = tmp_path / "project"
    shutil.copytree(
        PACKAGE_DIR, project / "src" / "safepg", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    (project / "src" / "safepg" / "schemas").mkdir(exist_ok=True)
    (project / "src" / "safepg" / "schemas" / "new-in-source.json").write_text("{}\n")
    code, out = check(checker, capsys, "--project", project, "artifacts", wheel)
    assert code == 1
    assert "safepg/schemas/new-in-source.json is in src/safepg but missing from it" in out


def test_a_changed_ca_file_fails(
    checker: ModuleType, wheel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = next(name for name in DATA_FILES if name.endswith(".pem"))

    def truncate(members: dict[str, bytes]) -> None:
        data = members[f"safepg/{pem}"]
        members[f"safepg/{pem}"] = data[: data.rindex(b"-----BEGIN CERTIFICATE-----")]

    code, out = check(checker, capsys, "artifacts", doctor(wheel, tmp_path, truncate))
    assert code == 1
    assert f"safepg/{pem} differs from src/safepg/{pem}" in out
    assert "does not match its entry in cacerts/inventory.json" in out


def test_a_dependency_on_the_taken_name_fails(
    checker: ModuleType, wheel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "safepg" on PyPI is an unrelated project: an extra that refers to it would install it.
    def misname(members: dict[str, bytes]) -> None:
        (name,) = (n for n in members if n.endswith(".dist-info/METADATA"))
        members[name] = members[name].replace(
            b"Provides-Extra: pytest\n",
            b"Provides-Extra: pytest\nRequires-Dist: safepg[testing]; extra == 'pytest'\n",
        )

    code, out = check(checker, capsys, "artifacts", doctor(wheel, tmp_path, misname))
    assert code == 1
    assert re.search(r"Requires-Dist .safepg\[testing\]; .*another project on PyPI", out)


def test_a_missing_entry_point_fails(
    checker: ModuleType, wheel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def drop_dialect(members: dict[str, bytes]) -> None:
        (name,) = (n for n in members if n.endswith(".dist-info/entry_points.txt"))
        members[name] = re.sub(rb"postgresql\.safepg_async = [^\n]*\n", b"", members[name])

    code, out = check(checker, capsys, "artifacts", doctor(wheel, tmp_path, drop_dialect))
    assert code == 1
    assert "entry point sqlalchemy.dialects: postgresql.safepg_async" in out
    assert "is missing" in out
