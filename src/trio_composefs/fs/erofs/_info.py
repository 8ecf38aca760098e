"""What C ``composefs-info`` 1.0.8 prints for an image: ``dump``, ``ls``, ``objects``.

Pure (layer L0). :func:`read_erofs` gives the *tree* an image describes; these
functions instead reproduce C's reader (``lcfs_load_node_from_image``) and printers
(``tools/composefs-info.c``) exactly, so that ``trio-cfsctl composefs-info`` prints the
same bytes as the C tool:

* Inodes are loaded depth first, children in dirent (byte) order; the first name of
  an inode met in that order is the hard-link *target*, later names are links to it.
* Every character device 0/0 is skipped wherever it is (C treats them all as the
  whiteout stubs ``00``..``ff``); a regular file carrying
  ``trusted.overlay.overlay.whiteout`` becomes that character device again.
* Xattrs are taken inline entries first, then shared ones, in image order; an inline
  entry whose 4-byte header is the last 4 bytes of the xattr area is not read (C's
  ``<`` bound); ``trusted.overlay.metacopy`` gives the digest (SHA-256 only, a
  36-byte value), ``trusted.overlay.redirect`` the payload (without a leading
  ``/``), the writer's other ``trusted.overlay.*`` xattrs are dropped,
  ``trusted.overlay.overlay.X`` becomes ``trusted.overlay.X``, and the whiteout
  markers (``…overlay.whiteouts``, ``user.overlay.whiteout[s]``) are dropped.
  ``opaque=x`` pairs stay.

``dump`` lines: ``PATH SIZE MODE NLINK UID GID RDEV SEC.NSEC PAYLOAD CONTENT DIGEST
XATTRS…`` with the inode's own SIZE (a directory's EROFS size) and NLINK; a later name
of a hard-linked inode repeats the target's fields, its MODE prefixed by ``@`` and its
PAYLOAD the target's path. ``ls`` lines: the path (spaces unescaped), then ``/\\t``
for a directory, ``\\t-> TARGET`` for a symlink, ``\\t@ PAYLOAD`` for an external
file; later names of a hard-linked inode are the bare path. ``objects``: the sorted,
distinct payloads of external files.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import attrs

from ..._errors import ErofsError
from .._tree import S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG
from ._reader import _XATTR_ENTRY, _XATTR_HEADER, LAYOUT_CHUNK_BASED, _Inode, _Reader

__all__ = ["info_dump", "info_ls", "info_objects"]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_REDIRECT = b"trusted.overlay.redirect"
_METACOPY = b"trusted.overlay.metacopy"
_ESC_WHITEOUT = b"trusted.overlay.overlay.whiteout"
_SKIPPED = {
    b"trusted.overlay.overlay.whiteouts",
    b"user.overlay.whiteout",
    b"user.overlay.whiteouts",
}
_OVERLAY = b"trusted.overlay."
_ESCAPED = b"trusted.overlay.overlay."


@attrs.define(eq=False)
class _Node:
    name: bytes
    parent: _Node | None
    mode: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    payload: bytes | None = None
    content: bytes | None = None
    digest: bytes | None = None
    xattrs: list[tuple[bytes, bytes]] = attrs.Factory(list)
    children: list[_Node] = attrs.Factory(list)
    link_to: _Node | None = None

    def path(self) -> bytes:
        names: list[bytes] = []
        node: _Node | None = self
        while node is not None and node.parent is not None:
            names.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(names))


class _Loader:
    def __init__(self, image: bytes) -> None:
        self.reader = _Reader(image)
        self.seen: dict[int, _Node] = {}

    def node(self, nid: int, name: bytes, parent: _Node | None) -> _Node | None:
        """The node of ``nid`` (not its children); ``None`` for a skipped char device 0/0."""
        existing = self.seen.get(nid)
        if existing is not None:
            return _Node(name, parent, link_to=existing)
        r = self.reader
        ino = r.inode(nid)
        node = _Node(name, parent)
        node.mode = ino.mode
        data = r.data
        if data[ino.offset] & 1:
            (node.nlink,) = _U32.unpack_from(data, ino.offset + 44)
        else:
            (node.nlink,) = _U16.unpack_from(data, ino.offset + 6)
        node.size = ino.size
        node.uid, node.gid = ino.uid, ino.gid
        node.mtime, node.mtime_nsec = ino.mtime, ino.mtime_nsec
        ftype = ino.mode & S_IFMT
        if ftype in (S_IFCHR, 0o060000):
            node.rdev = ino.u
        if ftype == S_IFCHR and node.rdev == 0:
            return None
        self.seen[nid] = node
        if ftype == S_IFLNK:
            target = r.file_data(ino, "symlink target")
            node.payload = target.split(b"\0", 1)[0]
        elif ftype == S_IFREG and ino.size and ino.layout != LAYOUT_CHUNK_BASED:
            if ino.size > 5000:
                raise ErofsError(f"inline file of {ino.size} bytes", nid=ino.nid, offset=ino.offset)
            node.content = r.file_data(ino, "inline file")
        for key, value in self._raw_xattrs(ino):
            self._xattr(node, key, value)
        return node

    def _raw_xattrs(self, ino: _Inode) -> list[tuple[bytes, bytes]]:
        """Inline entries (C's loop bound), then shared ones."""
        r = self.reader
        if ino.xattr_end == ino.xattr_start:
            return []
        _filter, shared_count = _XATTR_HEADER.unpack_from(r.data, ino.xattr_start)
        start = ino.xattr_start + _XATTR_HEADER.size
        end = ino.xattr_end
        if start + 4 * shared_count > end:
            raise ErofsError(
                f"{shared_count} shared xattr refs do not fit the xattr area",
                nid=ino.nid,
                offset=ino.xattr_start,
            )
        out: list[tuple[bytes, bytes]] = []
        pos = start + 4 * shared_count
        while pos + _XATTR_ENTRY.size < end:
            key, value, pos = r.entry(pos, end, ino.nid)
            out.append((key, value))
        for i in range(shared_count):
            (ref,) = _U32.unpack_from(r.data, start + 4 * i)
            at = r.header.xattr_start + 4 * ref
            r.need(at, _XATTR_ENTRY.size, "shared xattr", ino.nid)
            key, value, _next = r.entry(at, r.size, ino.nid)
            out.append((key, value))
        return out

    @staticmethod
    def _xattr(node: _Node, key: bytes, value: bytes) -> None:
        regular = node.mode & S_IFMT == S_IFREG
        if key == _REDIRECT:
            if regular:
                if len(value) > 1 and value[:1] == b"/":
                    value = value[1:]
                node.payload = value.split(b"\0", 1)[0]
            return
        if key == _METACOPY:
            if regular and len(value) == 36:
                node.digest = value[4:]
            return
        if key == _ESC_WHITEOUT and regular:
            node.mode = (node.mode & ~S_IFMT) | S_IFCHR
            node.rdev = 0
            node.size = 0
            return
        if key in _SKIPPED:
            return
        if key.startswith(_OVERLAY):
            if not key.startswith(_ESCAPED):
                return
            key = _OVERLAY + key[len(_ESCAPED) :]
        node.xattrs = [(k, v) for k, v in node.xattrs if k != key]
        node.xattrs.append((key, value))

    def load(self) -> _Node:
        r = self.reader
        root_ino = r.root()
        root = self.node(root_ino.nid, b"", None)
        assert root is not None  # a directory
        # depth first, each child's subtree loaded before its next sibling (as C recurses)
        stack: list[tuple[_Node, Iterator[tuple[bytes, int, int]]]] = [
            (root, iter(r.dirents(root_ino)))
        ]
        while stack:
            parent, entries = stack[-1]
            for name, nid, _ftype in entries:
                if name in (b".", b".."):
                    continue
                if len(stack) > 4096:
                    raise ErofsError("directories nested too deep", nid=nid, offset=0)
                child = self.node(nid, name, parent)
                if child is None:
                    continue
                parent.children.append(child)
                if child.link_to is None and child.mode & S_IFMT == S_IFDIR:
                    stack.append((child, iter(r.dirents(r.inode(nid)))))
                    break
            else:
                stack.pop()
        return root


def _escape(
    data: bytes, *, equal: bool = False, lone_dash: bool = False, space: bool = False
) -> bytes:
    """C ``print_escaped``: ``\\\\ \\n \\r \\t``, ``\\xHH`` outside isgraph (isprint with
    ``space``), ``=`` as ``\\x3d`` with ``equal``, a lone ``-`` as ``\\x2d`` with ``lone_dash``."""
    if lone_dash and data == b"-":
        return b"\\x2d"
    low = 0x20 if space else 0x21
    out = bytearray()
    for c in data:
        if c == 0x5C:
            out += b"\\\\"
        elif c == 0x0A:
            out += b"\\n"
        elif c == 0x0D:
            out += b"\\r"
        elif c == 0x09:
            out += b"\\t"
        elif (c == 0x3D and equal) or not low <= c <= 0x7E:
            out += b"\\x%02x" % c
        else:
            out.append(c)
    return bytes(out)


def _optional(data: bytes | None) -> bytes:
    return b"-" if data is None else _escape(data, lone_dash=True)


def _walk(root: _Node) -> Iterator[_Node]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def _dump_line(node: _Node) -> bytes:
    target = node.link_to or node
    link_path = target.path() if node.link_to is not None else None
    parts = [
        _escape(node.path()),
        b"%d %s%o %d %d %d %d %d.%d"
        % (
            target.size,
            b"@" if link_path is not None else b"",
            target.mode,
            target.nlink,
            target.uid,
            target.gid,
            target.rdev,
            target.mtime,
            target.mtime_nsec,
        ),
        _optional(link_path if link_path is not None else target.payload),
        _optional(target.content[: target.size] if target.content is not None else None),
        target.digest.hex().encode() if target.digest is not None else b"-",
    ]
    parts += [_escape(k, equal=True) + b"=" + _escape(v, equal=True) for k, v in target.xattrs]
    return b" ".join(parts) + b"\n"


def info_dump(image: bytes) -> Iterator[bytes]:
    """``composefs-info dump IMAGE``: one line per name (see the module docstring).

    Raises:
        ErofsError: not a composefs image, or a corrupt one (raised before any line).
    """
    root = _Loader(image).load()
    return (_dump_line(node) for node in _walk(root))


def info_ls(image: bytes) -> Iterator[bytes]:
    """``composefs-info ls IMAGE``: one line per name below the root."""
    root = _Loader(image).load()
    return (_ls_line(node) for node in _walk(root) if node is not root)


def _ls_line(node: _Node) -> bytes:
    line = _escape(node.path(), space=True)
    kind = node.mode & S_IFMT
    if kind == S_IFDIR:
        line += b"/\t"
    elif kind == S_IFLNK:
        line += b"\t-> " + _escape(node.payload or b"")
    elif kind == S_IFREG and node.payload is not None:
        line += b"\t@ " + _escape(node.payload)
    return line + b"\n"


def info_objects(images: Iterable[bytes]) -> list[bytes]:
    """``composefs-info objects IMAGE…``: the distinct payloads of external files of all
    the images, sorted byte-wise, each with a newline."""
    found: set[bytes] = set()
    for image in images:
        for node in _walk(_Loader(image).load()):
            if node.mode & S_IFMT == S_IFREG and node.payload is not None:
                found.add(node.payload)
    return [p + b"\n" for p in sorted(found)]
