"""Compare two :class:`~trio_composefs.fs.FileSystem` trees entry by entry.

Reusable by any test that checks a tree against an independent one: our tree from
layers against ``umoci unpack`` scanned with :func:`trio_composefs.images.scan_directory`,
a mounted image against the same, and so on. Every difference is reported (path and
field), not just the first, so a failure shows the whole picture.

Compared per path: file type, permission bits, uid, gid, size, mtime (seconds and
nanoseconds), content (inline bytes, or the object digest of an external file; a file
inline on one side and external on the other differs), symlink target, rdev, xattrs,
and hard-link groups (the sets of paths that share one inode).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from trio_composefs.formats import Algorithm, Digest
from trio_composefs.fs import (
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    Fifo,
    FileSystem,
    InlineFile,
    Inode,
    Leaf,
    Socket,
    Stat,
    Symlink,
)
from trio_composefs.fs._tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG

__all__ = [
    "assert_same_tree",
    "compare_trees",
    "link_groups",
    "summary",
    "tree_from_c_dump",
]


def _fields(inode: Inode, *, mtime: bool) -> dict[str, object]:
    stat = inode.stat
    fields: dict[str, object] = {
        "type": oct(inode.file_type),
        "mode": oct(stat.mode),
        "uid": stat.uid,
        "gid": stat.gid,
    }
    if mtime:
        fields["mtime"] = (stat.mtime, stat.mtime_nsec)
    if isinstance(inode, Leaf):
        fields["size"] = inode.size
        fields["rdev"] = inode.rdev
        content = inode.content
        if isinstance(content, InlineFile):
            fields["content"] = ("inline", content.data)
        elif isinstance(content, ExternalFile):
            fields["content"] = ("external", str(content.digest))
        elif isinstance(content, Symlink):
            fields["target"] = content.target
    return fields


def link_groups(fs: FileSystem) -> set[frozenset[bytes]]:
    """The path sets of leaves with more than one name."""
    names: dict[int, set[bytes]] = {}
    for path, inode in fs.walk():
        if isinstance(inode, Leaf):
            names.setdefault(id(inode), set()).add(path)
    return {frozenset(group) for group in names.values() if len(group) > 1}


def compare_trees(
    expected: FileSystem,
    actual: FileSystem,
    *,
    ignore_root: bool = False,
    xattrs: Callable[[bytes], bool] | None = None,
    ignore_mtime: Collection[bytes] = (),
) -> list[str]:
    """Every difference between ``expected`` and ``actual``, one line each.

    Args:
        ignore_root: skip the root directory's metadata (its children still count).
        xattrs: compare only the xattrs whose name this accepts (default: all).
        ignore_mtime: paths whose mtime is not compared (e.g. parents a tool created
            at extraction time).
    """
    left = dict(expected.walk())
    right = dict(actual.walk())
    problems: list[str] = []
    for path in sorted(left.keys() - right.keys()):
        problems.append(f"{path!r}: only in expected ({_kind(left[path])})")
    for path in sorted(right.keys() - left.keys()):
        problems.append(f"{path!r}: only in actual ({_kind(right[path])})")
    for path in sorted(left.keys() & right.keys()):
        if ignore_root and path == b"/":
            continue
        a, b = left[path], right[path]
        mtime = path not in ignore_mtime
        fa, fb = _fields(a, mtime=mtime), _fields(b, mtime=mtime)
        for key in fa.keys() | fb.keys():
            if fa.get(key) != fb.get(key):
                problems.append(f"{path!r}: {key} {_short(fa.get(key))} != {_short(fb.get(key))}")
        xa, xb = a.stat.xattrs, b.stat.xattrs
        if xattrs is not None:
            xa = {k: v for k, v in xa.items() if xattrs(k)}
            xb = {k: v for k, v in xb.items() if xattrs(k)}
        if xa != xb:
            problems.append(f"{path!r}: xattrs {xa!r} != {xb!r}")
    ga, gb = link_groups(expected), link_groups(actual)
    for group in sorted(ga - gb, key=sorted):
        problems.append(f"hard-link group only in expected: {sorted(group)}")
    for group in sorted(gb - ga, key=sorted):
        problems.append(f"hard-link group only in actual: {sorted(group)}")
    return problems


def assert_same_tree(
    expected: FileSystem,
    actual: FileSystem,
    *,
    ignore_root: bool = False,
    xattrs: Callable[[bytes], bool] | None = None,
    ignore_mtime: Collection[bytes] = (),
) -> None:
    """Fail with every difference listed (see :func:`compare_trees` for the options)."""
    problems = compare_trees(
        expected, actual, ignore_root=ignore_root, xattrs=xattrs, ignore_mtime=ignore_mtime
    )
    assert not problems, "trees differ:\n" + "\n".join(problems[:200])


def summary(fs: FileSystem) -> dict[str, int]:
    """How many inodes of each kind a tree has (for reporting oracle coverage)."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for _path, inode in fs.walk():
        if id(inode) in seen:
            continue
        seen.add(id(inode))
        kind = _kind(inode)
        counts[kind] = counts.get(kind, 0) + 1
    counts["hard-link groups"] = len(link_groups(fs))
    return counts


def _kind(inode: Inode) -> str:
    if isinstance(inode, Directory):
        return "directory"
    return type(inode.content).__name__


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        c = field[i]
        if c != 0x5C:  # backslash
            out.append(c)
            i += 1
            continue
        nxt = field[i + 1 : i + 2]
        if nxt == b"x":
            out.append(int(field[i + 2 : i + 4], 16))
            i += 4
        else:
            out += {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}[nxt]
            i += 2
    return bytes(out)


def tree_from_c_dump(text: bytes, algorithm: Algorithm = Algorithm.SHA256) -> FileSystem:
    """A tree from C ``composefs-info dump`` output (composefs-dump(5)), for oracles.

    A minimal reader for the C tool's own output (not a validating parser): hard-link
    lines (``@`` modes) share their target's leaf.
    """
    root: Directory | None = None
    for line in text.splitlines():
        fields = line.split(b" ")
        path = _unescape(fields[0])
        size, mode_field = int(fields[1]), fields[2]
        uid, gid, rdev = int(fields[4]), int(fields[5]), int(fields[6])
        sec, _, nsec = fields[7].partition(b".")
        payload, body, digest = (None if f == b"-" else _unescape(f) for f in fields[8:11])
        xattrs = dict(_unescape(x).split(b"=", 1) for x in fields[11:])
        parent_path, _, name = path.rpartition(b"/")
        if mode_field.startswith(b"@"):
            assert root is not None
            assert payload is not None
            target = _lookup(root, payload)
            assert isinstance(target, Leaf)
            parent = _lookup(root, parent_path)
            assert isinstance(parent, Directory)
            parent.entries[name] = target
            continue
        mode = int(mode_field, 8)
        stat = Stat(mode & 0o7777, uid, gid, int(sec), int(nsec or b"0"), xattrs)
        kind = mode & S_IFMT
        inode: Inode
        if kind == S_IFDIR:
            inode = Directory(stat)
        elif kind == S_IFREG:
            if digest is not None:
                inode = Leaf(stat, ExternalFile(size, Digest.from_hex(digest.decode(), algorithm)))
            else:
                inode = Leaf(stat, InlineFile(body or b""))
        elif kind == S_IFLNK:
            inode = Leaf(stat, Symlink(payload or b""))
        elif kind == S_IFCHR:
            inode = Leaf(stat, CharDevice(rdev))
        elif kind == S_IFBLK:
            inode = Leaf(stat, BlockDevice(rdev))
        elif kind == S_IFIFO:
            inode = Leaf(stat, Fifo())
        else:
            inode = Leaf(stat, Socket())
        if path == b"/":
            assert isinstance(inode, Directory)
            root = inode
            continue
        assert root is not None
        parent = _lookup(root, parent_path)
        assert isinstance(parent, Directory)
        parent.entries[name] = inode
    assert root is not None
    return FileSystem(root)


def _lookup(root: Directory, path: bytes) -> Inode:
    node: Inode = root
    for part in path.split(b"/"):
        if part:
            assert isinstance(node, Directory)
            node = node.entries[part]
    return node
