"""The filesystem tree a composefs image describes: directories, leaves, metadata.

Pure data, no I/O (layer L0: imports no ``os``, no trio). Modelled on composefs-rs's
``generic_tree.rs`` so that the same inputs give the same tree, and so the same image:

* A :class:`Directory` owns its children by name (``bytes``, any byte but ``/`` and NUL).
  Children are kept in a ``dict``; every writer sorts them byte-wise itself.
* A :class:`Leaf` is every other inode. Hard links are the *same* ``Leaf`` object under
  several names: identity is the inode, ``nlink`` is counted, never stored.
* :class:`Stat` holds what every inode has: permission bits (``mode & 0o7777``, the file
  type lives in the content), owner, mtime with nanoseconds, and the xattrs as raw
  ``bytes`` names and values. Several inodes may share one ``Stat`` (the trees
  :class:`~trio_composefs.fs.TreeBuilder` makes do, to save memory): to change one
  inode's metadata, give it a new ``Stat`` (``inode.stat = inode.stat.copy()``) rather
  than assigning to the fields of one it may share.

Regular files are :class:`InlineFile` (the bytes are in the image) or
:class:`ExternalFile` (an object of the repository, named by its fs-verity digest).
``ExternalFile.payload`` is the backing path used for the ``trusted.overlay.redirect``
xattr; it is the digest's ``XX/REST`` object path unless a dumpfile said otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from ..formats._fsverity import Digest

__all__ = [
    "S_IFBLK",
    "S_IFCHR",
    "S_IFDIR",
    "S_IFIFO",
    "S_IFLNK",
    "S_IFMT",
    "S_IFREG",
    "S_IFSOCK",
    "BlockDevice",
    "CharDevice",
    "Directory",
    "ExternalFile",
    "Fifo",
    "FileSystem",
    "InlineFile",
    "Inode",
    "Leaf",
    "LeafContent",
    "Socket",
    "Stat",
    "Symlink",
]

# File type bits of st_mode (the values are fixed by POSIX and Linux; spelled here so
# that this module needs no ``stat``/``os``).
S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000


@attrs.define(eq=True)
class Stat:
    """The metadata every inode carries.

    Attributes:
        mode: permission bits only (``st_mode & 0o7777``).
        uid, gid: owner and group (32-bit).
        mtime: seconds since the epoch (signed 64-bit).
        mtime_nsec: nanoseconds, 0 to 999,999,999.
        xattrs: extended attributes, full name (``b"security.capability"``) to value.
    """

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: dict[bytes, bytes] = attrs.Factory(dict)

    def copy(self) -> Stat:
        """A copy whose xattrs can be changed without touching this one."""
        return Stat(self.mode, self.uid, self.gid, self.mtime, self.mtime_nsec, dict(self.xattrs))


class InlineFile(bytes):
    """A regular file whose bytes are stored in the image itself.

    A frozen value: ``InlineFile(data)``, its bytes in :attr:`data`. It *is* those
    bytes (a ``bytes`` subclass without a ``__dict__``), so that a tree of a million
    small files holds one object per file, not a wrapper and its bytes; compare it with
    another ``InlineFile`` (it never equals plain ``bytes``).
    """

    __slots__ = ()
    __match_args__ = ("data",)

    def __new__(cls, data: bytes) -> InlineFile:
        return super().__new__(cls, data)

    @property
    def data(self) -> bytes:
        """The file's bytes (a plain ``bytes`` copy)."""
        return bytes(self)

    @property
    def size(self) -> int:
        return len(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, InlineFile):
            return bytes.__eq__(self, other)
        return False if isinstance(other, bytes | bytearray | memoryview) else NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self) -> int:
        return hash((InlineFile, bytes(self)))

    def __repr__(self) -> str:
        return f"InlineFile(data={bytes(self)!r})"

    __str__ = __repr__


class _DigestPath:
    """The default of :attr:`ExternalFile.payload`: the digest's object path."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DIGEST_PATH"


_DIGEST_PATH = _DigestPath()


@attrs.frozen(eq=False)
class ExternalFile:
    """A regular file whose bytes are a repository object.

    Attributes:
        size: the file's size in bytes (> 0).
        digest: the object's fs-verity digest (``None`` only for dumpfile input that
            gives none: the image then carries an empty metacopy xattr).
        payload: the backing path (``XX/REST``) for the redirect xattr; defaults to the
            digest's object path (computed when asked for, not stored: a tree of a
            million files would otherwise hold a million such strings).
    """

    size: int
    digest: Digest | None
    _payload: str | _DigestPath | None = attrs.field(default=_DIGEST_PATH, alias="payload")

    @property
    def payload(self) -> str | None:
        payload = self._payload
        if isinstance(payload, _DigestPath):
            return self.digest.object_path() if self.digest is not None else None
        return payload

    @property
    def default_payload(self) -> bool:
        """Whether :attr:`payload` is the digest's object path because none was given."""
        return isinstance(self._payload, _DigestPath)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExternalFile):
            return NotImplemented
        return (self.size, self.digest, self.payload) == (other.size, other.digest, other.payload)

    def __hash__(self) -> int:
        return hash((self.size, self.digest, self.payload))

    def __repr__(self) -> str:
        return f"ExternalFile(size={self.size!r}, digest={self.digest!r}, payload={self.payload!r})"


@attrs.frozen
class Symlink:
    target: bytes


@attrs.frozen
class CharDevice:
    rdev: int  # glibc dev_t encoding (os.makedev)


@attrs.frozen
class BlockDevice:
    rdev: int


@attrs.frozen
class Fifo:
    pass


@attrs.frozen
class Socket:
    pass


LeafContent = InlineFile | ExternalFile | Symlink | CharDevice | BlockDevice | Fifo | Socket

_LEAF_FORMAT: dict[type, int] = {
    InlineFile: S_IFREG,
    ExternalFile: S_IFREG,
    Symlink: S_IFLNK,
    CharDevice: S_IFCHR,
    BlockDevice: S_IFBLK,
    Fifo: S_IFIFO,
    Socket: S_IFSOCK,
}


@attrs.define(eq=False)
class Leaf:
    """A non-directory inode. Hard links share one ``Leaf`` object."""

    stat: Stat
    content: LeafContent

    @property
    def file_type(self) -> int:
        """The ``S_IFMT`` bits of this inode."""
        return _LEAF_FORMAT[type(self.content)]

    @property
    def st_mode(self) -> int:
        return self.file_type | self.stat.mode

    @property
    def size(self) -> int:
        """``st_size``: file length, symlink target length, else 0."""
        content = self.content
        if isinstance(content, InlineFile):
            return len(content)
        if isinstance(content, ExternalFile):
            return content.size
        if isinstance(content, Symlink):
            return len(content.target)
        return 0

    @property
    def rdev(self) -> int:
        content = self.content
        return content.rdev if isinstance(content, CharDevice | BlockDevice) else 0


@attrs.define(eq=False)
class Directory:
    """A directory inode and its children, by name."""

    stat: Stat
    entries: dict[bytes, Inode] = attrs.Factory(dict)

    file_type = S_IFDIR

    @property
    def st_mode(self) -> int:
        return S_IFDIR | self.stat.mode

    def sorted_entries(self) -> list[tuple[bytes, Inode]]:
        """The children in byte-wise name order (the order every format uses)."""
        return sorted(self.entries.items())


Inode = Directory | Leaf


@attrs.define(eq=False)
class FileSystem:
    """A whole tree: the root directory."""

    root: Directory

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every inode with its absolute path, depth first, children in byte order.

        The root is ``b"/"``. A hard-linked leaf is yielded once per name. Iterative,
        so the depth of the tree is bounded only by memory.
        """
        stack: list[tuple[bytes, Inode]] = [(b"/", self.root)]
        while stack:
            path, inode = stack.pop()
            yield path, inode
            if isinstance(inode, Directory):
                prefix = path if path == b"/" else path + b"/"
                stack.extend(
                    (prefix + name, child) for name, child in reversed(inode.sorted_entries())
                )

    def nlinks(self) -> dict[int, int]:
        """For each leaf (by ``id``), how many names it has."""
        counts: dict[int, int] = {}
        for _path, inode in self.walk():
            if isinstance(inode, Leaf):
                counts[id(inode)] = counts.get(id(inode), 0) + 1
        return counts
