"""The composefs dumpfile writer (composefs-dump(5)), as composefs-rs writes it.

Pure (layer L0). :func:`write_dumpfile` yields one line per name of the tree, depth
first with children in byte order, each line ending in ``b"\\n"``. The output equals
composefs-rs's ``write_dumpfile`` (``cfsctl oci dump``) for the same tree:

* Fields: ``PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST [KEY=VALUE...]``,
  separated by single spaces.
* Escaping (C ``print_escaped``): ``\\`` LF CR TAB get ``\\\\`` ``\\n`` ``\\r`` ``\\t``;
  every other byte outside 0x21-0x7E becomes ``\\xHH`` (lower-case hex), so a space is
  ``\\x20``; ``=`` is escaped as ``\\x3d`` only in xattr names and values. Optional
  fields (PATH, PAYLOAD, CONTENT) write an empty value as ``-`` and a lone ``-`` as
  ``\\x2d``; xattr values are never optional (empty stays empty).
* Directories: SIZE 0 (C writes the EROFS directory size instead), NLINK 2 + the number
  of child directories, PAYLOAD/CONTENT/DIGEST ``-``.
* Leaves: NLINK = the number of names of the inode in the tree. The first name in this
  depth-first order is the canonical one and carries the metadata; every later name
  is a hard-link line ``PATH 0 @120000 - - - - 0.0 TARGET - -`` (composefs-rs's form;
  C ``composefs-info dump`` repeats the target's fields after ``@``).
* Regular files: inline ones put their bytes in CONTENT (an empty file has ``-``);
  external ones put the backing path (``XX/REST``) in PAYLOAD and the hex digest in
  DIGEST. Symlinks: SIZE = target length, PAYLOAD = the target. Devices: RDEV.
* MTIME is ``SEC.NSEC`` with NSEC an integer count of nanoseconds (composefs-rs has
  no nanoseconds and always writes ``SEC.0``, which this gives for ``mtime_nsec`` 0).
* Xattrs are written sorted by name (composefs-rs keeps them in a ``BTreeMap``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ._tree import (
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    FileSystem,
    InlineFile,
    Leaf,
    Stat,
    Symlink,
)

__all__ = ["escape", "escape_optional", "escape_xattr", "write_dumpfile"]

# Bytes that are written as they are: graphic ASCII except the backslash; ``=`` too
# outside xattrs.
_PLAIN = re.compile(rb"[!-\[\]-~]*\Z")
_PLAIN_XATTR = re.compile(rb"[!-<>-\[\]-~]*\Z")
_SPECIAL = re.compile(rb"[^!-\[\]-~]")
_SPECIAL_XATTR = re.compile(rb"[^!-<>-\[\]-~]")

_NAMED = {0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}
_ESCAPES: list[bytes] = [_NAMED.get(c, b"\\x%02x" % c) for c in range(256)]


def _sub(match: re.Match[bytes]) -> bytes:
    return _ESCAPES[match.group()[0]]


def escape(data: bytes) -> bytes:
    """Escape a non-xattr field (``=`` kept as is); the empty string stays empty."""
    if _PLAIN.match(data):
        return data
    return _SPECIAL.sub(_sub, data)


def escape_xattr(data: bytes) -> bytes:
    """Escape an xattr name or value: as :func:`escape`, and ``=`` becomes ``\\x3d``."""
    if _PLAIN_XATTR.match(data):
        return data
    return _SPECIAL_XATTR.sub(_sub, data)


def escape_optional(data: bytes | None) -> bytes:
    """Escape an optional field: absent or empty is ``-``, a lone ``-`` is ``\\x2d``."""
    if not data:
        return b"-"
    if data == b"-":
        return b"\\x2d"
    return escape(data)


def _xattrs(stat: Stat) -> bytes:
    if not stat.xattrs:
        return b""
    return b"".join(
        b" " + escape_xattr(key) + b"=" + escape_xattr(value)
        for key, value in sorted(stat.xattrs.items())
    )


def _line(
    path: bytes,
    size: int,
    mode: int,
    nlink: int,
    stat: Stat,
    rdev: int,
    payload: bytes | None,
    content: bytes | None,
    digest: bytes | None,
) -> bytes:
    return b"%s %d %o %d %d %d %d %d.%d %s %s %s%s\n" % (
        escape_optional(path),
        size,
        mode,
        nlink,
        stat.uid,
        stat.gid,
        rdev,
        stat.mtime,
        stat.mtime_nsec,
        escape_optional(payload),
        escape_optional(content),
        digest if digest else b"-",
        _xattrs(stat),
    )


def _leaf_line(path: bytes, leaf: Leaf, nlink: int) -> bytes:
    content = leaf.content
    payload: bytes | None = None
    data: bytes | None = None
    digest: bytes | None = None
    if isinstance(content, InlineFile):
        data = content.data
    elif isinstance(content, ExternalFile):
        payload = content.payload.encode() if content.payload is not None else None
        digest = content.digest.hex().encode() if content.digest is not None else None
    elif isinstance(content, Symlink):
        payload = content.target
    rdev = content.rdev if isinstance(content, CharDevice | BlockDevice) else 0
    return _line(path, leaf.size, leaf.st_mode, nlink, leaf.stat, rdev, payload, data, digest)


def write_dumpfile(fs: FileSystem) -> Iterator[bytes]:
    """The dumpfile of ``fs``, one line at a time (each ends in ``b"\\n"``).

    Depth first, children in byte order; the first name of a hard-linked leaf carries
    its metadata, later names are ``@`` lines pointing at it. See the module docstring
    for the exact format. Iterative: a deep tree needs no recursion.
    """
    nlinks = fs.nlinks()
    canonical: dict[int, bytes] = {}
    for path, inode in fs.walk():
        if isinstance(inode, Directory):
            subdirs = sum(1 for child in inode.entries.values() if isinstance(child, Directory))
            yield _line(path, 0, inode.st_mode, 2 + subdirs, inode.stat, 0, None, None, None)
            continue
        nlink = nlinks[id(inode)]
        if nlink > 1:
            target = canonical.get(id(inode))
            if target is not None:
                yield b"%s 0 @120000 - - - - 0.0 %s - -\n" % (
                    escape_optional(path),
                    escape_optional(target),
                )
                continue
            canonical[id(inode)] = path
        yield _leaf_line(path, inode, nlink)
