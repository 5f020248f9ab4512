"""Attack round 3b: holes found in named typos, origins, ``check -W``, inspect and SQLAlchemy."""

from __future__ import annotations

import pytest

import safepg
from safepg import ConfigurationError
from safepg._typos import may_hold_secret


@pytest.mark.parametrize(
    "text",
    [
        # libpq 18's oauth_client_secret: a badly quoted secret's second word became the
        # "unknown option" shown by name.
        "host=localhost oauth_client_secret=hunter2 hunter3=x",
        "postgresql://localhost/db?oauth_client_secret=a&hunter3=1",
    ],
)
def test_a_badly_quoted_client_secret_is_not_named_as_an_unknown_option(text: str) -> None:
    assert may_hold_secret(text)
    with pytest.raises(ConfigurationError) as caught:
        safepg.connect(text)
    assert "hunter" not in str(caught.value)


# A password typed with an unescaped "@" and "?" puts its tail in the URL's query, where
# SQLAlchemy reads "hunter3" as a query option's name.
_SPLIT_PASSWORD_URL = "postgresql://bob:p@ss?hunter3=x@localhost/db"


def test_a_sqlalchemy_query_key_that_may_be_part_of_a_password_is_not_named() -> None:
    import safepg.sqlalchemy

    with pytest.raises(ConfigurationError) as caught:
        safepg.sqlalchemy.creator(_SPLIT_PASSWORD_URL)()
    assert "hunter" not in str(caught.value)
    assert "unknown option" in str(caught.value)


def test_a_sqlalchemy_query_typo_is_still_named_without_a_password() -> None:
    import safepg.sqlalchemy

    with pytest.raises(ConfigurationError, match='"hunter3": libpq has no such keyword'):
        safepg.sqlalchemy.creator("postgresql://localhost/db?hunter3=x")()


def test_an_asyncpg_url_query_key_that_may_be_part_of_a_password_is_not_named() -> None:
    pytest.importorskip("asyncpg")
    import safepg.sqlalchemy

    url = _SPLIT_PASSWORD_URL.replace("postgresql:", "postgresql+asyncpg:")
    with pytest.raises(ConfigurationError) as caught:
        safepg.sqlalchemy.asyncpg_creator(url)
    assert "hunter" not in str(caught.value)
    assert "query option" in str(caught.value)
