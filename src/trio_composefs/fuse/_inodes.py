"""The inode table a FUSE server answers from: numbers, links, attributes (L2, no I/O).

A :class:`~trio_composefs.fs.FileSystem` read back from an EROFS image (by
:func:`~trio_composefs.fs.erofs.read_erofs`, the same bytes the kernel mounts) is
numbered once, depth first: the root is inode 1 (FUSE's ``FUSE_ROOT_ID``), every
directory and every *leaf object* gets the next number. Hard links are one
:class:`~trio_composefs.fs.Leaf` object under several names, so they share one inode
number and their ``st_nlink`` is the count of their names, as on the kernel mount.

What the kernel's EROFS shows, and so what this table gives:

* ``st_nlink`` of a directory: 2 plus its subdirectories (what the composefs writers
  store); of a leaf: its names in the tree.
* ``st_atime`` and ``st_ctime`` equal ``st_mtime`` (EROFS stores one time).
* ``st_blocks``: the size in 512-byte units, rounded up; ``st_blksize`` 4096.
* xattrs: the tree's, which the reader already unescaped (``trusted.overlay.overlay.X``
  shows as ``trusted.overlay.X``) and stripped of composefs's own ``trusted.overlay.*``
  (metacopy, redirect, opaque), as overlayfs hides them.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from ..fs import Directory, ExternalFile, FileSystem, InlineFile, Inode, Leaf

__all__ = ["ROOT_INO", "InodeTable", "Table"]

#: FUSE's root inode number.
ROOT_INO = 1


class Table(Protocol):
    """What the FUSE handlers ask of a tree: inodes by number, names, links.

    :class:`InodeTable` answers from a whole :class:`~trio_composefs.fs.FileSystem`;
    :class:`~._image_table.ImageTable` decodes the EROFS image inode by inode.
    """

    @property
    def total_bytes(self) -> int:
        """The regular files' bytes (for ``statfs``)."""
        ...

    def __len__(self) -> int: ...

    def get(self, ino: int) -> Inode | None:
        """The inode numbered ``ino`` (a directory's ``entries`` may be left empty)."""
        ...

    def nlink(self, ino: int) -> int: ...

    def size(self, ino: int) -> int:
        """``st_size`` of inode ``ino``."""
        ...

    def parent(self, ino: int) -> int: ...

    def lookup(self, parent: int, name: bytes) -> int | None: ...

    def children(self, ino: int) -> list[tuple[bytes, int]]: ...

    def path(self, ino: int) -> bytes: ...


@attrs.define(eq=False)
class InodeTable:
    """Every inode of a tree by number, with its parent and first name.

    Attributes:
        nodes: ``nodes[ino]`` is the directory or leaf (index 0 is unused).
        parents: the parent directory's number (the root is its own parent); for a
            hard-linked leaf, the parent of its first name in depth-first order.
        names: the first name of each inode (``b"/"`` for the root), for messages.
        nlinks: ``st_nlink`` of each inode.
        total_bytes: the sum of the regular files' sizes (each inode once).
    """

    nodes: list[Inode | None]
    parents: list[int]
    names: list[bytes]
    nlinks: list[int]
    total_bytes: int
    _ino_of: dict[int, int]

    @classmethod
    def build(cls, fs: FileSystem) -> InodeTable:
        """Number the inodes of ``fs`` (iteratively: the depth is bounded by memory only)."""
        nodes: list[Inode | None] = [None, fs.root]
        parents = [0, ROOT_INO]
        names = [b"", b"/"]
        nlinks = [0, 2]
        ino_of: dict[int, int] = {id(fs.root): ROOT_INO}
        total = 0
        stack: list[tuple[Directory, int]] = [(fs.root, ROOT_INO)]
        while stack:
            directory, ino = stack.pop()
            for name, child in directory.sorted_entries():
                known = ino_of.get(id(child))
                if known is not None:  # a further name of a hard-linked leaf
                    nlinks[known] += 1
                    continue
                child_ino = len(nodes)
                ino_of[id(child)] = child_ino
                nodes.append(child)
                parents.append(ino)
                names.append(name)
                if isinstance(child, Directory):
                    nlinks.append(2)
                    nlinks[ino] += 1
                    stack.append((child, child_ino))
                else:
                    nlinks.append(1)
                    if isinstance(child.content, InlineFile | ExternalFile):
                        total += child.content.size
        return cls(nodes, parents, names, nlinks, total, ino_of)

    def __len__(self) -> int:
        """The number of inodes."""
        return len(self.nodes) - 1

    def ino(self, node: Inode) -> int:
        """The inode number of a node of this tree."""
        return self._ino_of[id(node)]

    def get(self, ino: int) -> Inode | None:
        """The node numbered ``ino``, or ``None``."""
        if 0 < ino < len(self.nodes):
            return self.nodes[ino]
        return None

    def nlink(self, ino: int) -> int:
        """``st_nlink`` of inode ``ino``."""
        return self.nlinks[ino]

    def size(self, ino: int) -> int:
        """``st_size``: a leaf's size; 0 for a directory (the tree has no dirent bytes)."""
        node = self.nodes[ino]
        return node.size if isinstance(node, Leaf) else 0

    def parent(self, ino: int) -> int:
        """The parent directory of directory ``ino`` (the root's is itself)."""
        return self.parents[ino]

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The number of ``name`` in directory ``parent`` (not a directory: ``None``)."""
        node = self.get(parent)
        if not isinstance(node, Directory):
            return None
        child = node.entries.get(name)
        return None if child is None else self._ino_of[id(child)]

    def path(self, ino: int) -> bytes:
        """The first path of inode ``ino`` (for log messages)."""
        parts: list[bytes] = []
        while ino != ROOT_INO:
            parts.append(self.names[ino])
            ino = self.parents[ino]
        return b"/" + b"/".join(reversed(parts))

    def children(self, ino: int) -> list[tuple[bytes, int]]:
        """``.``, ``..`` and the entries of directory ``ino`` in byte order, with numbers."""
        node = self.nodes[ino]
        assert isinstance(node, Directory)
        out = [(b".", ino), (b"..", self.parents[ino])]
        out.extend((name, self._ino_of[id(child)]) for name, child in node.sorted_entries())
        return out
