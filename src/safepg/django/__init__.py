"""A Django database backend whose every connection goes through safepg (``safepg-tls[django]``).

In ``settings.py``, change only the engine::

    DATABASES = {
        "default": {
            "ENGINE": "safepg.django",  # instead of "django.db.backends.postgresql"
            "NAME": "app",
            "USER": "app",
            "PASSWORD": os.environ["DB_PASSWORD"],
            "HOST": "mydb.abc123.eu-central-1.rds.amazonaws.com",
            "OPTIONS": {"application_name": "web"},
        }
    }

It is Django's own PostgreSQL backend (`safepg.django.base.DatabaseWrapper` subclasses it), with
connections opened by `safepg.connect` (psycopg 3), through a safepg pool with
``OPTIONS["pool"]`` (Django 5.1+), or by `safepg.psycopg2.connect` when Django uses psycopg2.
See `safepg.django.base` for the details.
"""
