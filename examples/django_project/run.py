"""Django through safepg: migrate, write and read rows, and show how the session is protected.

    python examples/django_project/run.py                      # a throwaway TLS server
    DJANGO_DATABASE=postgresql://app:secret@db.example.com/app \\
        python examples/django_project/run.py                  # your own database

The throwaway server needs ``safepg-tls[testing]`` and PostgreSQL's server binaries; Django comes
with ``safepg-tls[django]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def demo() -> int:
    import django
    from django.core.management import call_command
    from django.db import connection

    import safepg

    django.setup()
    from notes.models import Note

    call_command("migrate", verbosity=0)
    Note.objects.create(text="written through safepg")
    print("notes:", [str(n) for n in Note.objects.all()])
    connection.ensure_connection()
    # Django's connection.connection is a real psycopg connection, opened by safepg.connect.
    print(safepg.check(connection.connection))
    return 0


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")
    if os.environ.get("DJANGO_DATABASE"):
        return demo()
    from safepg.testing import PostgresServer

    with PostgresServer() as server:
        os.environ["DJANGO_DATABASE"] = server.url()
        return demo()


if __name__ == "__main__":
    sys.exit(main())
