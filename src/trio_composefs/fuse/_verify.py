"""Checking objects against the image's fs-verity digests, once per object per mount (L2).

The first open of an external file whose object the kernel does not verify (no
fs-verity on the filesystem) hashes the object: its fs-verity digest (the Merkle
tree of SHA-256 or SHA-512 over 4096-byte blocks, as ``fsverity digest`` prints)
must equal the digest in the image's ``trusted.overlay.metacopy`` xattr. The hashing
runs in a :class:`~trio_composefs.hashing.HashPool` from a worker thread, so the
event loop keeps serving other requests; a large object is split over the pool's
processes, each computing the level-1 hashes of its range.

Outcomes are remembered for the mount's lifetime, bounded: at most ``remember``
verified digests (least recently used forgotten first; a forgotten object is simply
hashed again on its next open) and as many refused ones. Concurrent first opens
of one object wait for a single hash. A mismatch is logged once per object (on
the ``trio_composefs.fuse`` logger, naming the object's path and the file's path)
and every open of a file backed by it fails with EIO.
"""

from __future__ import annotations

import collections
import logging
import time

import attrs
import trio

from .._errors import ComposefsError
from ..formats import Digest
from ..hashing import HashPool

__all__ = ["Verifier", "VerifierStatistics"]

log = logging.getLogger("trio_composefs.fuse")

#: How many verified (and, separately, refused) digests a mount remembers by default.
DEFAULT_REMEMBER = 1 << 16


@attrs.frozen
class VerifierStatistics:
    """A snapshot of a :class:`Verifier`'s work.

    Attributes:
        verified: objects hashed and found correct.
        refused: objects hashed and found corrupt (or unreadable).
        kernel_verified: opens the kernel's fs-verity vouched for (no hashing).
        cached: opens answered from the remembered outcomes.
        bytes_hashed: bytes read and hashed.
        seconds_hashing: wall time spent in hashes (summed over concurrent ones).
    """

    verified: int
    refused: int
    kernel_verified: int
    cached: int
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
    """

    pool: HashPool
    limiter: trio.CapacityLimiter
    remember: int = DEFAULT_REMEMBER
    _good: collections.OrderedDict[Digest, None] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _bad: collections.OrderedDict[Digest, None] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _pending: dict[Digest, trio.Event] = attrs.field(init=False, factory=dict)
    _counts: dict[str, float] = attrs.field(init=False, factory=dict)

    def statistics(self) -> VerifierStatistics:
        return VerifierStatistics(
            verified=int(self._counts.get("verified", 0)),
            refused=int(self._counts.get("refused", 0)),
            kernel_verified=int(self._counts.get("kernel_verified", 0)),
            cached=int(self._counts.get("cached", 0)),
            bytes_hashed=int(self._counts.get("bytes_hashed", 0)),
            seconds_hashing=self._counts.get("seconds_hashing", 0.0),
        )

    def _count(self, name: str, n: float = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + n

    def kernel_verified(self) -> None:
        """Record an open whose object the kernel's fs-verity checks."""
        self._count("kernel_verified")

    @staticmethod
    def _remember(table: collections.OrderedDict[Digest, None], digest: Digest, n: int) -> None:
        table[digest] = None
        table.move_to_end(digest)
        while len(table) > n:
            table.popitem(last=False)

    async def check(self, digest: Digest, fd: int, size: int, where: str, path: bytes) -> bool:
        """Whether the object open as ``fd`` (``size`` bytes) has fs-verity ``digest``.

        ``where`` (the object's path) and ``path`` (the file's path in the image)
        are for the log line written when the object is first refused.

        Cancellation:
            The hash runs in a thread that is not abandoned (``fd`` must stay open
            until it is done); a cancelled first opener leaves the outcome unknown
            and the next open hashes again.
        """
        while True:
            if digest in self._good:
                self._good.move_to_end(digest)
                self._count("cached")
                return True
            if digest in self._bad:
                self._count("cached")
                return False
            pending = self._pending.get(digest)
            if pending is None:
                break
            await pending.wait()
            if digest not in self._good and digest not in self._bad:
                # the first opener was cancelled or forgot it: hash ourselves
                await trio.lowlevel.checkpoint()
        done = self._pending[digest] = trio.Event()
        try:
            start = time.monotonic()
            try:
                actual: Digest | None = await trio.to_thread.run_sync(
                    self.pool.digest_fd, fd, size, digest.algorithm, limiter=self.limiter
                )
                problem = "" if actual == digest else f"its fs-verity digest is {actual}"
            except (OSError, ComposefsError) as e:
                problem = f"it cannot be read whole ({e})"
            finally:
                self._count("seconds_hashing", time.monotonic() - start)
            self._count("bytes_hashed", size)
            if not problem:
                self._count("verified")
                self._remember(self._good, digest, self.remember)
                return True
            self._count("refused")
            self._remember(self._bad, digest, self.remember)
            log.error(
                "object %s is corrupt: the image wants fs-verity digest %s, %s;"
                " reads of %s fail with EIO",
                where,
                digest,
                problem,
                path.decode("utf-8", "backslashreplace"),
            )
            return False
        finally:
            del self._pending[digest]
            done.set()
