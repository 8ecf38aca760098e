"""Serving composefs images with FUSE, verifying every object as it is read (layer L2).

A read-only FUSE server, run by pyfuse3 in a task of the caller's trio run, that shows
what the kernel mount of the same EROFS image shows (the same bytes, decoded by our
EROFS reader) and checks each object against its fs-verity digest: on first open
(hashed by a :class:`~trio_composefs.hashing.HashPool`, off the event loop), then
every read of a large object against the level-1 digests of that first hash. A
corrupt object gives EIO for its files and one log line (``trio_composefs.fuse``
logger); where the kernel's fs-verity covers an object (a secure repository), the
kernel checks it instead.

Needs the optional ``pyfuse3`` (``pip install 'trio-composefs[fuse]'``, which builds
against libfuse3: ``apt-get install fuse3 libfuse3-dev``). This ``__init__`` is lazy, so
``import trio_composefs.fuse`` works without it; :func:`fuse_available` says whether it
is there, and using a name raises :class:`~trio_composefs.FuseUnavailableError`, whose
message says how to install it.

* :func:`mounted_fuse`: a repository's image for an ``async with`` block.
* :func:`serve_image`: the same for EROFS bytes and an :class:`ObjectOpener`
  (:class:`DirectoryObjects` for a plain objects directory).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .. import _lazy
from .._errors import FuseUnavailableError

if TYPE_CHECKING:
    from ._api import FuseMount as FuseMount
    from ._api import FuseStatistics as FuseStatistics
    from ._api import mounted_fuse as mounted_fuse
    from ._api import serve_image as serve_image
    from ._objects import DirectoryObjects as DirectoryObjects
    from ._objects import ObjectOpener as ObjectOpener
    from ._objects import OpenedObject as OpenedObject
    from ._objects import RepositoryObjects as RepositoryObjects
    from ._verify import VerifierStatistics as VerifierStatistics

_LAZY: dict[str, str] = {
    "FuseMount": "._api",
    "FuseStatistics": "._api",
    "mounted_fuse": "._api",
    "serve_image": "._api",
    "DirectoryObjects": "._objects",
    "ObjectOpener": "._objects",
    "OpenedObject": "._objects",
    "RepositoryObjects": "._objects",
    "VerifierStatistics": "._verify",
}

__all__ = [
    "INSTALL_HINT",
    "DirectoryObjects",
    "FuseMount",
    "FuseStatistics",
    "ObjectOpener",
    "OpenedObject",
    "RepositoryObjects",
    "VerifierStatistics",
    "fuse_available",
    "mounted_fuse",
    "require_fuse",
    "serve_image",
]

INSTALL_HINT = (
    "FUSE mounts need pyfuse3: install libfuse3 (Debian: apt-get install fuse3 libfuse3-dev),"
    " then pip install 'trio-composefs[fuse]'"
)


def fuse_available() -> bool:
    """Whether ``pyfuse3`` (and the libfuse3 it links) can be imported."""
    try:
        importlib.import_module("pyfuse3")
    except ImportError:
        return False
    return True


def require_fuse() -> None:
    """Raise :class:`FuseUnavailableError` (with :data:`INSTALL_HINT`) without ``pyfuse3``."""
    if not fuse_available():
        raise FuseUnavailableError(INSTALL_HINT)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        require_fuse()
    return _lazy.load(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return _lazy.names(__name__, __all__)
