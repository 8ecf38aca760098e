"""``mount --fuse`` and ``oci mount --fuse``: serve an image with FUSE (L3).

In the foreground (the default) the command serves the mount until Ctrl-C, SIGTERM
or SIGHUP (it then unmounts and exits 0) or until someone runs ``fusermount3 -u
MOUNTPOINT`` (it exits 0 too). With ``--background`` it starts a copy of itself in a
new session, waits until that copy reports the mount ready, prints its pid and
exits: unmount with ``fusermount3 -u MOUNTPOINT`` (or ``umount`` as root), which ends
the server. The server writes to the terminal's stderr until the mount is ready, then
detaches from it: its log (corrupt objects) goes to syslog (``/dev/log``) if there is one.

Works as an unprivileged user (libfuse runs the setuid ``fusermount3``). Without
``pyfuse3`` the command fails with a message saying how to install it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import TextIO

import trio

from .._errors import MountError
from ..repository import Repository
from ._commands import PROG, _open_repo, _repo_path

__all__ = ["add_fuse_options", "fuse_mount_command"]


def add_fuse_options(parser: argparse.ArgumentParser) -> None:
    """``--fuse``, ``--background`` and the hidden ``--ready-fd``."""
    parser.add_argument(
        "--fuse",
        action="store_true",
        help="serve the image with FUSE (unprivileged, read-only, every object verified)",
    )
    parser.add_argument(
        "--background",
        action="store_true",
        help="with --fuse: detach once the mount is ready (unmount: fusermount3 -u)",
    )
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)


def fuse_mount_command(
    args: argparse.Namespace, out: TextIO, name_of: Callable[[Repository], str]
) -> int:
    """Run ``mount --fuse`` / ``oci mount --fuse``: resolve, then serve or detach."""
    from ..fuse import require_fuse

    require_fuse()
    if args.upperdir or args.workdir:
        raise MountError("a FUSE mount is read-only: --upperdir and --workdir do not apply")
    mountpoint = str(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} does not exist or is not a directory")
    with _open_repo(args) as repo:
        name = name_of(repo)
        if args.background:
            digest = repo.resolve_image(name).hex()
    if args.background:
        return _detach(args, out, digest, mountpoint)
    return trio.run(_serve, args, out, name, mountpoint)


async def _serve(args: argparse.Namespace, out: TextIO, name: str, mountpoint: str) -> int:
    from ..fuse import mounted_fuse

    with _open_repo(args) as repo:
        async with mounted_fuse(repo, name, mountpoint) as mount:
            if repo.insecure:
                print(
                    f"{PROG}: note: repository {repo.path} is insecure: the FUSE server checks"
                    " each object's fs-verity digest in userspace on first open",
                    file=sys.stderr,
                )
            print(
                f"serving {name} at {mountpoint} with FUSE"
                + ("" if args.ready_fd is not None else "; Ctrl-C unmounts"),
                file=out,
                flush=True,
            )
            if args.ready_fd is not None:
                os.write(args.ready_fd, b"ready\n")
                os.close(args.ready_fd)
                _detach_output()
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                async with trio.open_nursery() as nursery:

                    async def on_signal() -> None:
                        async for _ in sigs:
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(on_signal)
                    await mount.wait_unmounted()
                    nursery.cancel_scope.cancel()
    if args.ready_fd is None:
        print(f"unmounted {mountpoint}", file=out, flush=True)
    return 0


def _detach_output() -> None:
    """Once detached: stdout and stderr to /dev/null (so that a caller capturing them is
    not kept waiting), the server's log (corrupt objects) to syslog where there is one."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    if os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("trio-cfsctl[%(process)d]: %(message)s"))
        logging.getLogger("trio_composefs.fuse").addHandler(handler)


def _detach(args: argparse.Namespace, out: TextIO, digest: str, mountpoint: str) -> int:
    """Start the server in a new session; return once it says the mount is ready."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    argv = [sys.executable, "-m", "trio_composefs", "--repo", _repo_path(args)]
    argv += ["--insecure"] * bool(args.insecure) + ["--debug"] * bool(args.debug)
    argv += ["mount", "--fuse", "--ready-fd", str(write_end), digest, mountpoint]
    try:
        with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
            child = subprocess.Popen(
                argv,
                stdin=devnull_in,
                stdout=devnull_out,
                pass_fds=(write_end,),
                start_new_session=True,
            )
    finally:
        os.close(write_end)
    with contextlib.closing(os.fdopen(read_end, "rb")) as ready:
        said = ready.read()
    if said.startswith(b"ready"):
        print(
            f"serving {digest} at {mountpoint} with FUSE (pid {child.pid});"
            f" unmount with fusermount3 -u {mountpoint}",
            file=out,
            flush=True,
        )
        return 0
    code = child.wait()
    raise MountError(f"the FUSE server for {mountpoint} exited ({code}) before the mount was ready")
