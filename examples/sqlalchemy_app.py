"""A SQLAlchemy 2 ORM app whose every connection is verified by safepg (``safepg-tls[sqlalchemy]``).

Run it against your own database::

    DATABASE_URL="postgres://app:secret@db.example.com/app" python examples/sqlalchemy_app.py

With no ``DATABASE_URL`` it starts a throwaway TLS server (needs ``safepg-tls[testing]`` and
PostgreSQL's server binaries).
"""

from __future__ import annotations

import os
import sys

from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import safepg
import safepg.sqlalchemy


class Base(DeclarativeBase):
    pass


class Greeting(Base):
    __tablename__ = "safepg_example_greetings"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(80))


def run(url: str) -> int:
    # Any DATABASE_URL form works: postgres://, postgresql://, postgresql+psycopg://.
    # Every engine and pool option is passed through to SQLAlchemy.
    engine = safepg.sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=5)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add(Greeting(text="hello, verified world"))
            session.commit()
            print(session.scalars(select(Greeting.text)).first())
            # The psycopg connection under SQLAlchemy's wrappers, for safepg.check().
            dbapi_conn = session.connection().connection.driver_connection
            if dbapi_conn is not None:
                print(safepg.check(dbapi_conn).summary)
        Base.metadata.drop_all(engine)
    finally:
        engine.dispose()
    return 0


def main() -> int:
    url = os.environ.get("DATABASE_URL")
    if url:
        return run(url)
    from safepg.testing import PostgresServer

    with PostgresServer() as server:
        return run(server.url())


if __name__ == "__main__":
    sys.exit(main())
