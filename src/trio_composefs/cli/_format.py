"""Text renderings for the command line."""

from __future__ import annotations

import os
import stat
import time

from ..formats._tarentries import EntryType, TarEntry

__all__ = ["format_entry"]


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
