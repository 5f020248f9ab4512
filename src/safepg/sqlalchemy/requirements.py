"""SQLAlchemy test-suite requirements for the ``postgresql+safepg`` dialects.

A third-party dialect tells SQLAlchemy's test plugin what it supports through a requirements
class, named in its ``setup.cfg``::

    [sqla_testing]
    requirement_cls = safepg.sqlalchemy.requirements:Requirements

`Requirements` answers for PostgreSQL where SQLAlchemy's generic `SuiteRequirements` says no
(isolation levels, JSON, time zones, ...), for running ``sqlalchemy.testing.suite`` against
``postgresql+safepg://`` and ``postgresql+safepg_async://``.

safepg's dialects are SQLAlchemy's psycopg dialects with connections opened through safepg, so
every exclusion the suite writes for psycopg (``only_on("+psycopg")``, ``__only_on__ =
"postgresql+psycopg"``, ``skip_if("+psycopg")``, ``testing.against("+psycopg")``) is meant for
them too. `PsycopgAlias` makes SQLAlchemy's exclusions read a ``+psycopg`` driver spec as
``+safepg`` when the engine under test is safepg's: mixed into a requirements class (SQLAlchemy's
own ``test.requirements.DefaultRequirements`` too, to run SQLAlchemy's own tests), it does that
from the moment the plugin makes the requirements object. With other drivers nothing changes.
What the alias cannot reach are tests that compare ``dialect.driver`` with a name in Python
(``ServerSideCursorsTest._is_server_side``): scripts/peer_allowlist.json lists those.

Nothing here runs outside test suites.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements

__all__ = ["PsycopgAlias", "Requirements"]

# The driver names of SQLAlchemy's psycopg dialects (the async one is "psycopg" too) and of
# safepg's (both "safepg").
_PSYCOPG = "psycopg"
_SAFEPG = "safepg"

_original_call: Callable[..., Any] = exclusions.SpecPredicate.__call__
_spec: Callable[..., Any] = exclusions.SpecPredicate
_open: Callable[[], Any] = exclusions.open


def _call_as_psycopg(self: exclusions.SpecPredicate, config: Any) -> bool:
    """`SpecPredicate.__call__`, with a ``+psycopg`` spec matching safepg's engines too."""
    db = self.db
    if config is not None and "+" in db and config.db.driver == _SAFEPG:
        backend, _, driver = db.partition("+")
        if driver == _PSYCOPG:
            aliased = _spec(f"{backend}+{_SAFEPG}", self.op, self.spec, self.description)
            return bool(_original_call(aliased, config))
    return bool(_original_call(self, config))


def install_psycopg_alias() -> None:
    """Make SQLAlchemy's exclusions treat safepg's engines as psycopg's (idempotent)."""
    exclusions.SpecPredicate.__call__ = _call_as_psycopg  # type: ignore[method-assign]


class PsycopgAlias:
    """A requirements-class mixin: from its creation on, ``+psycopg`` specs match safepg's
    engines too (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        install_psycopg_alias()
        super().__init__(*args, **kwargs)


class Requirements(PsycopgAlias, SuiteRequirements):
    """`SuiteRequirements` with PostgreSQL's answers, for ``sqlalchemy.testing.suite``."""

    @property
    def index_reflects_included_columns(self) -> Any:
        return _open()

    @property
    def autocommit(self) -> Any:
        return _open()

    @property
    def isolation_level(self) -> Any:
        return _open()

    def get_isolation_levels(self, config: Any) -> dict[str, Any]:
        return {
            "default": "READ COMMITTED",
            "supported": [
                "AUTOCOMMIT",
                "READ COMMITTED",
                "READ UNCOMMITTED",
                "REPEATABLE READ",
                "SERIALIZABLE",
            ],
        }

    @property
    def datetime_timezone(self) -> Any:
        return _open()

    @property
    def json_type(self) -> Any:
        return _open()
