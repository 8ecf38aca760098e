"""PEP 562 helpers for the lazy package ``__init__`` files (the root, ``formats``, ``hashing``).

A lazy ``__init__`` lists its public names twice: under ``if TYPE_CHECKING:`` as ordinary
``from ._x import Y as Y`` lines (what type checkers and readers see) and in a ``_LAZY``
mapping from name to module (what :func:`load` imports on first use). A test checks that
the two lists, ``__all__`` and the modules agree.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping

__all__ = ["load", "names"]


def load(package: str, lazy: Mapping[str, str], name: str) -> object:
    """The value of ``package.name``: import its module (relative to ``package``), cache it."""
    try:
        module = lazy[name]
    except KeyError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, package), name)
    setattr(sys.modules[package], name, value)
    return value


def names(package: str, public: list[str]) -> list[str]:
    """``dir(package)``: what is already loaded plus every public name."""
    return sorted(set(vars(sys.modules[package])) | set(public))
