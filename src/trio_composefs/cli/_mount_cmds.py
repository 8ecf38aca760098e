"""``mount``, ``oci mount`` and ``transaction``: the kernel mount commands (L3).

The mount commands leave the image mounted when they exit (unmount with ``umount
MOUNTPOINT``), as cfsctl's do; they hold no lock afterwards, so only an image that a
ref (``images/refs/...``, or an OCI tag whose config names its ``composefs.image.v1``
image) keeps alive is safe from ``gc``. ``transaction`` holds the repository's
shared lock until interrupted: ``gc`` waits meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

import trio

from .._errors import ComposefsError, MountError, ObjectNotFoundError
from ..repository import Repository
from ._commands import PROG, _open_repo, _repo_path
from ._fuse_cmds import add_fuse_options, fuse_mount_command

__all__ = ["add_mount_parsers", "cmd_mount", "cmd_oci_mount", "cmd_transaction"]

INSECURE_NOTE = (
    f"{PROG}: note: repository {{path}} is insecure: file contents are not verified"
    " by the kernel (no fs-verity)"
)


def add_mount_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    oci_sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``mount``, ``transaction`` to ``sub`` and ``mount`` to ``oci_sub``."""
    mount = sub.add_parser(
        "mount", help="mount a composefs image (by digest or images/refs name); umount to undo"
    )
    mount.add_argument("name", metavar="NAME", help="the image's hex digest, refs/REF or REF")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    _add_mount_options(mount)
    oci_mount = oci_sub.add_parser(
        "mount", help="mount an image's composefs.image.v1 image (built if missing)"
    )
    oci_mount.add_argument("image", metavar="IMAGE", help="a tag, or @sha256:... (manifest)")
    oci_mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    _add_mount_options(oci_mount)
    sub.add_parser(
        "transaction",
        help="hold the repository's shared lock until interrupted (gc waits meanwhile)",
    )


def _add_mount_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upperdir", metavar="DIR", help="writable layer (needs --workdir)")
    parser.add_argument("--workdir", metavar="DIR", help="overlayfs work directory")
    add_fuse_options(parser)


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[list[int]]:
    """Record SIGINT instead of raising KeyboardInterrupt inside the block (main thread only).

    A KeyboardInterrupt raised between the kernel's mount and the code that would undo it
    would leave the image mounted by a command that reports "interrupted": the block
    runs uninterrupted and the caller looks at the list afterwards.
    """
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, previous)


def _mount_command(
    args: argparse.Namespace, out: TextIO, name_of: Callable[[Repository], str]
) -> int:
    """Open the repository, find the image, mount it; a Ctrl-C at any point leaves no mount.

    Ctrl-C while the name is resolved (or the image built) stops there; during the
    mount it is deferred until the mount is made, which is then undone before the
    command reports "interrupted" (exit 130).
    """
    from ..mount import mount_image, unmount

    if args.fuse:
        return fuse_mount_command(args, out, name_of)
    if args.background:
        raise MountError("--background applies to --fuse mounts only")
    mountpoints: list[str] = []
    try:
        with _open_repo(args) as repo:
            name = name_of(repo)
            with _deferred_sigint() as interrupted:
                result = mount_image(
                    repo, name, args.mountpoint, upperdir=args.upperdir, workdir=args.workdir
                )
                mountpoints.append(result.mountpoint)
                if interrupted:
                    raise KeyboardInterrupt
            if repo.insecure:
                print(INSECURE_NOTE.format(path=repo.path), file=sys.stderr)
            if args.debug:
                print(result.describe(), file=out)
        return 0
    except KeyboardInterrupt:
        for mountpoint in mountpoints:
            unmount(mountpoint)
        raise


def cmd_mount(args: argparse.Namespace, out: TextIO) -> int:
    """Mount an image named by digest or ``images/refs`` name; it stays mounted."""
    name: str = args.name

    def checked(repo: Repository) -> str:
        try:
            repo.resolve_image(name)
        except ObjectNotFoundError as e:
            from ..oci import resolve_tag

            try:
                resolve_tag(repo, name)
            except (ObjectNotFoundError, ValueError, ComposefsError):
                raise e from None
            raise ObjectNotFoundError(
                f"{e}; {name!r} is an OCI tag: mount it with `{PROG} oci mount {name} ...`"
            ) from None
        return name

    return _mount_command(args, out, checked)


def _oci_image_digest(repo: Repository, image: str) -> str:
    """The hex digest of ``image``'s ``composefs.image.v1`` image, building it if missing."""
    from ..oci import open_image
    from ..oci._build import ensure_oci_image

    return ensure_oci_image(repo, open_image(repo, image)).hex()


def cmd_oci_mount(args: argparse.Namespace, out: TextIO) -> int:
    """Mount an OCI image (tag or manifest digest) through its composefs image."""
    image: str = args.image
    return _mount_command(args, out, lambda repo: _oci_image_digest(repo, image))


def cmd_transaction(args: argparse.Namespace, out: TextIO) -> int:
    """Hold the shared lock until SIGINT or SIGTERM; exit 0 then."""
    from ..mount import hold_shared_lock

    path = _repo_path(args)
    with Repository.open(path, insecure=True if args.insecure else None) as repo:

        def waiting() -> None:
            print(f"{PROG}: waiting for a gc on {path} to finish", file=sys.stderr)

        with hold_shared_lock(repo, on_wait=waiting):
            print(
                f"holding the shared lock on {path} (gc waits) until interrupted (Ctrl-C)",
                file=out,
                flush=True,
            )

            async def wait_for_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        return

            trio.run(wait_for_signal)
    print(f"released the lock on {path}", file=out, flush=True)
    return 0
