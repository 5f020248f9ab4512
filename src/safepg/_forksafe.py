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

# object -> the function that resets it, called with it. A plain function of the class, never
# a bound method: that would hold the object and keep it alive for ever.
_RESETS: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()


def reset_in_child(owner: T, reset: Callable[[T], None]) -> None:
    """Call ``reset(owner)`` in every child forked from now on, for as long as *owner* lives."""
    _RESETS[owner] = reset


def _after_fork_in_child() -> None:
    for owner, reset in list(_RESETS.items()):
        reset(owner)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
