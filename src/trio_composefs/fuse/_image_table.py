"""Inodes decoded from the EROFS image on demand, not a whole tree (L2, no I/O).

:class:`ImageTable` answers the FUSE handlers straight from the image bytes with the
EROFS reader's own decoders (``fs/erofs/_reader.py``: the same bounds checks and the
same undoing of what the composefs writers did), one inode or one directory at a
time, so memory grows with what the kernel asks about, not with the image:

* inode numbers are EROFS nids, shifted so that the root is FUSE's 1: ``nid + 2``
  for every other inode. Hard links are one nid, so they share one number for free,
  and ``st_nlink``, ``st_size`` of directories and every other field are the stored
  ones, as the kernel's EROFS shows them;
* a directory's entries are decoded when it is first looked up or listed (``.``,
  ``..`` and, in V0/V1 images, the root's 256 whiteout stubs ``00``..``ff`` are
  hidden; each entry's type must match its inode); the last :data:`DIR_CACHE`
  listings and :data:`NODE_CACHE` inodes stay decoded;
* escaped whiteouts become character devices 0/0 and a directory holding one loses
  the writer's marker xattrs, exactly as :func:`~trio_composefs.fs.erofs.read_erofs`
  does; the directory's entries are scanned for that only when it carries one of
  those xattrs.

A corrupt inode or directory makes the request that reached it fail (the handlers
answer EIO and log the :class:`~trio_composefs.ErofsError`, which names the nid and
byte offset); the rest of the image is still served.
"""

from __future__ import annotations

import collections
import struct

from .._errors import ErofsError
from ..fs import CharDevice, Directory, Inode, Leaf
from ..fs._tree import S_IFCHR, S_IFDIR, S_IFMT, S_IFREG
from ..fs.erofs._reader import (
    _DIRENT_TYPES,
    _STUB_NAME,
    _WHITEOUT_DIR_XATTRS,
    LAYOUT_CHUNK_BASED,
    _Inode,
    _Reader,
)
from ._inodes import ROOT_INO

__all__ = ["ImageTable"]

#: How many decoded directory listings (name -> number maps) and inodes are kept.
DIR_CACHE = 1024
NODE_CACHE = 8192

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class ImageTable:
    """A composefs EROFS image's inodes by FUSE number, decoded lazily.

    Args:
        image: the whole image (kept; the tree is never built).
    """

    def __init__(self, image: bytes) -> None:
        self._reader = _Reader(image)
        self._root_nid = self._reader.root().nid
        self._dirs: collections.OrderedDict[int, tuple[dict[bytes, int], int]] = (
            collections.OrderedDict()
        )
        self._nodes: collections.OrderedDict[int, Inode] = collections.OrderedDict()
        self._names: dict[int, tuple[int, bytes]] = {}
        self._count: int | None = None
        self._total: int | None = None

    # -- numbering ----------------------------------------------------------------

    def _ino(self, nid: int) -> int:
        return ROOT_INO if nid == self._root_nid else nid + 2

    def _nid(self, ino: int) -> int | None:
        if ino == ROOT_INO:
            return self._root_nid
        nid = ino - 2
        return None if nid < 0 or nid == self._root_nid else nid

    def _fresh(self) -> _Reader:
        # The reader's budgets bound one whole-image walk; here every call is one step.
        reader = self._reader
        reader.dirent_budget = reader.size // 12 + 2
        reader.data_budget = reader.size
        return reader

    def _inode(self, ino: int) -> _Inode | None:
        nid = self._nid(ino)
        return None if nid is None else self._fresh().inode(nid)

    # -- directories --------------------------------------------------------------

    def _entries(self, ino: int) -> tuple[dict[bytes, int], int] | None:
        """``({name: ino}, parent ino)`` of directory ``ino``, or ``None``."""
        cached = self._dirs.get(ino)
        if cached is not None:
            self._dirs.move_to_end(ino)
            return cached
        dino = self._inode(ino)
        if dino is None or dino.mode & S_IFMT != S_IFDIR:
            return None
        reader = self._fresh()
        legacy_root = reader.legacy_rewrites and dino.nid == self._root_nid
        entries: dict[bytes, int] = {}
        parent = ROOT_INO
        for name, nid, ftype in reader.dirents(dino):
            if name == b".":
                continue
            if name == b"..":
                parent = self._ino(nid)
                continue
            child = reader.inode(nid)
            child_type = child.mode & S_IFMT
            if _DIRENT_TYPES.get(ftype) != child_type:
                raise ErofsError(
                    f"directory entry {name[:80]!r} has type {ftype}, its inode has mode"
                    f" {child.mode:o}",
                    nid=dino.nid,
                    offset=dino.offset,
                )
            if (
                legacy_root
                and child_type == S_IFCHR
                and child.u == 0
                and _STUB_NAME.fullmatch(name)
            ):
                continue
            entries[name] = self._ino(nid)
        result = (entries, parent)
        self._dirs[ino] = result
        while len(self._dirs) > DIR_CACHE:
            self._dirs.popitem(last=False)
        for name, child_ino in entries.items():
            self._names.setdefault(child_ino, (ino, name))
        return result

    def lookup(self, parent: int, name: bytes) -> int | None:
        entries = self._entries(parent)
        return None if entries is None else entries[0].get(name)

    def parent(self, ino: int) -> int:
        entries = self._entries(ino)
        return ROOT_INO if entries is None else entries[1]

    def children(self, ino: int) -> list[tuple[bytes, int]]:
        entries = self._entries(ino)
        if entries is None:
            return []
        names, parent = entries
        return [(b".", ino), (b"..", parent), *sorted(names.items())]

    # -- inodes -------------------------------------------------------------------

    def get(self, ino: int) -> Inode | None:
        """The inode: a :class:`Leaf`, or a :class:`Directory` with only its ``stat``."""
        node = self._nodes.get(ino)
        if node is not None:
            self._nodes.move_to_end(ino)
            return node
        inode = self._inode(ino)
        if inode is None:
            return None
        node = self._decode(ino, inode)
        self._nodes[ino] = node
        while len(self._nodes) > NODE_CACHE:
            self._nodes.popitem(last=False)
        return node

    def _decode(self, ino: int, inode: _Inode) -> Inode:
        reader = self._fresh()
        if inode.mode & S_IFMT == S_IFDIR:
            raw = reader.xattrs(inode)
            if (
                reader.legacy_rewrites
                and any(n in _WHITEOUT_DIR_XATTRS for n, _ in raw)
                and self._has_whiteout(ino)
            ):
                raw = [
                    (n, v)
                    for n, v in raw
                    if n not in _WHITEOUT_DIR_XATTRS
                    or (_WHITEOUT_DIR_XATTRS[n] is not None and _WHITEOUT_DIR_XATTRS[n] != v)
                ]
            return Directory(reader.stat(inode, raw))
        leaf, _whiteout = reader.leaf(inode)
        return leaf

    def _has_whiteout(self, ino: int) -> bool:
        entries = self._entries(ino)
        if entries is None:
            return False
        for child in entries[0].values():
            inode = self._inode(child)
            if inode is None or inode.mode & S_IFMT != S_IFREG:
                continue
            node = self.get(child)
            if isinstance(node, Leaf) and isinstance(node.content, CharDevice):
                return True
        return False

    def nlink(self, ino: int) -> int:
        inode = self._inode(ino)
        if inode is None:
            return 0
        data = self._reader.data
        if data[inode.offset] & 1:  # extended inode: i_nlink is a u32 at byte 44
            return int(_U32.unpack_from(data, inode.offset + 44)[0])
        return int(_U16.unpack_from(data, inode.offset + 6)[0])

    def size(self, ino: int) -> int:
        node = self.get(ino)
        if isinstance(node, Leaf):
            return node.size  # an escaped whiteout is a 0/0 device: size 0
        inode = self._inode(ino)
        return 0 if inode is None else inode.size

    def path(self, ino: int) -> bytes:
        """The path this mount first met ``ino`` under (``nid N`` if it never did)."""
        parts: list[bytes] = []
        seen = 0
        while ino != ROOT_INO:
            where = self._names.get(ino)
            if where is None or seen > 4096:
                nid = self._nid(ino)
                return b"/".join([f"<nid {nid}>".encode(), *reversed(parts)])
            ino, name = where
            parts.append(name)
            seen += 1
        return b"/" + b"/".join(reversed(parts))

    # -- totals (statfs) ----------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        if self._count is None or self._total is None:
            # one walk on the first statfs: every inode once, hard links once
            seen: set[int] = set()
            total = 0
            stack = [ROOT_INO]
            while stack:
                ino = stack.pop()
                entries = self._entries(ino)
                if entries is None:
                    continue
                for child in entries[0].values():
                    if child in seen:
                        continue
                    seen.add(child)
                    inode = self._inode(child)
                    if inode is None:
                        continue
                    if inode.mode & S_IFMT == S_IFDIR:
                        stack.append(child)
                    elif inode.mode & S_IFMT == S_IFREG and (
                        inode.layout == LAYOUT_CHUNK_BASED or inode.size
                    ):
                        total += inode.size
            self._count, self._total = len(seen) + 1, total
        return self._count, self._total

    def __len__(self) -> int:
        return self._totals()[0]

    @property
    def total_bytes(self) -> int:
        return self._totals()[1]
