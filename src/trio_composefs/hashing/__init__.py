"""Computing fs-verity digests of files (layer L1: blocking I/O, never trio).

``HashPool`` spreads large files over worker processes (``_worker``, started as
``python -P -m trio_composefs.hashing._worker``); ``digest_fd`` hashes one open file.

This package's ``__init__`` is lazy (PEP 562), like the root's: a worker process imports
``trio_composefs.hashing._worker`` and must not pay for the pool's imports (threads,
subprocess, ``concurrent.futures``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _lazy

if TYPE_CHECKING:
    from ._fd import digest_fd as digest_fd
    from ._pool import HashPool as HashPool
    from ._pool import HashPoolStatistics as HashPoolStatistics

_LAZY: dict[str, str] = {
    "HashPool": "._pool",
    "HashPoolStatistics": "._pool",
    "digest_fd": "._fd",
}

__all__ = ["HashPool", "HashPoolStatistics", "digest_fd"]


def __getattr__(name: str) -> object:
    return _lazy.load(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return _lazy.names(__name__, __all__)
