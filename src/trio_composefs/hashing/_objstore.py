"""Storing a batch of small objects in a hash worker process (blocking, stdlib + formats only).

A batch is a run of objects whose bytes are held in one buffer, one after the
other. :func:`store_objects` stores them in a repository's ``objects/`` directory
with the same durability rules as :class:`~trio_composefs.repository.ObjectTmpfile`:

1. every object is written to its own temporary file (``O_TMPFILE``, or a named
   ``.tmp-object-*`` file where the filesystem has no ``O_TMPFILE``);
2. only once *every* object of the batch is written is any of them named: each
   is linked as ``XX/rest`` under its fs-verity digest, computed from the bytes
   in memory (``XX/`` is made when the link says ``ENOENT``). An existing entry of
   that name counts as present and the new copy is discarded (``EEXIST``: the
   dedup check costs no extra syscall);
3. whatever happens, every temporary file is closed, and a named one not linked
   is unlinked.

So a batch that fails while writing leaves nothing named, and a named object is
always complete. Nothing is synced: the layer's one ``syncfs`` comes before its
stream is named (:func:`~trio_composefs.repository.publish_after_sync`).

Per object: ``open``, ``write``, ``linkat``, ``close`` (plus ``mkdir`` for the
first object of a directory). The kernel-measured case (fs-verity enabled on the
filesystem) does not come here: the repository enables verity on each object.

Used by the worker (``_worker``) and, in-process, by tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import string
from collections.abc import Sequence
from typing import Any

from ..formats._fsverity import Algorithm, fsverity_digest_raw

__all__ = [
    "NO_TMPFILE_ERRNOS",
    "TMP_OBJECT_PREFIX",
    "link_tmpfile",
    "object_name",
    "store_objects",
]

#: ``open(O_TMPFILE)`` errors that mean "not supported here": use a named file.
NO_TMPFILE_ERRNOS = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)
#: Prefix of named temporary files in ``objects/`` (the repository's, see ``find_stray_tmpfiles``).
TMP_OBJECT_PREFIX = ".tmp-object-"

_ALNUM = string.ascii_letters + string.digits
_TMPFILE_FLAGS = os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC
_NAMED_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def object_name(raw: bytes) -> str:
    """An object's path below ``objects/`` from its raw digest: ``XX/rest`` (the
    repository's layout, ``repository/_layout.py``, spelled again here because the
    worker imports no repository code; a test keeps the two equal)."""
    hexdigest = raw.hex()
    return f"{hexdigest[:2]}/{hexdigest[2:]}"


def _open_tmp(objects_fd: int, named: bool) -> tuple[int, str | None]:
    if not named:
        try:
            return os.open(".", _TMPFILE_FLAGS, 0o644, dir_fd=objects_fd), None
        except OSError as e:
            if e.errno not in NO_TMPFILE_ERRNOS:
                raise
    for _ in range(16):
        name = TMP_OBJECT_PREFIX + "".join(secrets.choice(_ALNUM) for _ in range(12))
        try:
            return os.open(name, _NAMED_FLAGS, 0o644, dir_fd=objects_fd), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name in objects/")


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


_AT_EMPTY_PATH = 0x1000
_linkat_empty: Any = None
"""``linkat(fd, "", dirfd, path, AT_EMPTY_PATH)`` from libc, while it works here (see below)."""
_empty_path_tried = False


def _load_linkat() -> None:
    global _linkat_empty, _empty_path_tried
    _empty_path_tried = True
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        return
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    func.restype = ctypes.c_int
    _linkat_empty = (func, ctypes.get_errno)


def link_tmpfile(objects_fd: int, fd: int, path: str) -> None:
    """Link an ``O_TMPFILE`` file as ``path``.

    ``linkat`` with ``AT_EMPTY_PATH`` saves the kernel a walk through
    ``/proc/self/fd`` (~6 µs an object on a small VM), but needs
    ``CAP_DAC_READ_SEARCH``: without it the kernel says ``ENOENT``, which a
    missing ``XX/`` directory says too. So ``ENOENT`` is answered by the
    ``/proc`` path: it raises ``FileNotFoundError`` itself if ``XX/`` is missing,
    and if it succeeds, ``AT_EMPTY_PATH`` is not allowed here and is not tried
    again in this process.
    """
    global _linkat_empty
    if not _empty_path_tried:
        _load_linkat()
    if _linkat_empty is not None:
        func, get_errno = _linkat_empty
        if func(fd, b"", objects_fd, path.encode(), _AT_EMPTY_PATH) == 0:
            return
        err = get_errno()
        if err != errno.ENOENT:
            raise OSError(err, os.strerror(err), path)
    os.link(f"/proc/self/fd/{fd}", path, dst_dir_fd=objects_fd, follow_symlinks=True)
    _linkat_empty = None  # the /proc path worked where AT_EMPTY_PATH did not


def _link_once(objects_fd: int, fd: int, name: str | None, path: str) -> bool:
    """Link the temporary file as ``path``; True when ``path`` already existed."""
    try:
        if name is None:
            link_tmpfile(objects_fd, fd, path)
        else:
            os.link(name, path, src_dir_fd=objects_fd, dst_dir_fd=objects_fd)
    except FileExistsError:
        return True
    return False


def _link(objects_fd: int, fd: int, name: str | None, path: str) -> bool:
    try:
        return _link_once(objects_fd, fd, name, path)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path[:2], 0o755, dir_fd=objects_fd)
    return _link_once(objects_fd, fd, name, path)


def store_objects(
    objects_fd: int,
    data: memoryview,
    sizes: Sequence[int],
    algorithm: Algorithm,
    *,
    named: bool = False,
    die_after: int | None = None,
) -> bytes:
    """Store ``data``, cut into objects of ``sizes`` bytes, in the ``objects/`` dir ``objects_fd``.

    Returns, for each object in order, its raw digest followed by one byte: 1 if an
    entry of that name was already present (the new copy is discarded), else 0.

    ``named`` forces named temporary files (as ``Repository.force_named_tmpfile``).
    ``die_after`` is for fault-injection tests, in a worker process only: the process
    kills itself (SIGKILL) after writing that many objects, before naming any.

    Raises:
        ValueError: ``sizes`` do not add up to ``len(data)``.
        OSError: an object could not be written or linked (those linked before are
            complete; nothing is named when a write fails).
    """
    if sum(sizes) != len(data):
        raise ValueError(f"object sizes add up to {sum(sizes)}, the batch has {len(data)} bytes")
    tmps: list[tuple[int, str | None]] = []
    try:
        offset = 0
        for i, size in enumerate(sizes):
            if die_after is not None and i == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            fd, name = _open_tmp(objects_fd, named)
            tmps.append((fd, name))
            _write_all(fd, data[offset : offset + size])
            offset += size
        out = []
        offset = 0
        for (fd, name), size in zip(tmps, sizes, strict=True):
            raw = fsverity_digest_raw(data[offset : offset + size], algorithm)
            offset += size
            present = _link(objects_fd, fd, name, object_name(raw))
            out.append(raw + (b"\1" if present else b"\0"))
        return b"".join(out)
    finally:
        for fd, name in tmps:
            os.close(fd)
            if name is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=objects_fd)
