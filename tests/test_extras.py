"""Every optional part, without its extra, says which extra to install.

Each case runs in a fresh interpreter where the extra's module is made unimportable by a
``None`` entry in ``sys.modules`` (what Python does for a module that is not installed, as far as
an ``import`` statement can tell), so nothing already imported here hides the failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def run_without(missing: list[str], code: str) -> subprocess.CompletedProcess[str]:
    """Run *code* in a new interpreter in which none of *missing* can be imported."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in missing)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.parametrize(
    ("module", "missing", "extra"),
    [
        ("safepg.pool", ["psycopg_pool"], "pool"),
        ("safepg.sqlalchemy", ["sqlalchemy"], "sqlalchemy"),
        ("safepg.psycopg2", ["psycopg2"], "psycopg2"),
        ("safepg.asyncpg", ["asyncpg"], "asyncpg"),
        ("safepg.django.base", ["django"], "django"),
        ("safepg.testing", ["cryptography"], "testing"),
    ],
)
def test_import_names_the_extra(module: str, missing: list[str], extra: str) -> None:
    result = run_without(
        missing,
        f"""
        try:
            import {module}
        except ImportError as ex:
            print(type(ex).__name__, ex)
        else:
            print("imported")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ImportError "), result.stdout
    assert f"pip install 'safepg-tls[{extra}]'" in result.stdout


@pytest.mark.parametrize(
    ("missing", "code", "extra"),
    [
        (
            ["botocore"],
            "import safepg.aws; safepg.aws.iam_token('h', 1, 'u', 'r')",
            "aws",
        ),
        (["azure"], "import safepg.azure; safepg.azure.EntraAuth()._get_credential()", "azure"),
        (["google"], "import safepg.gcp; safepg.gcp.IAMAuth()._load()", "gcp"),
    ],
)
def test_cloud_token_names_the_extra(missing: list[str], code: str, extra: str) -> None:
    # The cloud modules import their SDK when a token is first needed.
    result = run_without(
        missing,
        f"""
        import safepg
        try:
            {code}
        except safepg.ConfigurationError as ex:
            print(ex)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert f"pip install 'safepg-tls[{extra}]'" in result.stdout


def test_django_pool_without_psycopg_pool() -> None:
    # Django's own wording for a missing psycopg_pool, plus the extra that brings it.
    result = run_without(
        ["psycopg_pool"],
        """
        import django
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured

        settings.configure(DATABASES={"default": {
            "ENGINE": "safepg.django", "NAME": "app", "HOST": "db.example.com",
            "OPTIONS": {"pool": True},
        }})
        django.setup()
        from django.db import connection
        try:
            connection.pool
        except ImproperlyConfigured as ex:
            print("ImproperlyConfigured", ex)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ImproperlyConfigured Error loading psycopg_pool module.")
    assert "Did you install psycopg[pool]?" in result.stdout
    assert "pip install 'safepg-tls[django,pool]'" in result.stdout


def test_demo_without_the_testing_extra() -> None:
    result = run_without(
        ["cryptography"],
        """
        from safepg._cli import main
        sys.exit(main(["demo"]))
        """,
    )
    assert result.returncode == 2
    assert "pip install 'safepg-tls[testing]'" in result.stderr
    assert "apt-get install postgresql" in result.stderr
    assert "brew install postgresql@17" in result.stderr


def test_demo_help_says_what_it_needs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "safepg", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "1000"},  # argparse wraps at hyphens otherwise
    )
    flat = " ".join(result.stdout.split())
    assert "safepg-tls[testing]" in flat
    assert "apt-get install postgresql" in flat
    assert "brew install postgresql@17" in flat
    top = subprocess.run(
        [sys.executable, "-m", "safepg", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "no database needed" not in top.stdout
