"""Settings for the safepg Django example: one database, through the "safepg.django" engine.

The database comes from ``DJANGO_DATABASE``, a libpq conninfo string or ``postgresql://`` URL
(run.py sets it for a throwaway server). Written out, the same settings are::

    DATABASES = {
        "default": {
            "ENGINE": "safepg.django",
            "NAME": "app",
            "USER": "app",
            "PASSWORD": "...",
            "HOST": "db.example.com",
            "PORT": "5432",
            "OPTIONS": {"sslrootcert": "/path/to/ca.pem"},
        }
    }
"""

from __future__ import annotations

import os
from typing import Any

from psycopg.conninfo import conninfo_to_dict

if not os.environ.get("DJANGO_DATABASE"):
    raise SystemExit(
        "set DJANGO_DATABASE to a conninfo string or postgresql:// URL, or run run.py, "
        "which starts a throwaway TLS server"
    )
_params: dict[str, Any] = conninfo_to_dict(os.environ["DJANGO_DATABASE"])

SECRET_KEY = "only-for-this-example"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["notes"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "safepg.django",  # Django's PostgreSQL backend, through safepg
        "NAME": _params.pop("dbname", ""),
        "USER": _params.pop("user", ""),
        "PASSWORD": _params.pop("password", ""),
        "HOST": _params.pop("host", ""),
        "PORT": _params.pop("port", ""),
        # Everything else is a libpq parameter (sslrootcert, application_name, ...). A pool:
        # add "pool": True (Django 5.1+, psycopg_pool).
        "OPTIONS": _params,
    }
}
