"""State that a child of ``fork()`` starts afresh: locks, and objects shared with the parent.

A child has only the thread that forked. A lock another thread held at that moment stays held
in the child for ever, and an SDK's connection pool would share its sockets with the parent.
Objects register a reset here (held weakly: a registration ends with its object); each runs in
the child, before anything else, while the child has one thread.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["reset_in_child"]

T = TypeVar("T")

# id(object) -> (a weak reference to it, the function that resets it). By identity, not by
# hash: a subclass may define __eq__ without __hash__. The function is a plain one of the
# class, never a bound method, which would keep the object alive for ever.
_RESETS: dict[int, tuple[weakref.ref[Any], Callable[[Any], None]]] = {}


def reset_in_child(owner: T, reset: Callable[[T], None]) -> None:
    """Call ``reset(owner)`` in every child forked from now on, for as long as *owner* lives."""
    key = id(owner)

    def gone(_ref: object) -> None:  # called as *owner* is freed, before its id can be reused
        _RESETS.pop(key, None)

    _RESETS[key] = (weakref.ref(owner, gone), reset)


def _after_fork_in_child() -> None:
    for ref, reset in list(_RESETS.values()):
        owner = ref()
        if owner is not None:
            reset(owner)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
