"""scripts/peer.py's comparison: outcomes read per test, differences explained by the allow-list
or not, and the committed allow-list well formed. (The runs themselves: ``scripts/dev peer``.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "peer.py"


@pytest.fixture(scope="module")
def peer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("safepg_peer_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="test.dialect.test_suite.HasTableTest_postgresql+DRIVER_15_18" name="test_a"/>
<testcase classname="test.dialect.test_suite.HasTableTest_postgresql+DRIVER_15_18" name="test_b">
<failure message="no"/></testcase>
<testcase classname="test.engine.test_pool.QueuePoolTest" name="test_c"><skipped/></testcase>
<testcase classname="test.engine.test_pool.QueuePoolTest" name="test_d"/>
<testcase classname="test.engine.test_pool.QueuePoolTest" name="test_d"><error/></testcase>
</testsuite></testsuites>
"""


def test_sqlalchemy_outcomes_per_test(peer: ModuleType, tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text(JUNIT.replace("DRIVER", "safepg"))
    assert peer.sqlalchemy_outcomes(report, "safepg") == {
        "test.dialect.test_suite.HasTableTest::test_a": "passed",
        "test.dialect.test_suite.HasTableTest::test_b": "failed",
        "test.engine.test_pool.QueuePoolTest::test_c": "skipped",
        "test.engine.test_pool.QueuePoolTest::test_d": "failed",  # a teardown error after a pass
    }


def test_a_report_of_the_other_driver_is_refused(peer: ModuleType, tmp_path: Path) -> None:
    # The safepg side's report must come from safepg's dialect, not from psycopg's.
    report = tmp_path / "r.xml"
    report.write_text(JUNIT.replace("DRIVER", "psycopg"))
    with pytest.raises(SystemExit, match="another driver"):
        peer.sqlalchemy_outcomes(report, "safepg")


def test_django_outcomes_check_the_backend(peer: ModuleType, tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"backend": "safepg.django.base", "outcomes": {"t": "passed"}}))
    assert peer.django_outcomes(result, "safepg") == {"t": "passed"}
    with pytest.raises(SystemExit, match=r"not django\.db\.backends\.postgresql\.base"):
        peer.django_outcomes(result, "stock")


ENTRY = {
    "suite": "sqlalchemy",
    "config": "*",
    "test": "test.x.T::test_ss_*",
    "stock": "passed",
    "safepg": "failed",
    "reason": "compares the driver's name",
}


def test_only_allow_listed_differences_are_explained(peer: ModuleType) -> None:
    stock = {"test.x.T::test_ss_1": "passed", "test.x.T::test_other": "passed", "y": "skipped"}
    safepg = {"test.x.T::test_ss_1": "failed", "test.x.T::test_other": "failed", "y": "skipped"}
    safepg["only_here"] = "passed"
    unexplained, explained = peer.compare("sqlalchemy", "sync", stock, safepg, [ENTRY])
    assert explained == [
        {"test": "test.x.T::test_ss_1", "stock": "passed", "safepg": "failed",
         "reason": "compares the driver's name"},
    ]  # fmt: skip
    assert unexplained == [
        {"test": "only_here", "stock": "absent", "safepg": "passed"},
        {"test": "test.x.T::test_other", "stock": "passed", "safepg": "failed"},
    ]
    # The entry names the outcomes it explains: safepg passing where stock fails is not it.
    unexplained, _ = peer.compare(
        "sqlalchemy", "sync", {"test.x.T::test_ss_1": "failed"},
        {"test.x.T::test_ss_1": "passed"}, [ENTRY],
    )  # fmt: skip
    assert len(unexplained) == 1
    # Nor another suite's.
    unexplained, _ = peer.compare("django", "pool", stock, safepg, [ENTRY])
    assert len(unexplained) == 3


def test_the_committed_allowlist(peer: ModuleType) -> None:
    entries = peer.load_allowlist(peer.ALLOWLIST)
    assert entries, "empty: then scripts/peer_allowlist.json should say why"
    for entry in entries:
        assert entry["suite"] in ("sqlalchemy", "django")
        assert len(entry["reason"]) > 40, entry  # a reason, not a label
        assert entry["stock"] != entry["safepg"], entry
