"""The standard library's own `ssl.SSLContext` class, whatever has replaced the name since.

``truststore.inject_into_ssl()``, gevent's ``patch_ssl`` and the like rebind ``ssl.SSLContext``
to a class of their own, which may trust more than the anchors loaded into it (truststore adds
the OS store). Every context safepg builds comes from the class found here, so that it trusts
exactly the anchors safepg names, whether safepg is imported before or after such a patch.
"""

from __future__ import annotations

import _ssl
import ssl
from typing import TYPE_CHECKING

__all__ = ["Context", "SSLContext", "client_context"]


def _find() -> type[ssl.SSLContext]:
    """The class the ``ssl`` module defined over ``_ssl._SSLContext``.

    Not the name ``ssl.SSLContext`` itself, which a patch rebinds: the class of that name that
    derives directly from the C class. First along the bound class's MRO (truststore's and
    gevent's classes derive from the original), else the only such subclass of the C class.

    Raises:
        ImportError: none, or several and none on the MRO (a Python built otherwise).
    """

    def original(cls: type) -> bool:
        return (
            _ssl._SSLContext in cls.__bases__
            and cls.__module__ == "ssl"
            and cls.__qualname__ == "SSLContext"
        )

    found: list[type] = [cls for cls in ssl.SSLContext.__mro__ if original(cls)][:1]
    found = found or [cls for cls in _ssl._SSLContext.__subclasses__() if original(cls)]
    if len(found) != 1:  # pragma: no cover - another interpreter, or the ssl module reloaded
        raise ImportError(
            "safepg cannot find the standard library's ssl.SSLContext class (found "
            f"{len(found)} candidates); it never builds a context from a replaced class"
        )
    return found[0]  # the ssl module's own SSLContext, by original()


if TYPE_CHECKING:
    SSLContext = ssl.SSLContext
else:
    SSLContext = _find()


# ssl.py's setters for these call ``super(SSLContext, SSLContext)``, looking the name up in the
# ``ssl`` module when they run: once a patch has rebound it they recurse without end
# (truststore), or set the attribute through the patch's class. These go to the C descriptor.
_C_SETTERS = ("verify_mode", "verify_flags", "options", "minimum_version", "maximum_version")


def _through_c(name: str) -> property:
    getter = SSLContext.__dict__[name].fget  # ssl.py's, which returns the enum
    descriptor = _ssl._SSLContext.__dict__[name]

    def setter(self: ssl.SSLContext, value: object) -> None:
        descriptor.__set__(self, value)

    return property(getter, setter, doc=SSLContext.__dict__[name].__doc__)


class Context(SSLContext):
    """The standard library's client context, usable whatever has replaced ``ssl.SSLContext``.

    Its settings are set through the C class (see ``_C_SETTERS``), and it passes the checks
    ``isinstance(ctx, ssl.SSLContext)`` that asyncio's ``start_tls`` and asyncpg make against
    the name as it is bound when they run: after truststore's patch asyncio would refuse a
    standard context, and asyncpg would take it for no TLS at all.
    """

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        # isinstance() consults __class__ when the real type does not match. Only a
        # replacement that derives from the standard class is claimed: it is a context.
        current = ssl.SSLContext
        if current is not SSLContext and issubclass(current, SSLContext):
            return current
        return type(self)


for _name in _C_SETTERS:
    if _name in SSLContext.__dict__:
        setattr(Context, _name, _through_c(_name))


def client_context() -> ssl.SSLContext:
    """A new client context of the standard library's class (``PROTOCOL_TLS_CLIENT``: the chain
    and the host name are checked, with no trust anchors until some are loaded)."""
    return Context(ssl.PROTOCOL_TLS_CLIENT)
