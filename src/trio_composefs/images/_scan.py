"""Read a directory tree from disk into a :class:`~trio_composefs.fs.FileSystem`.

Blocking I/O (layer L1: uses ``os``, never trio; async callers run it in a worker
thread). This is what ``create-image PATH``, ``compute-id PATH`` and
``create-dumpfile PATH`` scan, as composefs-rs's ``read_filesystem``
(``crates/composefs/src/fs.rs``) does:

* Every inode is opened relative to its parent directory's descriptor with
  ``O_NOFOLLOW`` (directories ``O_DIRECTORY``, regular files ``O_RDONLY``, everything
  else ``O_PATH``) and ``fstat``-ed; a type that differs from the ``lstat`` seen in the
  listing (the tree changed underneath) is a :class:`~trio_composefs._errors.ScanError`.
  Symlinks are never followed, the starting ``path`` included.
* Metadata: ``mode & 0o7777``, uid, gid, mtime with nanoseconds (``st_mtim``), every
  xattr (``listxattr``/``getxattr`` on the inode itself, through
  ``/proc/self/fd/N`` for ``O_PATH`` descriptors, as upstream does).
* Regular files of at most 64 bytes are read into an :class:`InlineFile`; larger ones
  become an :class:`ExternalFile` whose digest ``digest_file(fd, size)`` returns (the
  caller stores the object, or only hashes it for ``compute-id``). The descriptor is
  ours: the callback must not close it.
* Hard links: inodes are tracked by ``(st_dev, st_ino)`` for every non-directory (not
  only ``st_nlink > 1``, as upstream, since some filesystems misreport it), so the names
  of one inode share one :class:`Leaf` and its content is read or hashed once.
  ``hardlinks=False`` gives each name its own inode, as C ``mkcomposefs`` does.
* The walk is iterative; open descriptors are bounded by the depth, which is bounded
  by :data:`~trio_composefs.fs._layers.MAX_DEPTH`.

No transform is applied here. ``cfsctl create-image``/``compute-id`` then run
``transform_for_oci`` by default (root metadata from ``/usr``, ``/run`` emptied, the
xattr allowlist), and nothing with ``--no-propagate-usr-to-root`` (which then also
keeps every xattr): :func:`~trio_composefs.fs._layers.transform_for_oci` is the
caller's step.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import attrs

from .._errors import ScanError
from ..formats._fsverity import Digest
from ..fs._layers import INLINE_MAX, MAX_DEPTH
from ..fs._tree import (
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    Fifo,
    FileSystem,
    InlineFile,
    Leaf,
    LeafContent,
    Socket,
    Stat,
    Symlink,
)

__all__ = ["DigestFile", "scan_directory"]

DigestFile = Callable[[int, int], Digest]
"""``digest_file(fd, size)``: store or hash the ``size`` bytes of open file ``fd``.

It reads from the current offset (0) and should fail if the file does not hold
exactly ``size`` bytes (it changed since ``fstat``); it must not close ``fd``."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@attrs.define
class _Frame:
    fd: int
    directory: Directory
    path: bytes
    names: list[bytes]


def scan_directory(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    *,
    digest_file: DigestFile,
    hardlinks: bool = True,
) -> FileSystem:
    """The tree under ``path`` (a directory, not followed if a symlink).

    Raises:
        ScanError: the tree changed while being read, or is too deep.
        OSError: a file could not be read (the message names its path).
    """
    top = os.fsencode(path)
    fd = _open(os.open, top, _DIR_FLAGS, top)
    try:
        st = os.fstat(fd)
        root = Directory(_stat(st, _xattrs(fd, top, real_fd=True)))
    except BaseException:
        os.close(fd)
        raise
    scanner = _Scanner(digest_file, hardlinks)
    stack = [_Frame(fd, root, top.rstrip(b"/") or b"/", _listdir(fd, top))]
    try:
        while stack:
            frame = stack[-1]
            if not frame.names:
                os.close(stack.pop().fd)
                continue
            name = frame.names.pop()
            child_path = frame.path + b"/" + name if frame.path != b"/" else b"/" + name
            child = scanner.child(frame.fd, name, child_path)
            if isinstance(child, _Frame):
                frame.directory.entries[name] = child.directory
                if len(stack) >= MAX_DEPTH:
                    os.close(child.fd)
                    raise ScanError(f"{child_path!r}: deeper than {MAX_DEPTH} directories")
                stack.append(child)
            else:
                frame.directory.entries[name] = child
    finally:
        for frame in stack:
            os.close(frame.fd)
    return FileSystem(root)


class _Scanner:
    def __init__(self, digest_file: DigestFile, hardlinks: bool) -> None:
        self.digest_file = digest_file
        self.hardlinks = hardlinks
        self.inodes: dict[tuple[int, int], Leaf] = {}

    def child(self, dirfd: int, name: bytes, path: bytes) -> _Frame | Leaf:
        listed = _call(os.stat, path, name, dir_fd=dirfd, follow_symlinks=False)
        kind = stat.S_IFMT(listed.st_mode)
        if kind == stat.S_IFDIR:
            fd = _open(os.open, name, _DIR_FLAGS, path, dir_fd=dirfd)
            try:
                st = _checked_fstat(fd, kind, path)
                directory = Directory(_stat(st, _xattrs(fd, path, real_fd=True)))
                return _Frame(fd, directory, path, _listdir(fd, path))
            except BaseException:
                os.close(fd)
                raise
        regular = kind == stat.S_IFREG
        fd = _open(os.open, name, _FILE_FLAGS if regular else _PATH_FLAGS, path, dir_fd=dirfd)
        try:
            st = _checked_fstat(fd, kind, path)
            key = (st.st_dev, st.st_ino)
            if self.hardlinks and key in self.inodes:
                return self.inodes[key]
            leaf = Leaf(
                _stat(st, _xattrs(fd, path, real_fd=regular)),
                self._content(fd, st, dirfd, name, path),
            )
            if self.hardlinks:
                self.inodes[key] = leaf
            return leaf
        finally:
            os.close(fd)

    def _content(
        self, fd: int, st: os.stat_result, dirfd: int, name: bytes, path: bytes
    ) -> LeafContent:
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            size = st.st_size
            if size > INLINE_MAX:
                return ExternalFile(size, self.digest_file(fd, size))
            data = _call(os.read, path, fd, size + 1) if size else b""
            if len(data) != size:
                raise ScanError(f"{path!r}: the file changed size while being read")
            return InlineFile(data)
        if kind == stat.S_IFLNK:
            target = _call(os.readlink, path, name, dir_fd=dirfd)
            return Symlink(target)
        if kind == stat.S_IFCHR:
            return CharDevice(st.st_rdev)
        if kind == stat.S_IFBLK:
            return BlockDevice(st.st_rdev)
        if kind == stat.S_IFIFO:
            return Fifo()
        if kind == stat.S_IFSOCK:
            return Socket()
        raise ScanError(f"{path!r}: unknown file type {kind:#o}")  # pragma: no cover


def _stat(st: os.stat_result, xattrs: dict[bytes, bytes]) -> Stat:
    seconds, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    return Stat(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, seconds, nsec, xattrs)


def _xattrs(fd: int, path: bytes, *, real_fd: bool) -> dict[bytes, bytes]:
    """Every xattr of the inode behind ``fd`` (``O_PATH`` ones through ``/proc``)."""
    target: int | str = fd if real_fd else f"/proc/self/fd/{fd}"
    try:
        names = os.listxattr(target)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise OSError(e.errno, f"listing xattrs: {e.strerror}", os.fsdecode(path)) from None
    result: dict[bytes, bytes] = {}
    for name in names:
        value = _call(os.getxattr, path, target, name)
        result[os.fsencode(name)] = value
    return dict(sorted(result.items()))


def _listdir(fd: int, path: bytes) -> list[bytes]:
    """The names in the directory ``fd``, last popped first: byte order when popped."""
    names = [os.fsencode(n) for n in _call(os.listdir, path, fd)]
    names.sort(reverse=True)
    return names


def _checked_fstat(fd: int, kind: int, path: bytes) -> os.stat_result:
    st = os.fstat(fd)
    if stat.S_IFMT(st.st_mode) != kind:
        raise ScanError(f"{path!r}: the file type changed between readdir and open")
    return st


def _open(opener: Callable[..., int], name: bytes, flags: int, path: bytes, **kw: int) -> int:
    return _call(opener, path, name, flags, **kw)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _call(fn: Callable[_P, _R], path: bytes, *args: _P.args, **kwargs: _P.kwargs) -> _R:
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        raise OSError(e.errno, e.strerror, os.fsdecode(path)) from None
