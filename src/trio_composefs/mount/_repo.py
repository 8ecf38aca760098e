"""Mounting a repository's images: resolve the name, pick verity, hold the lock (L2).

An image is named as :meth:`Repository.open_image
<trio_composefs.repository.Repository.open_image>` names it: its hex digest
(``images/<hex>``), ``refs/<ref>`` or a bare ref name (``images/refs/<ref>``). The
image object and the repository's ``objects/`` directory are handed to
:func:`~trio_composefs.mount.mount_image_file` as fds opened relative to the
repository's directory fd, so a rename of the repository path cannot swap them.

Verity: in a secure repository (``not repo.insecure``) the overlay is mounted with
``verity=require``, so every file's object must carry the fs-verity digest the
image records; an image named by its digest is measured first (its own fs-verity
digest must equal its name), as composefs-rs does. In an insecure repository
neither happens: the kernel serves whatever bytes ``objects/`` holds.

The shared lock: a :class:`~trio_composefs.repository.Repository` holds a shared
``flock`` on its directory while open, and garbage collection takes it exclusively.
:func:`mounted_image` takes its own shared lock (on a separate open file
description of the repository directory, so it stays held even if the caller
closes ``repo`` early) before resolving the name, and releases it only after the
unmount: gc waits while such a mount is up. :func:`mount_image` cannot: its mount
outlives the call (as ``cfsctl mount``'s outlives the process), so an image it
mounted is protected from gc only by being named under ``images/refs/`` (or by an
OCI tag whose config names it).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import AsyncIterator, Callable, Iterator

import trio

from .._errors import MountError
from ..repository import OBJECTS, Repository
from ._async import mounted
from ._kernel import MountResult, PathArg, mount_image_file

__all__ = ["hold_shared_lock", "mount_image", "mounted_image"]


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _shared_lock_fd(repo: Repository, on_wait: Callable[[], object] | None = None) -> int:
    """A new fd on ``repo``'s directory holding a shared ``flock``; blocks while gc runs."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=repo.dirfd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def hold_shared_lock(
    repo: Repository, *, on_wait: Callable[[], object] | None = None
) -> Iterator[None]:
    """Hold a shared ``flock`` on ``repo``'s directory for the ``with`` block (blocking).

    The lock is taken on a fresh open file description of the directory, so it is
    independent of ``repo``'s own (closing ``repo`` inside the block does not drop
    it) and conflicts with a garbage collection in this process too. While it is
    held, :func:`~trio_composefs.maintenance.gc` waits. This is ``trio-cfsctl
    transaction``'s lock.

    Args:
        on_wait: called once, before blocking, if gc holds the lock exclusively.
    """
    fd = _shared_lock_fd(repo, on_wait)
    try:
        yield
    finally:
        os.close(fd)


def _open_for_mount(repo: Repository, name: str) -> tuple[int, int]:
    """``(image_fd, objects_fd)`` for the image ``name``; the caller closes both."""
    _digest, image_fd = repo.open_image(name)
    try:
        try:
            objects_fd = repo.open_objects_dir()
        except OSError as e:
            raise MountError(
                f"repository {repo.path} has no readable {OBJECTS}/ directory: {e.strerror}",
                errno=e.errno,
            ) from None
    except BaseException:
        os.close(image_fd)
        raise
    return image_fd, objects_fd


def mount_image(
    repo: Repository,
    name: str,
    mountpoint: PathArg,
    *,
    upperdir: PathArg | None = None,
    workdir: PathArg | None = None,
    force_loop: bool = False,
) -> MountResult:
    """Mount the repository's image ``name`` at ``mountpoint`` and return (blocking).

    Unmount with :func:`~trio_composefs.mount.unmount` or ``umount MOUNTPOINT``.
    The mount outlives this call and holds no repository lock: see the module
    notes on gc. For a mount scoped to a block that does hold the lock, use
    :func:`mounted_image`.

    Args:
        repo: an open repository.
        name: the image's hex digest, ``refs/<ref>`` or a ref name.
        mountpoint: an existing empty directory with nothing mounted on it.
        upperdir, workdir: both or neither, for a writable mount (as C
            ``mount.composefs --upperdir --workdir``).
        force_loop: use the loop-device fallback even where file-backed EROFS works.

    Returns:
        How it was mounted (``verity`` is true exactly when ``repo`` is secure).

    Raises:
        ObjectNotFoundError: no image of that name (or its object is missing).
        DigestMismatchError: in a secure repository, an image named by digest
            whose fs-verity digest differs (or is absent).
        MountError: see :func:`~trio_composefs.mount.mount_image_file`; nothing
            is left mounted.
    """
    image_fd, objects_fd = _open_for_mount(repo, name)
    try:
        return mount_image_file(
            image_fd,
            objects_fd,
            mountpoint,
            verity=not repo.insecure,
            upperdir=upperdir,
            workdir=workdir,
            force_loop=force_loop,
        )
    finally:
        os.close(objects_fd)
        os.close(image_fd)


@contextlib.asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def mounted_image(
    repo: Repository,
    name: str,
    mountpoint: PathArg,
    *,
    upperdir: PathArg | None = None,
    workdir: PathArg | None = None,
    force_loop: bool = False,
    on_lock_wait: Callable[[], object] | None = None,
) -> AsyncIterator[MountResult]:
    """Mount the repository's image ``name`` for an ``async with`` block, holding its lock.

    In order: take a shared lock on the repository (waiting while a gc runs),
    resolve and open the image (measuring it if named by digest in a secure
    repository), mount it (``verity=require`` when secure) and run the block;
    on exit, whatever the reason, unmount, then release the lock. While the
    block runs, gc cannot collect any object the mount serves. The arguments are
    those of :func:`mount_image`.

    Args:
        on_lock_wait: called once (in a worker thread) if the lock is busy.

    Cancellation:
        Taking the lock, opening and mounting run in worker threads that are
        not abandoned: a cancellation takes effect once the step is done, and
        everything already done is undone (the unmount runs shielded, the lock
        fd is closed synchronously). Ctrl-C is delivered at the block's
        checkpoints, never between the mount and the code that undoes it. As
        :func:`~trio_composefs.mount.mounted`, a failing unmount raises
        :class:`MountError` from the exit.

    Raises:
        ObjectNotFoundError, DigestMismatchError, MountError: as :func:`mount_image`.
    """
    lock_fd = await trio.to_thread.run_sync(
        functools.partial(_shared_lock_fd, repo, on_lock_wait), abandon_on_cancel=False
    )
    try:
        image_fd, objects_fd = await trio.to_thread.run_sync(
            _open_for_mount, repo, name, abandon_on_cancel=False
        )
        try:
            async with mounted(
                image_fd,
                objects_fd,
                mountpoint,
                verity=not repo.insecure,
                upperdir=upperdir,
                workdir=workdir,
                force_loop=force_loop,
            ) as result:
                _close_quietly(objects_fd)
                _close_quietly(image_fd)
                objects_fd = image_fd = -1
                yield result
        finally:
            for fd in (objects_fd, image_fd):
                if fd >= 0:
                    _close_quietly(fd)
    finally:
        os.close(lock_fd)
