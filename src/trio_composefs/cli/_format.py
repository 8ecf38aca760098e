"""Text renderings for the command line."""

from __future__ import annotations

import os
import stat
import time

from ..formats._tarentries import EntryType, TarEntry

__all__ = ["format_entry", "layer_dumpfile_line"]


def format_entry(entry: TarEntry) -> str:
    """One ``ls -l``-like line: mode, owner, size, mtime, path, link target.

    Example: ``-rw-r--r-- 0/0        1234 2024-01-02 03:04:05 /etc/hosts``.
    """
    kind = "h" if entry.type is EntryType.HARDLINK else ""
    mode = stat.filemode(entry.type.format_bits | (entry.mode & 0o7777))
    if kind:
        mode = kind + mode[1:]
    if entry.type in (EntryType.CHAR, EntryType.BLOCK):
        size = f"{os.major(entry.rdev)},{os.minor(entry.rdev)}"
    else:
        size = str(entry.size)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.mtime))
    line = f"{mode} {entry.uid}/{entry.gid} {size:>10} {when} {_printable(entry.path)}"
    if entry.type is EntryType.SYMLINK:
        line += f" -> {_printable(entry.link_target or '')}"
    elif entry.type is EntryType.HARDLINK:
        line += f" link to {_printable(entry.link_target or '')}"
    return line


def _printable(text: str) -> str:
    """Escape control characters and undecodable bytes so that one entry stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fs_bytes(text: str) -> bytes:
    return os.fsencode(text)


def layer_dumpfile_line(entry: TarEntry) -> bytes:
    """One layer entry as ``cfsctl oci layer --dumpfile`` writes it (no newline).

    composefs-rs's ``TarEntry`` display: the dumpfile fields ``PATH SIZE MODE NLINK
    UID GID RDEV MTIME.NSEC PAYLOAD CONTENT DIGEST XATTRS...`` with ``nlink`` 1, the
    root's path empty (written ``-``), an external file's payload its object path
    and digest its hex; a hard link is ``PATH 0 @120000 - - - - 0.0 TARGET - -``.
    """
    from ..formats import ExternalChunk
    from ..fs import escape_optional, escape_xattr

    path = escape_optional(b"" if entry.path == "/" else _fs_bytes(entry.path))
    if entry.type is EntryType.HARDLINK:
        target = escape_optional(_fs_bytes(entry.link_target or ""))
        return b"%s 0 @120000 - - - - 0.0 %s - -" % (path, target)
    mode = entry.type.format_bits | (entry.mode & 0o7777)
    payload = b""
    content = b""
    digest = b"-"
    size = 0
    if entry.type is EntryType.REGULAR:
        if isinstance(entry.content, ExternalChunk):
            size = entry.content.size
            payload = entry.content.digest.object_path().encode()
            digest = entry.content.digest.hex().encode()
        else:
            size = len(entry.content)
            content = entry.content
    elif entry.type is EntryType.SYMLINK:
        payload = _fs_bytes(entry.link_target or "")
        size = len(payload)
    xattrs = b"".join(
        b" " + escape_xattr(_fs_bytes(k)) + b"=" + escape_xattr(v)
        for k, v in sorted(entry.xattrs.items())
    )
    return b"%s %d %o 1 %d %d %d %d.%d %s %s %s%s" % (
        path,
        size,
        mode,
        entry.uid,
        entry.gid,
        entry.rdev,
        entry.mtime,
        entry.mtime_nsec,
        escape_optional(payload),
        escape_optional(content),
        digest,
        xattrs,
    )
