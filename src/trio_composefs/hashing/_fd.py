"""The one fd hasher: the fs-verity digest of an open file, in the calling thread.

Blocking (layer L1). Light on purpose (``os`` and the pure hasher only), so the
repository can use it without importing the pool's threads and subprocesses.
"""

from __future__ import annotations

import os

from ..formats._fsverity import Algorithm, Digest, FsVerityHasher
from ._worker import READ_SIZE, pread_exactly

__all__ = ["digest_fd"]


def digest_fd(fd: int, size: int | None, algorithm: Algorithm = Algorithm.SHA256) -> Digest:
    """fs-verity digest of the first ``size`` bytes of ``fd`` (``None``: the whole file,
    its size taken with ``fstat``), in the calling thread.

    Reads with :func:`os.preadv`, so the file offset is left alone and ``fd``
    may be shared. Blocking.

    Raises:
        ComposefsError: the file has fewer than ``size`` bytes.
        OSError: ``fd`` cannot be read.
    """
    if size is None:
        size = os.fstat(fd).st_size
    if size < 0:
        raise ValueError(f"negative file size {size}")
    hasher = FsVerityHasher(algorithm)
    buf = memoryview(bytearray(min(size, READ_SIZE)))
    offset = 0
    while offset < size:
        chunk = buf[: min(len(buf), size - offset)]
        pread_exactly(fd, chunk, offset)
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.digest()
