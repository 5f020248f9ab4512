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
