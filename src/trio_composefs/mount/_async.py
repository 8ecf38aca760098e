"""The trio shell over the kernel mount: mount in a thread, unmount on exit (L2)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import trio

from ._kernel import MountResult, PathArg, mount_image_file, unmount

__all__ = ["mounted"]


@contextlib.asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def mounted(
    image: int | PathArg,
    objects_dir: int | PathArg,
    mountpoint: PathArg,
    *,
    verity: bool = False,
    upperdir: PathArg | None = None,
    workdir: PathArg | None = None,
    force_loop: bool = False,
) -> AsyncIterator[MountResult]:
    """Mount a composefs image for the duration of an ``async with`` block.

    The arguments are those of :func:`~trio_composefs.mount.mount_image_file`
    (paths, or fds the caller keeps open until the block is entered). The
    mount is made in a worker thread and the block receives its
    :class:`~trio_composefs.mount.MountResult`; on exit, whatever the reason,
    the mountpoint is unmounted.

    Cancellation:
        The mount itself is not abandoned: a cancellation that arrives while the
        thread mounts takes effect once it is done, and the mount is then
        undone. The unmount on exit runs shielded, so a cancelled or failing
        block never leaves the image mounted. If the unmount itself fails (a
        file under the mountpoint still open, EBUSY), :class:`MountError` is
        raised from the exit, chained to the block's own exception if any.
        The generator is protected from KeyboardInterrupt (Ctrl-C is delivered
        at the block's checkpoints instead), so a Ctrl-C cannot land between
        the mount and the ``try`` that undoes it.

    Raises:
        MountError: the mount or the final unmount failed.
    """
    result = await trio.to_thread.run_sync(
        functools.partial(
            mount_image_file,
            image,
            objects_dir,
            mountpoint,
            verity=verity,
            upperdir=upperdir,
            workdir=workdir,
            force_loop=force_loop,
        ),
        abandon_on_cancel=False,
    )
    try:
        yield result
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(unmount, result.mountpoint)
