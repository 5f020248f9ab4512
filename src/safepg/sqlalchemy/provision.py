"""SQLAlchemy's test provisioning for the ``postgresql+safepg`` dialects.

SQLAlchemy's test plugin (``sqlalchemy.testing.plugin.pytestplugin``, used by SQLAlchemy's own
suite and by the suites of Alembic and third-party dialects) asks each dialect to load its
provisioning: the routines that create and drop the per-worker databases of ``pytest -n``, the
keyword arguments of temporary tables, how to set a default schema, and so on. safepg's dialects
are SQLAlchemy's psycopg dialects, through safepg, on PostgreSQL: the routines are PostgreSQL's,
which SQLAlchemy registers for the ``postgresql`` backend. Importing them is all this module
does; `SafePGDialect.load_provisioning` imports it. Nothing here runs outside test suites.
"""

from __future__ import annotations

# Registers, with sqlalchemy.testing.provision, PostgreSQL's routines for the "postgresql"
# backend that safepg's URLs name: create_db, drop_db, temp_table_keyword_args, upsert, ...
import sqlalchemy.dialects.postgresql.provision  # noqa: F401

__all__: list[str] = []
