"""Compare two :class:`~trio_composefs.fs.FileSystem` trees entry by entry.

Reusable by any test that checks a tree against an independent one: our tree from
layers against ``umoci unpack`` scanned with :func:`trio_composefs.scan.scan_directory`,
a mounted image against the same, and so on. Every difference is reported (path and
field), not just the first, so a failure shows the whole picture.

Compared per path: file type, permission bits, uid, gid, size, mtime (seconds and
nanoseconds), content (inline bytes, or the object digest of an external file; a file
inline on one side and external on the other differs), symlink target, rdev, xattrs,
and hard-link groups (the sets of paths that share one inode).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from trio_composefs.fs import (
    Directory,
    ExternalFile,
    FileSystem,
    InlineFile,
    Inode,
    Leaf,
    Symlink,
)

__all__ = ["assert_same_tree", "compare_trees", "link_groups", "summary"]


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
