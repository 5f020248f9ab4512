"""Amazon RDS and Aurora IAM authentication tokens as passwords (``safepg-tls[aws]``).

::

    import safepg, safepg.aws

    conn = safepg.connect(
        host="mydb.abc123.eu-central-1.rds.amazonaws.com", user="app_iam", dbname="app",
        password=safepg.aws.IAMAuth(),
    )

`IAMAuth` signs a token with botocore (local signing, no network call besides what your
credential chain needs), for the host, port and user of each connection safepg makes. A token
is valid for 15 minutes; one is reused for up to 15 minutes minus *margin*, then replaced.
botocore is imported on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import _forksafe
from ._errors import ConfigurationError
from ._password import ConnectTarget
from ._tokens import TokenCache, elapsed_clock, margin_seconds
from .providers import aws_region

__all__ = ["TOKEN_LIFETIME", "IAMAuth", "iam_token"]

# RDS accepts a token for 15 minutes after it was signed (X-Amz-Expires=900).
TOKEN_LIFETIME = 900.0

_REJECTED_HINT = (
    "The password was an RDS IAM token from safepg.aws.IAMAuth. Check: the database role has "
    "the rds_iam role (GRANT rds_iam TO <user>) and IAM authentication is enabled on the "
    "instance or cluster; the IAM identity may rds-db:connect as this user "
    "(arn:aws:rds-db:<region>:<account>:dbuser:<resource-id>/<user>); the token was made for "
    "this host name, port and user (behind a tunnel or alias, use verify_as=<endpoint>, or "
    "IAMAuth(port=...)); the machine's clock is right (tokens are signed with its time)."
)


def _botocore() -> Any:
    try:
        import botocore.session
    except ImportError:
        raise ConfigurationError(
            "safepg.aws needs botocore: pip install 'safepg-tls[aws]'"
        ) from None
    return botocore


def _sign(client: Any, host: str, port: int, user: str, region: str) -> str:
    from botocore.exceptions import BotoCoreError

    try:
        token: str = client.generate_db_auth_token(
            DBHostname=host, Port=port, DBUsername=user, Region=region
        )
    except BotoCoreError as ex:
        # botocore's messages name what is missing (no credentials, a bad profile); never a key.
        raise ConfigurationError(
            f"could not make an RDS IAM token: {ex}. Configure AWS credentials as for the AWS "
            "CLI (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an "
            "instance or task role, SSO with 'aws sso login'); 'aws sts get-caller-identity' "
            "shows which identity is found."
        ) from None
    return token


def _session(session: Any, profile: str | None) -> Any:
    if session is not None:
        return session
    # botocore loads nothing here: a missing profile or a broken config file shows up when
    # the first client is made (_client).
    return _botocore().session.Session(profile=profile)


def _config_error(ex: Exception) -> ConfigurationError:
    # e.g. ProfileNotFound ("The config profile (x) could not be found"): names, never keys.
    return ConfigurationError(
        f"could not load the AWS configuration: {ex}. Check AWS_PROFILE or "
        "IAMAuth(profile=...) against ~/.aws/config (AWS_CONFIG_FILE)."
    )


def _client(session: Any, region: str) -> Any:
    """An RDS client of *session* (where botocore reads the AWS configuration)."""
    from botocore.exceptions import BotoCoreError

    try:
        return session.create_client("rds", region_name=region)
    except BotoCoreError as ex:
        raise _config_error(ex) from None


def _region(region: str | None, host: str, session: Any) -> str:
    from botocore.exceptions import BotoCoreError

    try:
        found = region or aws_region(host) or session.get_config_variable("region")
    except BotoCoreError as ex:  # reading the configuration: a missing profile
        raise _config_error(ex) from None
    if not found:
        raise ConfigurationError(
            f"no AWS region for the RDS IAM token: {host!r} is not an RDS endpoint name and no "
            "region is configured. Pass IAMAuth(region='eu-central-1'), or set AWS_REGION."
        )
    return str(found)


def iam_token(
    host: str,
    port: int,
    user: str,
    region: str | None = None,
    *,
    session: Any = None,
    profile: str | None = None,
) -> str:
    """A new RDS IAM token for *user* at *host*:*port*, signed now (valid 15 minutes).

    Args:
        host, port, user: the endpoint and database user the token is for.
        region: the AWS region; taken from an RDS host name when not given, else from the
            session's configuration.
        session: a ``botocore.session.Session`` (or a boto3 session's ``_session``); by
            default a new one, with the usual credential chain.
        profile: the AWS profile for a new session.

    Raises:
        ConfigurationError: botocore is missing, no credentials or region were found.
    """
    botocore_session = _session(session, profile)
    where = _region(region, host, botocore_session)
    client = _client(botocore_session, where)
    return _sign(client, host, port, user, where)


class IAMAuth:
    """A password callable that gives RDS IAM tokens for each connection's host, port, user.

    Pass it as ``password=`` to `safepg.connect`, `safepg.connect_async`, `safepg.pool`'s pools
    or ``connect_args`` of `safepg.sqlalchemy`'s engines. Tokens are kept per (host, port,
    user, region) for 15 minutes minus *margin*, then signed again; nothing else is kept.

    Args:
        region: the AWS region; by default taken from the RDS host name, else the session's.
        port: the port to sign for, when it differs from the one dialled (a tunnel).
        user: the user to sign for, when it differs from the connection's.
        session: a ``botocore.session.Session``; by default one is made on first use.
        profile: the AWS profile for that session (not with *session*).
        margin: seconds before a token's expiry at which it is no longer reused.
        clock: the clock for *margin*, in seconds; the default keeps running while the machine
            sleeps. Tests replace it.

    Raises:
        ConfigurationError: both *session* and *profile*, or a bad *margin*; when called, as
            for `iam_token`.
    """

    rejected_hint = _REJECTED_HINT

    def __init__(
        self,
        region: str | None = None,
        *,
        port: int | None = None,
        user: str | None = None,
        session: Any = None,
        profile: str | None = None,
        margin: float = 300.0,
        clock: Callable[[], float] = elapsed_clock,
    ) -> None:
        if session is not None and profile is not None:
            raise ConfigurationError("give IAMAuth a session or a profile, not both")
        self.region = region
        self.port = port
        self.user = user
        self.profile = profile
        self.margin = margin_seconds(margin, TOKEN_LIFETIME)
        self._session = session
        self._clock = clock
        self._cache = TokenCache(clock)
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._own_session = session is None
        _forksafe.reset_in_child(self, IAMAuth._after_fork)

    def _after_fork(self) -> None:
        # In a forked child: a parent's thread may have held the lock; the clients made here
        # (and a session made here) hold HTTP pools and locks shared with the parent, so the
        # child makes its own. A session the caller gave stays theirs.
        self._lock = threading.Lock()
        self._clients = {}
        if self._own_session:
            self._session = None

    def __repr__(self) -> str:
        return f"IAMAuth(region={self.region!r}, profile={self.profile!r})"

    def _botocore_session(self) -> Any:
        with self._lock:
            if self._session is None:
                self._session = _session(None, self.profile)
            return self._session

    def _client(self, region: str) -> Any:
        session = self._botocore_session()
        with self._lock:  # clients are thread-safe, and slow to make: one per region
            if region not in self._clients:
                self._clients[region] = _client(session, region)
            return self._clients[region]

    def __call__(self, target: ConnectTarget, /) -> str:
        """The token for *target*: a cached one within its lifetime, else a new one.

        Raises:
            ConfigurationError: *target* has several hosts. A token is signed for one host,
                and libpq would send it to the next host too, which could replay it there.
        """
        if len(target.all_hosts) > 1:
            raise ConfigurationError(
                "safepg.aws.IAMAuth signs a token for one host, and libpq sends the same "
                f"password to each of the {len(target.all_hosts)} hosts given: another host "
                "could replay it against the first. Connect to one host (an RDS cluster or "
                "proxy endpoint follows failovers itself)."
            )
        port = self.port or target.port
        user = self.user or target.user
        region = _region(self.region, target.host, self._botocore_session())

        def sign() -> tuple[str, float]:
            until = self._clock() + TOKEN_LIFETIME - self.margin  # read before signing
            return _sign(self._client(region), target.host, port, user, region), until

        return self._cache.get((target.host, port, user, region), sign)
