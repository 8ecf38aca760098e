"""fs-verity digests, computed in userspace exactly as the Linux kernel does.

Sans-IO: nothing here touches a file. :class:`FsVerityHasher` takes bytes in
chunks of any size; :func:`fsverity_digest` is the one-shot form. The tree
uses 4096-byte blocks, no salt, and an all-zero root for an empty file; the
digest is the hash of the 256-byte ``fsverity_descriptor``.
"""

from __future__ import annotations

import enum
import hashlib
import re
import struct
from collections.abc import Callable
from typing import Any

import attrs

from .._errors import DigestError

__all__ = [
    "BLOCK_SIZE",
    "Algorithm",
    "Digest",
    "FsVerityHasher",
    "descriptor_digest",
    "digest_from_level1",
    "fsverity_digest",
    "fsverity_digest_raw",
    "level1_digests",
    "level1_group_size",
]

BLOCK_SIZE = 4096
LOG_BLOCK_SIZE = 12

_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144s")


class Algorithm(enum.Enum):
    """The two fs-verity hash algorithms a composefs repository may use."""

    SHA256 = "fsverity-sha256-12"
    SHA512 = "fsverity-sha512-12"

    @property
    def kernel_id(self) -> int:
        """``FS_VERITY_HASH_ALG_*``: 1 for SHA-256, 2 for SHA-512."""
        return 1 if self is Algorithm.SHA256 else 2

    @property
    def digest_size(self) -> int:
        return 32 if self is Algorithm.SHA256 else 64

    @property
    def hash_name(self) -> str:
        return "sha256" if self is Algorithm.SHA256 else "sha512"

    @property
    def hash_constructor(self) -> Callable[..., Any]:
        return hashlib.sha256 if self is Algorithm.SHA256 else hashlib.sha512

    @classmethod
    def from_name(cls, name: str) -> Algorithm:
        """Parse ``fsverity-sha256-12`` / ``fsverity-sha512-12`` (also ``sha256`` / ``sha512``)."""
        for alg in cls:
            if name in (alg.value, alg.hash_name):
                return alg
        raise DigestError(
            f"unknown fs-verity algorithm {name!r}:"
            " expected fsverity-sha256-12 or fsverity-sha512-12"
        )

    @classmethod
    def from_kernel_id(cls, kernel_id: int) -> Algorithm:
        for alg in cls:
            if alg.kernel_id == kernel_id:
                return alg
        raise DigestError(f"unknown fs-verity hash algorithm id {kernel_id}")

    def __str__(self) -> str:
        return self.value


_HEX_RE = re.compile(r"[0-9a-f]+")


def _check_raw(instance: Digest, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if len(value) != instance.algorithm.digest_size:
        raise DigestError(
            f"a {instance.algorithm.hash_name} digest has {instance.algorithm.digest_size} bytes,"
            f" not {len(value)}"
        )


@attrs.frozen(order=True)
class Digest:
    """An fs-verity digest: an algorithm and its raw bytes.

    Build one with :meth:`from_hex` or :meth:`from_object_path`, which validate
    before any path is formed; ``str(digest)`` is the lowercase hex form.
    """

    algorithm: Algorithm = attrs.field(order=False)
    raw: bytes = attrs.field(validator=_check_raw)

    @classmethod
    def from_hex(cls, text: str, algorithm: Algorithm | None = None) -> Digest:
        """Parse exactly ``2 * digest_size`` lowercase hex digits.

        Without ``algorithm``, the length decides (64 → SHA-256, 128 → SHA-512).
        """
        if algorithm is None:
            by_len = {2 * a.digest_size: a for a in Algorithm}
            if len(text) not in by_len:
                raise DigestError(
                    f"not an fs-verity digest: {text!r} (expected 64 or 128 lowercase hex digits)"
                )
            algorithm = by_len[len(text)]
        want = 2 * algorithm.digest_size
        if len(text) != want or not _HEX_RE.fullmatch(text):
            raise DigestError(
                f"not a {algorithm.hash_name} fs-verity digest: {text!r}"
                f" (expected {want} lowercase hex digits)"
            )
        return cls(algorithm, bytes.fromhex(text))

    @classmethod
    def from_object_path(cls, path: str, algorithm: Algorithm | None = None) -> Digest:
        """Parse the ``XX/<rest>`` form used under ``objects/``."""
        head, sep, rest = path.partition("/")
        if not sep or len(head) != 2 or "/" in rest:
            raise DigestError(f"not an object path: {path!r} (expected XX/<rest>)")
        return cls.from_hex(head + rest, algorithm)

    def hex(self) -> str:
        return self.raw.hex()

    def object_path(self) -> str:
        """``XX/<rest>``: the path of this object under ``objects/``."""
        h = self.raw.hex()
        return f"{h[:2]}/{h[2:]}"

    def __str__(self) -> str:
        return self.raw.hex()


class FsVerityHasher:
    """Incremental fs-verity digest (4096-byte blocks, no salt).

    Feed bytes with :meth:`update` in chunks of any size, then call
    :meth:`digest`. After :meth:`digest` the hasher is spent.

    Memory is O(tree depth): each level keeps at most one block of pending
    digests.
    """

    __slots__ = ("_algorithm", "_buf", "_done", "_hash", "_levels", "_size")

    def __init__(self, algorithm: Algorithm = Algorithm.SHA256) -> None:
        self._algorithm = algorithm
        self._hash = algorithm.hash_constructor
        self._buf = bytearray()  # partial data block
        self._levels: list[bytearray] = [bytearray()]  # pending digests per tree level
        self._size = 0
        self._done = False

    @property
    def algorithm(self) -> Algorithm:
        return self._algorithm

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise ValueError("FsVerityHasher.update() after digest()")
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not n:
            return
        self._size += n
        pos = 0
        if self._buf:
            take = min(BLOCK_SIZE - len(self._buf), n)
            self._buf += mv[:take]
            pos = take
            if len(self._buf) < BLOCK_SIZE:
                return
            self._add_block_digest(self._hash(self._buf).digest())
            self._buf.clear()
        end = pos + (n - pos) // BLOCK_SIZE * BLOCK_SIZE
        if end > pos:
            self._add_data_blocks(mv[pos:end])
        if end < n:
            self._buf += mv[end:]

    def _add_data_blocks(self, mv: memoryview) -> None:
        h = self._hash
        level0 = self._levels[0]
        ds = self._algorithm.digest_size
        # Fill level 0 in runs that stop exactly at its block boundary.
        per_block = BLOCK_SIZE // ds
        off = 0
        n = len(mv)
        while off < n:
            room = per_block - len(level0) // ds
            stop = min(n, off + room * BLOCK_SIZE)
            level0 += b"".join(
                [h(mv[i : i + BLOCK_SIZE]).digest() for i in range(off, stop, BLOCK_SIZE)]
            )
            off = stop
            if len(level0) == BLOCK_SIZE:
                self._push(1, h(level0).digest())
                level0.clear()

    def _add_block_digest(self, d: bytes) -> None:
        level0 = self._levels[0]
        level0 += d
        if len(level0) == BLOCK_SIZE:
            self._push(1, self._hash(level0).digest())
            level0.clear()

    def _push(self, level: int, d: bytes) -> None:
        levels = self._levels
        while True:
            if level == len(levels):
                levels.append(bytearray())
            buf = levels[level]
            buf += d
            if len(buf) < BLOCK_SIZE:
                return
            d = self._hash(buf).digest()
            buf.clear()
            level += 1

    def root_hash(self) -> bytes:
        """The Merkle tree root (all zeros for empty input). Ends the hasher."""
        if self._done:
            raise ValueError("FsVerityHasher is spent")
        self._done = True
        ds = self._algorithm.digest_size
        if self._size == 0:
            return bytes(ds)
        if self._buf:
            self._add_block_digest(self._hash(self._buf.ljust(BLOCK_SIZE, b"\0")).digest())
            self._buf.clear()
        levels = self._levels
        level = 0
        while True:
            buf = levels[level]
            higher = any(levels[level + 1 :])
            if not higher:
                if len(buf) == ds:
                    return bytes(buf)
                if not buf:  # pragma: no cover - a non-empty input always leaves a top
                    raise AssertionError("empty fs-verity tree")
            if buf:
                d = self._hash(buf.ljust(BLOCK_SIZE, b"\0")).digest()
                buf.clear()
                if level + 1 == len(levels):
                    levels.append(bytearray())
                # A partial block at this level never completes a block above.
                levels[level + 1] += d
            level += 1

    def digest(self) -> Digest:
        """The fs-verity digest of everything fed. Ends the hasher."""
        size = self._size
        root = self.root_hash()
        desc = _DESCRIPTOR.pack(
            1, self._algorithm.kernel_id, LOG_BLOCK_SIZE, 0, 0, size, root, b"", b""
        )
        return Digest(self._algorithm, self._hash(desc).digest())


def descriptor_digest(algorithm: Algorithm, size: int, root: bytes) -> Digest:
    """The digest for a tree ``root`` over ``size`` bytes (used by parallel hashing)."""
    desc = _DESCRIPTOR.pack(1, algorithm.kernel_id, LOG_BLOCK_SIZE, 0, 0, size, root, b"", b"")
    return Digest(algorithm, algorithm.hash_constructor(desc).digest())


def fsverity_digest(
    data: bytes | bytearray | memoryview, algorithm: Algorithm = Algorithm.SHA256
) -> Digest:
    """One-shot fs-verity digest of ``data`` (held whole in memory).

    No tree object: an empty input has the all-zero root; up to one block, the
    root is the hash of the block zero-padded to 4096 bytes (a one-block tree is
    its own root); beyond, the level-1 digests (:func:`level1_digests`) are
    finished by :func:`digest_from_level1`. Equal to :class:`FsVerityHasher`'s
    digest of the same bytes, at a fraction of its cost for small objects.
    """
    return Digest(algorithm, fsverity_digest_raw(data, algorithm))


def fsverity_digest_raw(
    data: bytes | bytearray | memoryview, algorithm: Algorithm = Algorithm.SHA256
) -> bytes:
    """:func:`fsverity_digest`'s raw bytes (no :class:`Digest` made: for hot loops)."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    h = algorithm.hash_constructor
    if n > BLOCK_SIZE:
        return digest_from_level1(algorithm, n, level1_digests(mv, algorithm)).raw
    if n == 0:
        root = bytes(algorithm.digest_size)
    else:
        block = h(mv)
        block.update(_ZERO_BLOCK[: BLOCK_SIZE - n])
        root = block.digest()
    desc = _DESCRIPTOR.pack(1, algorithm.kernel_id, LOG_BLOCK_SIZE, 0, 0, n, root, b"", b"")
    raw: bytes = h(desc).digest()
    return raw


_ZERO_BLOCK = memoryview(bytes(BLOCK_SIZE))


# Parallel hashing: a file is cut into groups of data blocks that each fill
# exactly one level-0 tree block (128 blocks for SHA-256, 64 for SHA-512).
# Each group yields one level-1 digest; independent workers can hash groups
# and the tree above level 1 is cheap to finish in one place.


def level1_group_size(algorithm: Algorithm) -> int:
    """Bytes of data covered by one level-1 digest: 512 KiB (SHA-256), 256 KiB (SHA-512)."""
    return BLOCK_SIZE // algorithm.digest_size * BLOCK_SIZE


def level1_digests(data: bytes | bytearray | memoryview, algorithm: Algorithm) -> bytes:
    """The concatenated level-1 digests of ``data``.

    ``data`` must start at a multiple of :func:`level1_group_size` in the file
    and be a whole number of groups long, except for the file's last piece,
    whose partial data block and partial tree block are zero-padded here.
    """
    h = algorithm.hash_constructor
    mv = memoryview(data).cast("B")
    n = len(mv)
    group = level1_group_size(algorithm)
    full_end = n - n % BLOCK_SIZE
    out = []
    for start in range(0, n, group):
        stop = min(start + group, full_end)
        level0 = [h(mv[i : i + BLOCK_SIZE]).digest() for i in range(start, stop, BLOCK_SIZE)]
        if stop < min(start + group, n):  # the file's partial last data block
            level0.append(h(bytes(mv[stop:n]).ljust(BLOCK_SIZE, b"\0")).digest())
        out.append(h(b"".join(level0).ljust(BLOCK_SIZE, b"\0")).digest())
    return b"".join(out)


def digest_from_level1(algorithm: Algorithm, size: int, level1: bytes) -> Digest:
    """Finish the tree over a file of ``size`` bytes from all its level-1 digests.

    Only for files of more than one data block (``size > BLOCK_SIZE``); a
    single block is its own root and has no level-1 digest.

    Raises:
        ValueError: ``size`` is too small or ``level1`` has the wrong length.
    """
    ds = algorithm.digest_size
    if size <= BLOCK_SIZE:
        raise ValueError(f"a file of {size} bytes has no level-1 digests")
    groups = -(-size // level1_group_size(algorithm))
    if len(level1) != groups * ds:
        raise ValueError(
            f"a file of {size} bytes has {groups} level-1 digests, not {len(level1) / ds:g}"
        )
    h = algorithm.hash_constructor
    level = level1
    while len(level) > ds:
        level = b"".join(
            h(level[i : i + BLOCK_SIZE].ljust(BLOCK_SIZE, b"\0")).digest()
            for i in range(0, len(level), BLOCK_SIZE)
        )
    return descriptor_digest(algorithm, size, level)
