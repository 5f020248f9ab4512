"""`ssl_context`: a verify-full `ssl.SSLContext` with safepg's trust anchors, for other drivers.

asyncpg, aiohttp-style clients and anything else that takes an ``ssl.SSLContext`` get the trust
anchors `safepg.connect` would use (see `_trust`), and TLS settings that admit nothing less than
verify-full.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import weakref
from os import PathLike

from . import _options, _stdssl, _trust
from ._errors import ConfigurationError
from ._params import _HOST, _idna_ok, _is_socket
from ._trust import TrustSource

__all__ = ["ssl_context"]

logger = logging.getLogger("safepg")

# (trust file path, its inode/size/mtime, TLS 1.3 only, SHA-256 of the CRLs checked or "") -> a
# sealed context made from it. Only the connect paths of safepg use these; callers of ssl_context
# always get a context of their own.
_contexts: dict[tuple[str, tuple[int, int, int], bool, str], ssl.SSLContext] = {}
# Methods that change a context: loading CAs, keys or paths, and every set_* (ciphers, ALPN,
# callbacks, PSK callbacks that would skip the certificate), the private C ones too
# (_set_alpn_protocols).
_CHANGING = ("load_", "set_", "_set_")


# The sealed contexts: by identity, outside them; a context leaves when it is collected.
_SEALED: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()


class SealedContext(_stdssl.Context):
    """A context that refuses every change once sealed: shared by safepg's connections.

    asyncpg hands the context to whoever holds a connection
    (``conn._transport.get_extra_info("sslcontext")``); a shared, mutable one could be given a
    rogue CA, or lose its host name check, for every later connection. Making a context per
    connection instead would cost milliseconds (OpenSSL 3 decodes a 100-root bundle in about
    20 ms), so the shared one is sealed: setting any attribute (``check_hostname``,
    ``verify_mode``, ``keylog_filename``, ...) or calling a ``load_*``/``set_*`` method raises.
    """

    def seal(self) -> None:
        """Refuse every change from now on. The mark is kept outside the context (not in its
        ``__dict__``, which anyone holding it could clear)."""
        _SEALED.add(self)

    def _refuse(self, name: str) -> AttributeError:
        return AttributeError(
            f"this ssl.SSLContext is shared by safepg's connections and cannot be changed "
            f"({name}): it would change every later connection. safepg.ssl_context() returns "
            "a context of your own."
        )

    def __setattr__(self, name: str, value: object) -> None:
        if self in _SEALED:
            raise self._refuse(name)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if self in _SEALED:
            raise self._refuse(name)
        super().__delattr__(name)

    def __getattribute__(self, name: str) -> object:
        if name.startswith(_CHANGING) and self in _SEALED:
            raise object.__getattribute__(self, "_refuse")(name)
        return super().__getattribute__(name)


def trust_for(host: str | None, sslrootcert: str | PathLike[str] | None) -> TrustSource:
    """The trust anchors for *host*, resolved as `safepg.connect` resolves them.

    Raises:
        ConfigurationError: *host* is not a TCP host name, or a CA file named is unusable.
    """
    hosts = []
    if host is not None:
        if not isinstance(host, str) or _is_socket(host):
            raise ConfigurationError(
                "ssl_context(host=...) takes the DNS name or IP address the server's "
                "certificate holds; a Unix-domain socket has no TLS, and no host name to verify."
            )
        if not (_HOST.fullmatch(host) and _idna_ok(host)):
            raise ConfigurationError(
                "ssl_context(host=...) is not a host name: it holds characters no host name or "
                "IP address has, an empty label or a label over 63 characters."
            )
        hosts.append(host)
    if sslrootcert is not None:
        rootcert: str | None = os.fspath(sslrootcert)
        return _trust.resolve(rootcert or None, "the sslrootcert argument", hosts)
    env = os.environ.get("PGSSLROOTCERT") or None
    return _trust.resolve(
        env, "the PGSSLROOTCERT environment variable", hosts, from_env=env is not None
    )


def new_context(
    trust: TrustSource, *, tls13: bool = False, sealed: bool = False, crl: bytes = b""
) -> ssl.SSLContext:
    """A new client context that verifies the chain against *trust* and the host name; with
    *sealed*, a `SealedContext` that refuses every change; with *crl* (PEM CRLs checked by
    `_options.read_crl`), one that refuses a certificate they revoke, as libpq's ``sslcrl`` does.

    Raises:
        ConfigurationError: OpenSSL cannot load *trust*'s file, or the CRLs.
    """
    # The standard library's class, never what truststore or gevent put in ssl.SSLContext's
    # place: theirs may trust the OS store on top of the anchors loaded here.
    ctx = (SealedContext if sealed else _stdssl.Context)(ssl.PROTOCOL_TLS_CLIENT)
    # verify-full: the chain must lead to the trust anchors, and the certificate must name the
    # host dialled. PROTOCOL_TLS_CLIENT sets both already; said here so nobody wonders.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    # TLS 1.0 and 1.1 are deprecated (RFC 8996), as for libpq (ssl_min_protocol_version).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls13 else ssl.TLSVersion.TLSv1_2
    if ssl.HAS_ALPN:
        # PostgreSQL 17+ takes direct TLS only with this ALPN; libpq 17+ always sends it.
        ctx.set_alpn_protocols(["postgresql"])
    try:
        ctx.load_verify_locations(cafile=trust.path)
    except (OSError, ssl.SSLError) as ex:
        raise ConfigurationError(
            f"OpenSSL could not load the trust anchors {trust}: {ex}. Fix the file, or name "
            "another with sslrootcert."
        ) from None
    if crl:
        _load_crl(ctx, crl)
    if isinstance(ctx, SealedContext):
        ctx.seal()
    return ctx


def _load_crl(ctx: ssl.SSLContext, crl: bytes) -> None:
    """Load *crl* (checked: CRLs only) and check every certificate of the chain against it,
    as libpq does (``X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL``)."""
    # Python loads CRLs from a file only: the checked bytes, in a private directory.
    with tempfile.TemporaryDirectory(prefix="safepg-crl-") as private:
        path = os.path.join(private, "crl.pem")
        with open(path, "wb") as f:
            f.write(crl)
        try:
            ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as ex:
            raise ConfigurationError(
                f"OpenSSL could not load the certificate revocation list (sslcrl): {ex}"
            ) from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def cached_context(trust: TrustSource, *, tls13: bool = False, crl: bytes = b"") -> ssl.SSLContext:
    """A sealed `new_context`, made once per version of *trust*'s file (and of the CRLs):
    loading a bundle of 100-150 roots costs about 20 ms. A file changed on disk (new inode,
    size or mtime) gets a new one. For safepg's own connect paths: shared by their
    connections, so sealed."""
    crl_key = hashlib.sha256(crl).hexdigest() if crl else ""
    try:
        key = (trust.path, _trust.stat_key(os.stat(trust.path)), tls13, crl_key)
    except OSError:
        return new_context(trust, tls13=tls13, sealed=True, crl=crl)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _contexts[key] = new_context(trust, tls13=tls13, sealed=True, crl=crl)
    return ctx


def load_client_cert(
    ctx: ssl.SSLContext,
    sslcert: str | PathLike[str] | None,
    sslkey: str | PathLike[str] | None,
    sslpassword: str | None,
) -> None:
    """Load a client certificate into *ctx* (a context of the caller's own).

    Raises:
        ConfigurationError: *sslkey* without *sslcert*, or the files cannot be loaded.
    """
    if sslcert is None:
        if sslkey is not None:
            raise ConfigurationError("sslkey was given without sslcert; give both, or neither")
        return
    try:
        ctx.load_cert_chain(sslcert, sslkey, sslpassword)
    except (OSError, ssl.SSLError) as ex:
        # The password is not in OpenSSL's text; the paths are the caller's own.
        reason = ex.strerror if isinstance(ex, OSError) and ex.strerror else str(ex)
        raise ConfigurationError(
            f"could not load the client certificate {os.fspath(sslcert)!r}"
            + (f" with the key {os.fspath(sslkey)!r}" if sslkey is not None else "")
            + f": {reason}. Check the paths, that the key matches the certificate, and "
            "sslpassword if the key is encrypted."
        ) from None


def ssl_context(
    host: str | None = None,
    *,
    sslrootcert: str | PathLike[str] | None = None,
    sslcert: str | PathLike[str] | None = None,
    sslkey: str | PathLike[str] | None = None,
    sslpassword: str | None = None,
    sslcrl: str | PathLike[str] | None = None,
) -> ssl.SSLContext:
    """Return a new `ssl.SSLContext` that verifies a PostgreSQL server as verify-full does.

    For drivers and tools that take an ``ssl.SSLContext`` (asyncpg, pg8000, aiopg through
    psycopg2, your own sockets). The context checks the host name and the chain, requires TLS
    1.2 or later, and trusts the anchors `safepg.connect` would use for *host*: *sslrootcert*
    (``"system"`` is the OS store), else ``PGSSLROOTCERT``, else ``~/.postgresql/root.crt``,
    else a bundled provider set chosen by the host name (Amazon RDS, Azure, Supabase), else the
    OS store, else certifi. Certificates revoked by *sslcrl* (else ``PGSSLCRL``, else
    ``~/.postgresql/root.crl``, as libpq) are refused. Each call returns a new context, which
    you may change; safepg's own connects share cached ones.

    Args:
        host: the server's host name, which chooses a provider's CA set. None: no provider.
        sslrootcert: a PEM file of trust anchors, or ``"system"``.
        sslcert, sslkey, sslpassword: a client certificate, its key and the key's password.
        sslcrl: a PEM file of certificate revocation lists (CRLs only).

    Raises:
        ConfigurationError: *host* is not a TCP host name; a CA, CRL or client certificate
            file is missing, empty, unreadable or not PEM; a CRL file holds a certificate;
            ``PGSSLCRLDIR`` is set (a CRL directory is not supported here).
    """
    trust = trust_for(host, sslrootcert)
    if os.environ.get("PGSSLCRLDIR"):
        raise ConfigurationError(
            "PGSSLCRLDIR is set, and ssl_context cannot check a CRL directory as libpq does: "
            "put the CRLs in one file and pass it as sslcrl= (or PGSSLCRL)."
        )
    if sslcrl is not None:
        crl = _options.crls(os.fspath(sslcrl), "the sslcrl argument")
    else:
        env = os.environ.get("PGSSLCRL") or None
        crl = _options.crls(env, "the PGSSLCRL environment variable")
    ctx = new_context(trust, crl=crl)
    if crl:
        _remember_crls(ctx, crl)
    load_client_cert(ctx, sslcert, sslkey, sslpassword)
    logger.debug("safepg: ssl_context for %s trusts %s", host or "any host", trust)
    return ctx


# id(context) -> (the context, SHA-256 of the CRLs ssl_context loaded into it). By identity:
# a caller's object cannot pass for one by its __eq__, nor by an attribute it sets.
_LOADED_CRLS: dict[int, tuple[weakref.ref[ssl.SSLContext], str]] = {}


def _remember_crls(ctx: ssl.SSLContext, crl: bytes) -> None:
    key = id(ctx)
    _LOADED_CRLS[key] = (
        weakref.ref(ctx, lambda _ref: _LOADED_CRLS.pop(key, None)),
        hashlib.sha256(crl).hexdigest(),
    )


def checks_crls(ctx: ssl.SSLContext, crl: bytes) -> bool:
    """Whether *ctx* checks exactly *crl* (PEM CRLs checked by `_options.read_crl`): made by
    `ssl_context` with these CRLs, and still checking the whole chain against them."""
    entry = _LOADED_CRLS.get(id(ctx))
    return (
        entry is not None
        and entry[0]() is ctx
        and entry[1] == hashlib.sha256(crl).hexdigest()
        and ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN == ssl.VERIFY_CRL_CHECK_CHAIN
    )
