"""Naming a mistyped connection option without echoing what may be a secret.

libpq refuses an unknown keyword by quoting it, and in a conninfo string or a URL that quoted
"keyword" may be a fragment of a badly quoted password. So the text the user wrote is shown only
when it cannot hold a secret; a near miss of one of libpq's own keywords is named by that
keyword, which is never the user's text.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable

from psycopg import pq

# How alike (difflib's ratio) a name must be to a keyword to be taken for a typo of it:
# "sslrootcrt" -> "sslrootcert" is 0.95, "usr" -> "user" 0.86, "dbase" -> "dbname" 0.73.
_CUTOFF = 0.8
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Parts of the names of libpq keywords whose values are secrets (libpq 18 added
# oauth_client_secret, scram_client_key and scram_server_key, whose badly quoted values are as
# much secrets as a password). "key" also covers sslkey, a path: its names are hidden needlessly.
_SECRET_WORDS = ("password", "secret", "token", "key")


@functools.cache
def libpq_keywords() -> tuple[str, ...]:
    """Every connection option the loaded libpq knows (``PQconndefaults``), sorted."""
    return tuple(sorted(o.keyword.decode() for o in pq.Conninfo.get_defaults()))


def near_miss(name: str, known: Iterable[str] = ()) -> str | None:
    """The libpq keyword (or one of *known*) that *name* looks like a typo of, or None.

    Case is ignored (``SSLMODE`` is a near miss of ``sslmode``); an exact keyword is no typo.
    """
    candidates = {*libpq_keywords(), *known}
    if name in candidates:
        return None
    found = difflib.get_close_matches(name.lower(), sorted(candidates), n=1, cutoff=_CUTOFF)
    return found[0] if found else None


def may_hold_secret(text: str) -> bool:
    """Whether a conninfo string or URL could hold a password that a parse error might quote.

    Conservative: a keyword that holds a secret (``password``, ``sslpassword``,
    ``oauth_client_secret``, ``scram_client_key``, or a later ``*token*``), a URL's user-info
    with a colon, percent-encoding (which can spell a keyword), and quotes or backslashes (which
    change where a value ends).
    """
    lowered = text.lower()
    if any(word in lowered for word in _SECRET_WORDS) or any(c in text for c in "%\\'\""):
        return True
    _scheme, sep, rest = text.partition("://")
    return bool(sep) and "@" in rest and ":" in rest.rpartition("@")[0]


def unknown_option(name: str, *, show: bool, known: Iterable[str] = ()) -> str:
    """The message for an unknown option called *name*, which is shown only if *show*.

    Every path (conninfo, URL query, keyword arguments, SQLAlchemy, Django, psycopg2, asyncpg,
    the CLI) says it in these words. A near miss is named by the known keyword alone.
    """
    shown = show and _NAME.fullmatch(name) is not None
    suggestion = near_miss(name, known)
    label = f'unknown option "{name}"' if shown else "unknown option"
    if suggestion is not None:
        return f'{label}; did you mean "{suggestion}"?'
    if shown:
        return (
            f"{label}: libpq has no such keyword (the list: "
            "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS)"
        )
    return (
        f"{label} (its name is not shown: with a badly quoted value it may be part of a "
        "password; check the keywords and the quoting of the values)"
    )
