"""The hash worker process of :class:`trio_composefs.hashing.HashPool`.

Started by the pool as ``python -P -m trio_composefs.hashing._worker SOCKET_FD PARENT_PID``,
``SOCKET_FD`` being the worker's end of a ``SOCK_SEQPACKET`` socket pair and its only
inherited fd. The package roots are lazy, so this imports neither trio nor the pool.
Each job is a message carrying one file descriptor (``SCM_RIGHTS``) and a :data:`JOB`
header; the reply is :data:`OK` and the level-1 digests of the range (or the file's
digest), or :data:`FAILED` and a pickled exception. A :data:`STORE_OBJECTS` job
carries two descriptors (a repository's ``objects/`` directory and a memfd holding
a batch of small objects, one after the other), its header the number of objects
and their total size, followed by each object's size (``<Q``); the worker stores
them (:func:`~trio_composefs.hashing._objstore.store_objects`) and replies with
each one's digest and "already present" byte. The worker exits when the socket
reaches EOF, which happens when the pool closes it or the parent dies.

This module is also imported by the pool for the protocol and the pread
helpers, so it imports only the standard library and :mod:`trio_composefs.formats`.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import sys

from .._errors import ComposefsError
from ..formats._fsverity import Algorithm, digest_from_level1, level1_digests
from ._objstore import store_objects

#: Bytes read per pread; a multiple of both level-1 group sizes (512 KiB, 256 KiB).
READ_SIZE = 1 << 20
#: Job header: offset, length, hash algorithm kernel id, flags.
JOB = struct.Struct("<QQBB")
#: Job flag: the range is the whole file; reply with its fs-verity digest.
WHOLE_FILE = 1
#: Job flag, for fault-injection tests only (:mod:`trio_composefs.testing`): read half
#: the range, then die by SIGKILL, as a worker that crashes mid-file would.
DIE_MID_JOB = 2
#: Job flag: store a batch of objects (offset: how many, length: their total size).
STORE_OBJECTS = 4
#: Job flag, with STORE_OBJECTS: use named temporary files (no ``O_TMPFILE``).
NAMED_TMPFILES = 8
#: Most objects in one STORE_OBJECTS job (each holds an fd until the batch is named).
STORE_MAX_OBJECTS = 256
#: One object size in a STORE_OBJECTS job message.
STORE_SIZE = struct.Struct("<Q")
#: Largest job message.
JOB_MAX = JOB.size + STORE_SIZE.size * STORE_MAX_OBJECTS
#: First byte of a reply: level-1 digests (or the digest) follow.
OK = b"\0"
#: First byte of a reply: a pickled exception follows.
FAILED = b"\1"
#: Largest reply: level-1 digests of a job of at most 16 MiB, or a pickled error.
REPLY_MAX = 1 << 16

_PR_SET_PDEATHSIG = 1


def pread_exactly(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``, or fail if the file ends first.

    Raises:
        ComposefsError: the file ends before ``buf`` is full.
        OSError: ``fd`` cannot be read.
    """
    got = 0
    want = len(buf)
    while got < want:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise ComposefsError(
                f"file ended at byte {offset + got} while hashing: expected at least"
                f" {offset + want} bytes (was it truncated while being read?)"
            )
        got += n


def hash_range(fd: int, offset: int, length: int, algorithm: Algorithm, buf: memoryview) -> bytes:
    """Level-1 digests of ``length`` bytes of ``fd`` from the group-aligned ``offset``."""
    out = []
    end = offset + length
    while offset < end:
        chunk = buf[: min(len(buf), end - offset)]
        pread_exactly(fd, chunk, offset)
        out.append(level1_digests(chunk, algorithm))
        offset += len(chunk)
    return b"".join(out)


def _run_job(msg: bytes, fds: list[int], buf: memoryview) -> bytes:
    """The reply to one job message."""
    try:
        if len(msg) >= JOB.size and JOB.unpack_from(msg)[3] & STORE_OBJECTS:
            return OK + _store_job(msg, fds)
        if len(msg) != JOB.size or len(fds) != 1:
            raise ComposefsError(f"hash worker: malformed job ({len(msg)} bytes, {len(fds)} fds)")
        offset, length, alg_id, flags = JOB.unpack(msg)
        algorithm = Algorithm.from_kernel_id(alg_id)
        if flags & DIE_MID_JOB:
            pread_exactly(fds[0], buf[: min(len(buf), length // 2)], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        level1 = hash_range(fds[0], offset, length, algorithm, buf)
        if flags & WHOLE_FILE:
            level1 = digest_from_level1(algorithm, length, level1).raw
        return OK + level1
    except Exception as exc:
        return FAILED + _pickle_error(exc)
    finally:
        for fd in fds:
            os.close(fd)


_STORE_BUFFER = [memoryview(bytearray(0))]


def _store_buffer(size: int) -> memoryview:
    """``size`` bytes of the worker's one batch buffer, grown as needed and then kept:
    a fresh buffer per batch would cost a page fault per 4 KiB, about one per object."""
    if len(_STORE_BUFFER[0]) < size:
        _STORE_BUFFER[0] = memoryview(bytearray(max(size, 2 * len(_STORE_BUFFER[0]))))
    return _STORE_BUFFER[0][:size]


def _store_job(msg: bytes, fds: list[int]) -> bytes:
    """Store the batch of a STORE_OBJECTS job: ``fds`` are ``[objects dir, memfd]``."""
    count, total, alg_id, flags = JOB.unpack_from(msg)
    if len(fds) != 2 or len(msg) != JOB.size + STORE_SIZE.size * count:
        raise ComposefsError(f"hash worker: malformed store job ({len(msg)} bytes, {len(fds)} fds)")
    sizes = [size for (size,) in STORE_SIZE.iter_unpack(msg[JOB.size :])]
    data = _store_buffer(total)
    pread_exactly(fds[1], data, 0)
    return store_objects(
        fds[0],
        data,
        sizes,
        Algorithm.from_kernel_id(alg_id),
        named=bool(flags & NAMED_TMPFILES),
        die_after=count // 2 if flags & DIE_MID_JOB else None,
    )


def _pickle_error(exc: Exception) -> bytes:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
    except Exception:
        data = b""
    if not data or len(data) >= REPLY_MAX:
        data = pickle.dumps(ComposefsError(f"hash worker: {type(exc).__name__}: {exc}"[:4000]))
    return data


def serve(sock: socket.socket) -> None:
    """Answer jobs from ``sock`` until it reaches EOF (or fails)."""
    buf = memoryview(bytearray(READ_SIZE))
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, JOB_MAX, 2)
        except OSError:
            return
        if not msg:  # the parent closed its end, or died
            for fd in fds:
                os.close(fd)
            return
        reply = _run_job(msg, fds, buf)
        try:
            sock.send(reply)
        except OSError:  # the parent gave up on us
            return


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when our parent dies, even while we are busy.

    EOF on the socket already ends an idle worker; this also ends one in the
    middle of a long job. The parent starts workers from one long-lived
    thread, since Linux sends the signal when the *thread* that forked us
    exits.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no usable libc
            pass
    if os.getppid() != parent_pid:  # it died before we asked
        sys.exit(0)


def main(argv: list[str]) -> None:
    """Entry point: ``argv`` is ``[SOCKET_FD, PARENT_PID]``."""
    # Ctrl-C in a terminal goes to the whole process group; the parent decides
    # when we stop, by closing our socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock_fd, parent_pid = (int(arg) for arg in argv)
    _die_with_parent(parent_pid)
    with socket.socket(fileno=sock_fd) as sock:
        serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
