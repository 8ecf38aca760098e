"""Checking objects against the image's fs-verity digests: on first open, then every read (L2).

An object the kernel does not verify (no fs-verity on the filesystem) is checked
against the digest in the image's ``trusted.overlay.metacopy`` xattr, the fs-verity
digest (a Merkle tree of SHA-256 or SHA-512 over 4096-byte blocks, as ``fsverity
digest`` prints it):

* a small object (at most :data:`SMALL` bytes) is read whole at open, hashed, and the
  handle serves those very bytes: what is served is what was checked;
* a larger one is hashed at its first open by a
  :class:`~trio_composefs.hashing.HashPool` (split over its processes, from a worker
  thread, so the event loop keeps serving) into its *level-1 digests*, one per
  512 KiB group of data (256 KiB for SHA-512), from which the root digest is
  finished and compared. The level-1 digests are kept: every later read hashes the
  groups it touches (in a worker thread; the last group checked stays cached in the
  open file) and compares them, so a byte changed after the first open is caught
  too (:meth:`Verifier.check_group`). They cost 64 bytes per MiB of object.

Outcomes are remembered for the mount's lifetime, bounded: at most ``remember``
verified digests and ``remember_bytes`` of level-1 digests (least recently used
forgotten first; a forgotten object is hashed again on its next open), and at most
``remember`` refused ones. Concurrent first opens of one object wait for a single
hash. A mismatch is logged once per object (on the ``trio_composefs.fuse`` logger,
naming the object's path and the file's path), and every open of a file backed by
it, and every read of a file already open, fails with EIO.

The first byte of a large object waits for the whole object to be hashed once per
mount: a root digest is only known once every block is, and nothing stored beside
the object vouches for its level-1 digests.
"""

from __future__ import annotations

import collections
import logging
import time

import attrs
import trio

from .._errors import ComposefsError
from ..formats import Digest
from ..formats._fsverity import (
    digest_from_level1,
    fsverity_digest,
    level1_digests,
    level1_group_size,
)
from ..hashing import HashPool
from ..hashing._worker import pread_exactly

__all__ = ["Verifier", "VerifierStatistics"]

log = logging.getLogger("trio_composefs.fuse")

#: How many verified (and, separately, refused) digests a mount remembers by default.
DEFAULT_REMEMBER = 1 << 16
#: How many bytes of level-1 digests a mount keeps by default (1 TiB of objects).
DEFAULT_REMEMBER_BYTES = 64 << 20
#: Objects up to this size are read whole at open and served from memory.
SMALL = 64 << 10


@attrs.frozen
class VerifierStatistics:
    """A snapshot of a :class:`Verifier`'s work.

    Attributes:
        verified: objects hashed whole and found correct.
        refused: objects found corrupt (or unreadable), at open or at a read.
        kernel_verified: opens the kernel's fs-verity vouched for (no hashing).
        cached: opens answered from the remembered outcomes.
        groups_checked: level-1 groups hashed again for reads.
        bytes_hashed: bytes read and hashed (at opens and at reads).
        seconds_hashing: wall time spent in whole-object hashes (summed).
    """

    verified: int
    refused: int
    kernel_verified: int
    cached: int
    groups_checked: int
    bytes_hashed: int
    seconds_hashing: float


@attrs.define(eq=False)
class Verifier:
    """The per-mount record of which objects were checked, and the checking itself.

    Args:
        pool: the hash pool to use (the caller owns and closes it).
        limiter: the worker-thread limiter for the hashing threads: its own, not the
            readers', so that long hashes never hold the tokens reads need.
        remember: how many verified (and refused) digests to keep.
        remember_bytes: how many bytes of level-1 digests to keep.
    """

    pool: HashPool
    limiter: trio.CapacityLimiter
    remember: int = DEFAULT_REMEMBER
    remember_bytes: int = DEFAULT_REMEMBER_BYTES
    _good: collections.OrderedDict[Digest, bytes] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _good_bytes: int = attrs.field(init=False, default=0)
    _bad: collections.OrderedDict[Digest, None] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _pending: dict[Digest, trio.Event] = attrs.field(init=False, factory=dict)
    _counts: dict[str, float] = attrs.field(init=False, factory=dict)

    def statistics(self) -> VerifierStatistics:
        c = self._counts
        return VerifierStatistics(
            verified=int(c.get("verified", 0)),
            refused=int(c.get("refused", 0)),
            kernel_verified=int(c.get("kernel_verified", 0)),
            cached=int(c.get("cached", 0)),
            groups_checked=int(c.get("groups_checked", 0)),
            bytes_hashed=int(c.get("bytes_hashed", 0)),
            seconds_hashing=c.get("seconds_hashing", 0.0),
        )

    def _count(self, name: str, n: float = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + n

    def kernel_verified(self) -> None:
        """Record an open whose object the kernel's fs-verity checks."""
        self._count("kernel_verified")

    def _remember_good(self, digest: Digest, level1: bytes) -> None:
        old = self._good.pop(digest, None)
        if old is not None:
            self._good_bytes -= len(old)
        self._good[digest] = level1
        self._good_bytes += len(level1)
        while len(self._good) > self.remember or self._good_bytes > self.remember_bytes:
            _, dropped = self._good.popitem(last=False)
            self._good_bytes -= len(dropped)

    def refuse(self, digest: Digest, where: str, path: bytes, problem: str) -> None:
        """Record ``digest`` as corrupt and log it (once: a refused object is not hashed
        again while it is remembered)."""
        old = self._good.pop(digest, None)
        if old is not None:
            self._good_bytes -= len(old)
        self._count("refused")
        self._bad[digest] = None
        while len(self._bad) > self.remember:
            self._bad.popitem(last=False)
        log.error(
            "object %s is corrupt: the image wants fs-verity digest %s, %s;"
            " reads of %s fail with EIO",
            where,
            digest,
            problem,
            path.decode("utf-8", "backslashreplace"),
        )

    def is_refused(self, digest: Digest) -> bool:
        return digest in self._bad

    async def _once(self, digest: Digest) -> tuple[bool | None, bytes]:
        """Wait for a concurrent first check of ``digest``; its remembered outcome."""
        while True:
            if digest in self._good:
                self._good.move_to_end(digest)
                self._count("cached")
                return True, self._good[digest]
            if digest in self._bad:
                self._count("cached")
                return False, b""
            pending = self._pending.get(digest)
            if pending is None:
                return None, b""
            await pending.wait()

    def check_small(
        self, digest: Digest, read: tuple[bytes, Digest] | str, where: str, path: bytes
    ) -> bytes | None:
        """Judge a small object (``size`` <= :data:`SMALL`) that :func:`read_small` read
        and hashed (in the open's worker thread): its bytes, or ``None`` if corrupt.

        Small objects are hashed at every open, remembered or not: the handle serves
        the very bytes that were hashed.
        """
        if digest in self._bad:
            self._count("cached")
            return None
        if isinstance(read, str):
            self.refuse(digest, where, path, read)
            return None
        data, actual = read
        self._count("bytes_hashed", len(data))
        if actual != digest:
            self.refuse(digest, where, path, f"its fs-verity digest is {actual}")
            return None
        if digest in self._good:
            self._good.move_to_end(digest)
            self._count("cached")
        else:
            self._count("verified")
            self._remember_good(digest, b"")
        return data

    async def check_large(
        self, digest: Digest, fd: int, size: int, where: str, path: bytes
    ) -> bytes | None:
        """Hash a large object whole (once per mount): its level-1 digests, or ``None``
        if it is corrupt (or unreadable).

        Cancellation:
            The hash runs in a thread that is not abandoned (``fd`` must stay open
            until it is done); a cancelled first opener leaves the outcome unknown
            and the next open hashes again.
        """
        known, level1 = await self._once(digest)
        if known is not None:
            return level1 if known else None
        done = self._pending[digest] = trio.Event()
        try:
            start = time.monotonic()
            try:
                level1 = await trio.to_thread.run_sync(
                    self.pool.level1_fd, fd, size, digest.algorithm, limiter=self.limiter
                )
                actual = digest_from_level1(digest.algorithm, size, level1)
                problem = "" if actual == digest else f"its fs-verity digest is {actual}"
            except (OSError, ComposefsError) as e:
                problem = f"it cannot be read whole ({e})"
            finally:
                self._count("seconds_hashing", time.monotonic() - start)
            self._count("bytes_hashed", size)
            if problem:
                self.refuse(digest, where, path, problem)
                return None
            self._count("verified")
            self._remember_good(digest, level1)
            return level1
        finally:
            del self._pending[digest]
            done.set()

    async def check_group(
        self, digest: Digest, level1: bytes, group: int, data: bytes, where: str, path: bytes
    ) -> bool:
        """Whether ``data``, group ``group`` of the object (the last group may be
        short), still has the level-1 digest the first open found."""
        ds = digest.algorithm.digest_size
        got = await trio.to_thread.run_sync(
            level1_digests, data, digest.algorithm, limiter=self.limiter
        )
        self._count("groups_checked")
        self._count("bytes_hashed", len(data))
        if got == level1[group * ds : (group + 1) * ds]:
            return True
        if digest not in self._bad:
            size = level1_group_size(digest.algorithm)
            self.refuse(
                digest,
                where,
                path,
                f"bytes {group * size} to {group * size + len(data)} changed after it was verified",
            )
        return False


def read_small(fd: int, size: int, digest: Digest) -> tuple[bytes, Digest] | str:
    """Read ``size`` bytes of ``fd`` and hash them in ``digest``'s algorithm (blocking);
    what went wrong, as a phrase for the log, if they cannot be read."""
    buf = memoryview(bytearray(size))
    try:
        pread_exactly(fd, buf, 0)
    except (OSError, ComposefsError) as e:
        return f"it cannot be read whole ({e})"
    data = bytes(buf)
    return data, fsverity_digest(data, digest.algorithm)
