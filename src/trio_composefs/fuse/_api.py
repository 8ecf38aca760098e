"""Mounting a composefs image with FUSE for an ``async with`` block (L2).

The image's EROFS bytes (the bytes the kernel would mount) are decoded inode by inode
as the kernel asks (:class:`~._image_table.ImageTable`, the default) or read back
whole with :func:`~trio_composefs.fs.erofs.read_erofs` and numbered
(:class:`~._inodes.InodeTable`), and served by pyfuse3 in a task of the caller's trio
run; objects are opened on demand and verified on first open (:mod:`._verify`).

pyfuse3 has one session per process: a second FUSE mount in the same process, while
one is up, is refused with :class:`~trio_composefs.MountError`.

Mount options: ``ro``, ``default_permissions`` (the kernel checks modes and owners
itself), ``fsname=composefs``, ``subtype=trio-composefs``, and ``allow_other`` when
running as root (an unprivileged user needs ``user_allow_other`` in
``/etc/fuse.conf`` for it; pass ``allow_other=True`` then). As root the mount is made
with ``mount(2)``; as another user libfuse runs the setuid ``fusermount3``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import AsyncIterator

import attrs
import pyfuse3
import trio

from .._errors import MountError
from ..fs.erofs import read_erofs
from ..hashing import HashPool
from ..mount import hold_shared_lock
from ..repository import Repository
from ._image_table import ImageTable
from ._inodes import InodeTable, Table
from ._objects import ObjectOpener, RepositoryObjects
from ._ops import ComposefsOperations
from ._verify import DEFAULT_REMEMBER, Verifier, VerifierStatistics

__all__ = ["FuseMount", "FuseStatistics", "mounted_fuse", "serve_image"]

PathArg = str | os.PathLike[str]

log = logging.getLogger("trio_composefs.fuse")

_busy = False  # pyfuse3 keeps one session per process

#: The read-ahead window asked for the mount (the kernel's default for FUSE is 128 KiB;
#: 1 MiB is the largest request FUSE sends): 2-3 times the sequential throughput.
READ_AHEAD_KB = 1024


@attrs.frozen
class FuseStatistics:
    """A snapshot of a FUSE mount's work.

    Attributes:
        inodes: inodes in the tree.
        opens: successful opens of regular files.
        open_failures: opens refused with EIO (missing or corrupt object).
        bytes_read: bytes returned by reads.
        verifier: the verification counters.
    """

    inodes: int
    opens: int
    open_failures: int
    bytes_read: int
    verifier: VerifierStatistics


@attrs.define(eq=False)
class FuseMount:
    """A live FUSE mount (given by :func:`serve_image` and :func:`mounted_fuse`).

    Attributes:
        mountpoint: where it is mounted.
        options: the mount options passed to libfuse.
    """

    mountpoint: str
    options: frozenset[str]
    _ops: ComposefsOperations
    _ended: trio.Event = attrs.field(factory=trio.Event)

    def statistics(self) -> FuseStatistics:
        ops = self._ops
        return FuseStatistics(
            inodes=len(ops.table),
            opens=ops.opens,
            open_failures=ops.open_failures,
            bytes_read=ops.bytes_read,
            verifier=ops.verifier.statistics(),
        )

    async def wait_unmounted(self) -> None:
        """Return once the FUSE session has ended (``fusermount3 -u`` from outside)."""
        await self._ended.wait()


def _options(allow_other: bool | None, extra: frozenset[str]) -> frozenset[str]:
    opts = {"ro", "default_permissions", "fsname=composefs", "subtype=trio-composefs"}
    if allow_other if allow_other is not None else os.geteuid() == 0:
        opts.add("allow_other")
    return frozenset(opts | extra)


def _read_image(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    data = bytearray()
    while len(data) < size:
        piece = os.pread(fd, min(1 << 22, size - len(data)), len(data))
        if not piece:
            break
        data += piece
    return bytes(data)


def _build(image: bytes, lazy: bool) -> Table:
    if lazy:
        return ImageTable(image)
    return InodeTable.build(read_erofs(image))


@contextlib.asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def serve_image(
    image: bytes,
    objects: ObjectOpener,
    mountpoint: PathArg,
    *,
    limiter: trio.CapacityLimiter | None = None,
    hash_pool: HashPool | None = None,
    allow_other: bool | None = None,
    options: frozenset[str] = frozenset(),
    remember: int = DEFAULT_REMEMBER,
    max_tasks: int = 64,
    lazy: bool = True,
    check_reads: bool = True,
    read_ahead_kb: int | None = READ_AHEAD_KB,
) -> AsyncIterator[FuseMount]:
    """Serve the composefs EROFS ``image`` at ``mountpoint`` for an ``async with`` block.

    The lower-level form of :func:`mounted_fuse`, for an image outside a repository:
    ``objects`` opens the objects (:class:`DirectoryObjects` for an objects
    directory). See :func:`mounted_fuse` for the other arguments; ``read_ahead_kb``
    sets the mount's read-ahead window where this process may (root: in
    ``/sys/class/bdi``; ``None`` leaves the kernel's 128 KiB).

    Raises:
        ErofsError: ``image`` is not a composefs image.
        MountError: the mount failed, or another FUSE mount is up in this process.
    """
    global _busy
    if _busy:
        raise MountError("another FUSE mount is up in this process (pyfuse3 serves one)")
    limiter = limiter if limiter is not None else trio.CapacityLimiter(8)
    table = await trio.to_thread.run_sync(_build, image, lazy, limiter=limiter)
    image_size = len(image)
    del image  # the table holds what it needs
    mountpoint = os.fspath(mountpoint)
    if not await trio.Path(mountpoint).is_dir():
        raise MountError(f"cannot mount FUSE at {mountpoint}: not a directory")
    real_mountpoint = await trio.to_thread.run_sync(os.path.realpath, mountpoint)
    opts = _options(allow_other, options)
    with contextlib.ExitStack() as stack:
        if hash_pool is None:
            hash_pool = stack.enter_context(HashPool())
        ops = ComposefsOperations(
            table,
            objects,
            Verifier(hash_pool, trio.CapacityLimiter(hash_pool.workers + 1), remember),
            limiter,
            image_size,
            check_reads,
        )
        stack.callback(ops.close_all)
        _busy = True
        stack.callback(_set_idle)
        await trio.to_thread.run_sync(
            functools.partial(_init, ops, mountpoint, set(opts)), limiter=limiter
        )
        stack.callback(pyfuse3.close, unmount=True)
        mount = FuseMount(mountpoint, opts, ops)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_session, mount, max_tasks)
            try:
                if read_ahead_kb:
                    await trio.to_thread.run_sync(
                        _raise_read_ahead, real_mountpoint, read_ahead_kb, limiter=limiter
                    )
                yield mount
            finally:
                pyfuse3.terminate()


def _init(ops: ComposefsOperations, mountpoint: str, options: set[str]) -> None:
    """``pyfuse3.init``, undone if the mount fails (libfuse printed why on stderr)."""
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        if "mount" in str(e):  # the session exists, the mount failed
            pyfuse3.close(unmount=False)
        raise MountError(
            f"cannot mount FUSE at {mountpoint}: {e} (is /dev/fuse usable, is fusermount3"
            " installed, is the mountpoint already in use?)"
        ) from None


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _raise_read_ahead(target: str, kib: int) -> None:
    """Best effort: set the FUSE mount's ``read_ahead_kb`` (its bdi in /sys, root only).

    ``target`` is the mountpoint's real path, resolved before the mount. Called once
    the session runs: the ``stat`` first waits for the FUSE handshake (INIT), which
    would otherwise lower the window again. The device number comes from
    ``/proc/self/mountinfo`` (a ``realpath`` now would ask the server too).
    """
    try:
        os.stat(target)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        devs = [
            line.split()[2]
            for line in lines
            if _unescape_mountinfo(line.split()[4]) == target
            and line.split(" - ", 1)[1].startswith("fuse")
        ]
        if devs:
            with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
                f.write(str(kib))
    except (OSError, IndexError) as e:
        log.debug("cannot raise the read-ahead of %s: %s", target, e)


def _set_idle() -> None:
    global _busy
    _busy = False


async def _run_session(mount: FuseMount, max_tasks: int) -> None:
    try:
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
    finally:
        mount._ended.set()


def _load_image(repo: Repository, name: str) -> bytes:
    _digest, fd = repo.open_image(name)
    try:
        return _read_image(fd)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def mounted_fuse(
    repo: Repository,
    name: str,
    mountpoint: PathArg,
    *,
    limiter: trio.CapacityLimiter | None = None,
    hash_pool: HashPool | None = None,
    allow_other: bool | None = None,
    options: frozenset[str] = frozenset(),
    remember: int = DEFAULT_REMEMBER,
    lazy: bool = True,
    check_reads: bool = True,
) -> AsyncIterator[FuseMount]:
    """Mount the repository's image ``name`` with FUSE for an ``async with`` block.

    The image is resolved as :meth:`Repository.open_image
    <trio_composefs.repository.Repository.open_image>` does (hex digest,
    ``refs/<ref>`` or a ref name), read, and served read-only by a task of this
    trio run until the block ends; the repository's shared lock is held meanwhile,
    so gc waits. The first open of each external file verifies its object and
    every read of a large one is checked again (see :mod:`trio_composefs.fuse`); a
    corrupt object makes opens and reads of its files fail with EIO. Do not touch
    the mountpoint from the trio thread itself (the server runs there): use worker
    threads or other processes.

    Args:
        repo: an open repository (kept open for the block).
        name: the image's hex digest, ``refs/<ref>`` or a ref name.
        mountpoint: an existing directory.
        limiter: worker-thread limiter for opens and reads (default: a new one of 8
            tokens); the verifying hashes have their own.
        hash_pool: the pool verifying objects (default: a new one, closed on exit).
        allow_other: let other users in (default: when running as root).
        options: further libfuse mount options.
        remember: how many verified (and refused) objects to remember.
        lazy: decode the image inode by inode as the kernel asks (memory: the image's
            bytes and small caches); with ``False``, read the whole tree up front
            (:func:`~trio_composefs.fs.erofs.read_erofs`: every inode checked before
            the mount, memory growing with the tree).
        check_reads: check every read of a large object against the level-1
            digests of its first open (it costs read throughput: each 512 KiB
            group is hashed again as it is read); with
            ``False`` only the first open is checked.

    Cancellation:
        Cancelling the block unmounts, as leaving it does: the session is ended,
        the mount detached (``fusermount3 -u -z`` for an unprivileged user) and
        every object fd closed, synchronously, so a cancelled or Ctrl-C'd block
        leaves nothing mounted.

    Raises:
        ObjectNotFoundError: no such image.
        ErofsError: the image is corrupt.
        MountError: the mount failed.
    """
    limiter = limiter if limiter is not None else trio.CapacityLimiter(8)
    lock = hold_shared_lock(repo)
    await trio.to_thread.run_sync(lock.__enter__, limiter=limiter)
    try:
        async with serve_image(
            await trio.to_thread.run_sync(_load_image, repo, name, limiter=limiter),
            RepositoryObjects(repo),
            mountpoint,
            limiter=limiter,
            hash_pool=hash_pool,
            allow_other=allow_other,
            options=options,
            remember=remember,
            lazy=lazy,
            check_reads=check_reads,
        ) as mount:
            yield mount
    finally:
        lock.__exit__(None, None, None)
