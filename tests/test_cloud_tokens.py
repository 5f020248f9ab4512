"""safepg.aws, safepg.azure, safepg.gcp: tokens made offline, reused within their lifetime.

AWS tokens are real: botocore signs them locally with static test credentials (no network).
Azure and Google credentials are passed in (the SDKs' own credential interface), with a clock,
so that expiry is tested without waiting. The end-to-end tests give a real role the token as
its password, so the whole token reaches the server through libpq.
"""

from __future__ import annotations

import datetime
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import pytest

import safepg
import safepg.aws
import safepg.azure
import safepg.gcp
from safepg import ConfigurationError, ConnectTarget, TokenRejectedError
from safepg.providers import aws_region
from safepg.testing import PostgresServer

from .test_password_callable import all_text, conninfo, current_user, role, set_password

__all__ = ["role"]  # the fixture, shared

RDS_HOST = "mydb.abc123xyz.eu-central-1.rds.amazonaws.com"
AKID = "AKIDEXAMPLE1234567890"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- AWS ---------------------------------------------------------------------------------------

botocore_session = pytest.importorskip("botocore.session")


@pytest.fixture
def aws_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS configuration at all, and no instance metadata lookups (no network)."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def session(aws_offline: None) -> Any:
    sess = botocore_session.Session()
    sess.set_credentials(AKID, SECRET_KEY)
    return sess


def query(token: str) -> dict[str, str]:
    parts = urlsplit("https://" + token)
    return {k: v[0] for k, v in parse_qs(parts.query).items()} | {"netloc": parts.netloc}


def test_aws_token_shape(session: Any) -> None:
    auth = safepg.aws.IAMAuth(session=session)
    token = auth(ConnectTarget(RDS_HOST, 5432, "app_iam", "app"))
    assert token.startswith(f"{RDS_HOST}:5432/?")
    q = query(token)
    assert q["Action"] == "connect"
    assert q["DBUser"] == "app_iam"
    assert q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert q["X-Amz-Expires"] == "900"
    assert q["X-Amz-Credential"].startswith(f"{AKID}/")
    assert q["X-Amz-Credential"].endswith("/eu-central-1/rds-db/aws4_request")
    assert SECRET_KEY not in token
    # The same through iam_token, with an explicit region and port.
    other = safepg.aws.iam_token("db.internal", 6432, "bob", "us-west-2", session=session)
    assert other.startswith("db.internal:6432/?")
    assert query(other)["X-Amz-Credential"].endswith("/us-west-2/rds-db/aws4_request")


def test_aws_tokens_are_reused_within_their_lifetime(session: Any) -> None:
    clock = Clock()
    auth = safepg.aws.IAMAuth(session=session, clock=clock, margin=300)
    target = ConnectTarget(RDS_HOST, 5432, "app_iam", "app")
    first = auth(target)
    # New credentials from now on: a token signed again shows them.
    session.get_credentials().access_key = "AKIDROTATED000000000"
    clock.now += 599
    assert auth(target) == first
    # Another user, port or region is another token.
    assert query(auth(ConnectTarget(RDS_HOST, 5432, "bob", "app")))["DBUser"] == "bob"
    assert auth(ConnectTarget(RDS_HOST, 5433, "app_iam", "app")).startswith(f"{RDS_HOST}:5433/")
    clock.now += 1  # 15 minutes minus the margin: expired for safepg, replaced
    renewed = auth(target)
    assert renewed != first
    assert query(renewed)["X-Amz-Credential"].startswith("AKIDROTATED000000000/")
    assert auth(target) == renewed


def test_aws_token_lifetime_counts_time_asleep() -> None:
    """``time.monotonic`` stops while a laptop sleeps: a token cached before a suspend of an
    hour would still look fresh after it. The default clock keeps counting."""
    import time

    from safepg._tokens import elapsed_clock

    auth = safepg.aws.IAMAuth(region="us-east-1")
    assert auth._clock is elapsed_clock
    if hasattr(time, "CLOCK_BOOTTIME"):
        boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        assert boot <= elapsed_clock() <= time.clock_gettime(time.CLOCK_BOOTTIME)


def test_aws_refuses_a_multi_host_target(session: Any) -> None:
    # Signed for the first host, the token would go to the next host too, which could replay
    # it against the first.
    auth = safepg.aws.IAMAuth(session=session)
    with pytest.raises(ConfigurationError, match="signs a token for one host"):
        auth(ConnectTarget(RDS_HOST, 5432, "app_iam", "app", (RDS_HOST, "other.example.com")))
    assert auth(ConnectTarget(RDS_HOST, 5432, "app_iam", "app", (RDS_HOST,)))


def test_aws_region_and_overrides(session: Any) -> None:
    assert aws_region(RDS_HOST) == "eu-central-1"
    assert aws_region("x.proxy-abc.us-east-1.rds.amazonaws.com") == "us-east-1"
    assert aws_region("db.abc.rds.cn-north-1.amazonaws.com.cn") == "cn-north-1"
    assert aws_region("db.example.com") is None
    auth = safepg.aws.IAMAuth("ap-south-1", port=5432, user="iam", session=session)
    token = auth(ConnectTarget("127.0.0.1", 15432, "someone", "app"))
    assert token.startswith("127.0.0.1:5432/?")
    assert query(token)["DBUser"] == "iam"
    assert "/ap-south-1/" in query(token)["X-Amz-Credential"]
    with pytest.raises(ConfigurationError, match="no AWS region"):
        safepg.aws.IAMAuth(session=session)(ConnectTarget("db.example.com", 5432, "u", "d"))
    with pytest.raises(ConfigurationError, match="not both"):
        safepg.aws.IAMAuth(session=session, profile="x")
    with pytest.raises(ConfigurationError, match="margin"):
        safepg.aws.IAMAuth(margin=900)
    assert SECRET_KEY not in repr(auth)
    assert AKID not in repr(auth)


def test_aws_without_credentials_says_what_to_do(
    aws_offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = safepg.aws.IAMAuth()
    with pytest.raises(ConfigurationError, match="Unable to locate credentials") as info:
        auth(ConnectTarget(RDS_HOST, 5432, "app_iam", "app"))
    assert "aws sts get-caller-identity" in str(info.value)
    # The environment's credentials, as the AWS CLI would use them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AKID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    token = safepg.aws.IAMAuth()(ConnectTarget(RDS_HOST, 5432, "app_iam", "app"))
    assert query(token)["X-Amz-Credential"].startswith(f"{AKID}/")


@pytest.mark.parametrize("host", [RDS_HOST, "db.example.internal"])
def test_aws_missing_profile_is_a_configuration_error(aws_offline: None, host: str) -> None:
    # botocore reads the profile when the region is looked up (a host that names none) or when
    # the client is made (an RDS host name gives the region): either way a ConfigurationError
    # that names the profile, not botocore's ProfileNotFound.
    auth = safepg.aws.IAMAuth(profile="missing")
    with pytest.raises(ConfigurationError, match=r"profile \(missing\) could not be found"):
        auth(ConnectTarget(host, 5432, "app_iam", "app"))
    with pytest.raises(ConfigurationError, match="AWS_PROFILE"):
        safepg.aws.iam_token(host, 5432, "app_iam", profile="missing")


def test_aws_token_reaches_the_server(server: PostgresServer, role: str, session: Any) -> None:
    auth = safepg.aws.IAMAuth("eu-central-1", session=session)
    tokens: list[str] = []

    def as_role_password(target: ConnectTarget) -> str:
        # The server here checks a password, not IAM: make the token the role's password.
        token = auth(target)
        set_password(server, role, token)
        tokens.append(token)
        return token

    with safepg.connect(conninfo(server, role), password=as_role_password) as conn:
        assert current_user(conn) == role
    assert tokens[0].startswith(f"{server.host}:{server.port}/?")
    assert query(tokens[0])["DBUser"] == role


def test_aws_rejected_token_hints_at_rds_iam(
    server: PostgresServer, role: str, session: Any
) -> None:
    auth = safepg.aws.IAMAuth("eu-central-1", session=session)
    set_password(server, role, "not-a-token-" + secrets.token_hex(8))
    with pytest.raises(TokenRejectedError, match="rds_iam") as info:
        safepg.connect(conninfo(server, role), password=auth)
    token = auth(ConnectTarget(server.host, server.port, role, server.dbname))  # the cached one
    assert token not in all_text(info.value)
    assert query(token)["X-Amz-Signature"] not in all_text(info.value)


# -- Azure -------------------------------------------------------------------------------------


class AccessToken(NamedTuple):  # azure.core.credentials.AccessToken's shape
    token: str
    expires_on: int


class FakeAzureCredential:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.scopes: list[str] = []

    def get_token(self, *scopes: str) -> AccessToken:
        self.scopes.extend(scopes)
        return AccessToken(
            f"entra-{len(self.scopes)}-" + secrets.token_hex(8), int(self.clock() + 3600)
        )


def test_azure_tokens_are_reused_until_expiry_minus_margin() -> None:
    clock = Clock(1_700_000_000)
    credential = FakeAzureCredential(clock)
    auth = safepg.azure.EntraAuth(credential, margin=300, clock=clock)
    target = ConnectTarget("srv.postgres.database.azure.com", 5432, "app@contoso.com", "app")
    first = auth(target)
    assert first.startswith("entra-1-")
    assert credential.scopes == ["https://ossrdbms-aad.database.windows.net/.default"]
    clock.now += 3299
    assert auth(target) == first
    clock.now += 1
    assert auth(target).startswith("entra-2-")
    assert "entra" not in repr(auth)


def test_azure_credential_errors_say_what_to_do() -> None:
    azure_exceptions = pytest.importorskip("azure.core.exceptions")

    class NoCredential:
        def get_token(self, *scopes: str) -> AccessToken:
            raise azure_exceptions.ClientAuthenticationError("DefaultAzureCredential failed")

    with pytest.raises(ConfigurationError, match="az login"):
        safepg.azure.EntraAuth(NoCredential(), hosts=["h"])(ConnectTarget("h", 5432, "u", "d"))


def test_azure_tokens_go_only_to_azure_names_unless_told(server: PostgresServer, role: str) -> None:
    # An Entra token is accepted by every Azure server that trusts the identity: a verified
    # server elsewhere that received it could replay it there.
    credential = FakeAzureCredential(Clock())
    auth = safepg.azure.EntraAuth(credential, clock=Clock())
    for host in ("srv.postgres.database.azure.com", "SRV.Postgres.Database.Azure.com."):
        assert auth(ConnectTarget(host, 5432, "u", "d")).startswith("entra-")
    for host in ("postgres.database.azure.com", "evil-postgres.database.azure.com.attacker.io"):
        with pytest.raises(ConfigurationError, match="hosts="):
            auth(ConnectTarget(host, 5432, "u", "d"))
    calls = len(credential.scopes)
    with pytest.raises(ConfigurationError, match=r"EntraAuth\(hosts=\['127.0.0.1'\]\)"):
        safepg.connect(conninfo(server, role), password=auth)
    assert len(credential.scopes) == calls  # no token was even asked for
    custom = safepg.azure.EntraAuth(credential, hosts=["db.example.com", "*.corp.example"])
    assert custom(ConnectTarget("a.corp.example", 5432, "u", "d"))
    with pytest.raises(ConfigurationError):
        custom(ConnectTarget("corp.example", 5432, "u", "d"))


def test_every_host_of_a_multi_host_target_is_checked(
    server: PostgresServer, role: str, closed_port: int
) -> None:
    # libpq sends the same password to the next host when one fails: a listed first host that
    # is down must not let the token go to an unlisted second one.
    credential = FakeAzureCredential(Clock())
    auth = safepg.azure.EntraAuth(credential, clock=Clock(), hosts=["127.0.0.2"])
    set_password(server, role, auth(ConnectTarget("127.0.0.2", 1, "any", "any")))
    calls = len(credential.scopes)
    multi = (
        f"host=127.0.0.2,{server.host} port={closed_port},{server.port} user={role} "
        f"dbname={server.dbname} sslrootcert={server.ca_path}"
    )
    with pytest.raises(ConfigurationError, match=f"did not send a token to '{server.host}'"):
        safepg.connect(multi, password=auth)
    assert len(credential.scopes) == calls
    gcp = safepg.gcp.IAMAuth(object(), request=object(), hosts=["127.0.0.2"])
    with pytest.raises(ConfigurationError, match="did not send a token"):
        safepg.connect(multi, password=gcp)
    target = ConnectTarget("a", 1, "u", "d", ("a", "b"))
    assert target.all_hosts == ("a", "b")
    assert ConnectTarget("a", 1, "u", "d").all_hosts == ("a",)


@pytest.mark.parametrize(
    "hosts", ["db.example.com", [], ["*"], ["*.a.*"], ["a b"], [""], ["u@h"], [b"h"], ["h\n"]]
)
def test_token_host_lists_are_checked(hosts: Any) -> None:
    with pytest.raises(ConfigurationError, match="hosts"):
        safepg.azure.EntraAuth(object(), hosts=hosts)
    with pytest.raises(ConfigurationError, match="hosts"):
        safepg.gcp.IAMAuth(object(), hosts=hosts)


def test_azure_token_reaches_the_server(server: PostgresServer, role: str) -> None:
    auth = safepg.azure.EntraAuth(FakeAzureCredential(Clock()), clock=Clock(), hosts=["127.0.0.1"])
    set_password(server, role, auth(ConnectTarget("127.0.0.1", 1, "any", "any")))  # cached
    with safepg.connect(conninfo(server, role), password=auth) as conn:
        assert current_user(conn) == role
    set_password(server, role, "changed-" + secrets.token_hex(8))
    with pytest.raises(TokenRejectedError, match="Entra"):
        safepg.connect(conninfo(server, role), password=auth)


# -- Google Cloud ------------------------------------------------------------------------------


class FakeGoogleCredentials:
    """google.auth.credentials.Credentials' interface: token, expiry, valid, refresh."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None
        self.refreshed = 0

    @property
    def valid(self) -> bool:
        return self.token is not None and (self.expiry is None or self.clock() < self.expiry)

    def refresh(self, request: object) -> None:
        self.refreshed += 1
        self.token = f"ya29.fake-{self.refreshed}-" + secrets.token_hex(8)
        self.expiry = self.clock() + datetime.timedelta(hours=1)


class UTCClock:
    def __init__(self) -> None:
        self.now = datetime.datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self) -> datetime.datetime:
        return self.now


def test_gcp_tokens_are_refreshed_before_expiry() -> None:
    clock = UTCClock()
    creds = FakeGoogleCredentials(clock)
    auth = safepg.gcp.IAMAuth(creds, request=object(), margin=300, clock=clock)
    target = ConnectTarget("10.0.0.1", 5432, "sa@project.iam", "app")
    first = auth(target)
    assert first.startswith("ya29.fake-1-")
    clock.now += datetime.timedelta(minutes=54, seconds=59)
    assert auth(target) == first
    clock.now += datetime.timedelta(seconds=1)
    assert auth(target).startswith("ya29.fake-2-")
    assert creds.refreshed == 2
    assert "ya29" not in repr(auth)
    pinned = safepg.gcp.IAMAuth(creds, request=object(), clock=clock, hosts=["10.0.0.1", "::1"])
    assert pinned(target).startswith("ya29.fake-")
    with pytest.raises(ConfigurationError, match=r"did not send a token to '10\.0\.0\.2'"):
        pinned(ConnectTarget("10.0.0.2", 5432, "sa@project.iam", "app"))


def test_gcp_refresh_errors_say_what_to_do() -> None:
    oauth2 = pytest.importorskip("google.oauth2.credentials")
    # Real google-auth credentials that cannot refresh (no refresh token): no network used.
    creds = oauth2.Credentials(token=None)
    with pytest.raises(ConfigurationError, match="gcloud auth application-default login"):
        safepg.gcp.IAMAuth(creds, request=object())(ConnectTarget("h", 5432, "u", "d"))


def test_gcp_token_reaches_the_server(server: PostgresServer, role: str) -> None:
    clock = UTCClock()
    auth = safepg.gcp.IAMAuth(FakeGoogleCredentials(clock), request=object(), clock=clock)
    set_password(server, role, auth(ConnectTarget("any", 1, "any", "any")))
    with safepg.connect(conninfo(server, role), password=auth) as conn:
        assert current_user(conn) == role


# -- lazy imports ------------------------------------------------------------------------------


def test_sdks_are_imported_only_when_used() -> None:
    code = (
        "import sys, safepg, safepg.aws, safepg.azure, safepg.gcp\n"
        "loaded = [m for m in ('botocore', 'azure', 'google') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(safepg.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize(
    "name",
    [
        "my-project:europe-west1",  # two parts
        "my-project:europe west1:db",  # a bad region
        "my-project:europe-west1:d b",  # a bad instance
        "My Project!:europe-west1:db",  # a bad project
        "a:b:c:d:e",
        "",
        42,
    ],
)
def test_gcp_server_ca_refuses_a_malformed_connection_name(name: Any) -> None:
    # Refused before any credential or API is looked at: the name goes into the API's URL.
    with pytest.raises(ConfigurationError, match="takes the instance's connection name"):
        safepg.gcp.server_ca(name)


def test_gcp_server_ca_takes_a_well_formed_connection_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Past the name check: here it stops at the credentials (none), never at the name.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigurationError) as info:
        safepg.gcp.server_ca("my-project:europe-west1:db", timeout=5)
    assert "takes the instance's connection name" not in str(info.value)
