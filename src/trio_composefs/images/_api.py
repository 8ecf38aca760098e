"""The image functions of the library: directory trees and stored images (layer L2).

Each function is async and a checkpoint; its blocking work (scanning, hashing, writing
objects, encoding the EROFS) runs in one worker thread per call through
:func:`trio.to_thread.run_sync`, under the ``limiter`` given (or a private
one-token limiter, never trio's global default). The pure work (the tree, the
transform, the EROFS and dumpfile encoders) comes from :mod:`trio_composefs.fs`.

**Cancellation**: the worker thread is never abandoned (it may own a half-written
object); it checks for cancellation between files while scanning, so a cancelled
:func:`create_image` stops at the next file, leaves no named image, and discards the
object being written. Objects already stored stay (garbage until referenced, as after
an interrupted pull).

What ``cfsctl`` does for the same commands (composefs-rs ``read_container_root`` and
``commit_image``): the directory is read with every xattr, then by default
:func:`~trio_composefs.fs.transform_for_oci` runs (the root takes ``/usr``'s metadata,
``/run`` is emptied, only ``security.capability`` xattrs stay; where cfsctl refuses a
tree without ``/usr``, the root keeps its own metadata, as the transform documents);
``transform=False`` is cfsctl's
``--no-propagate-usr-to-root`` (no transform, every xattr kept). Regular files over
64 bytes become objects named by their fs-verity digest; smaller ones are inline.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import trio

from .._errors import ScanError
from ..formats import Algorithm, Digest, FsVerityHasher
from ..fs import FileSystem, transform_for_oci
from ..fs import write_dumpfile as _dumpfile_lines
from ..fs.erofs import iter_erofs, read_erofs
from ..hashing import digest_fd
from ..repository import Repository, store_image
from ..repository import read_image as _read_image_bytes
from ._scan import scan_directory

__all__ = [
    "compute_image_id",
    "create_image",
    "read_image",
    "scan_tree",
    "write_dumpfile",
]

PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]
_READ = 1 << 20


def _limiter(limiter: trio.CapacityLimiter | None) -> trio.CapacityLimiter:
    return limiter if limiter is not None else trio.CapacityLimiter(1)


def _check_cancelled() -> None:
    # outside a trio worker thread (the blocking helpers called directly) there is no
    # cancellation to check
    with contextlib.suppress(RuntimeError):
        trio.from_thread.check_cancelled()


def _store_file(repo: Repository) -> Callable[[int, int], Digest]:
    """A ``digest_file`` callback that stores each file as an object of ``repo``."""

    def store(fd: int, size: int) -> Digest:
        _check_cancelled()
        hasher = FsVerityHasher(repo.algorithm)
        with repo.begin_object() as tmp:
            done = 0
            while True:
                piece = os.read(fd, _READ)
                if not piece:
                    break
                done += len(piece)
                if done > size:
                    break
                hasher.update(piece)
                tmp.write(piece)
            if done != size:
                raise ScanError(
                    f"a file changed size while being stored: {size} bytes at stat, {done} read"
                )
            digest, _present = tmp.finish(hasher.digest())
        return digest

    return store


def _hash_file(algorithm: Algorithm) -> Callable[[int, int], Digest]:
    def digest(fd: int, size: int) -> Digest:
        _check_cancelled()
        return digest_fd(fd, size, algorithm)

    return digest


def scan_tree(
    path: PathArg,
    digest_file: Callable[[int, int], Digest],
    *,
    transform: bool = True,
    keep_user_xattrs: bool = False,
) -> FileSystem:
    """Blocking: the tree under ``path`` as cfsctl reads it (see the module docstring).

    Raises:
        ScanError, OSError: the directory cannot be read.
    """
    fs = scan_directory(path, digest_file=digest_file)
    if transform:
        transform_for_oci(fs, keep_user_xattrs=keep_user_xattrs)
    return fs


def _create_image_sync(
    repo: Repository,
    path: PathArg,
    name: str | None,
    version: int,
    transform: bool,
    keep_user_xattrs: bool,
) -> Digest:
    repo.ensure_writable()
    fs = scan_tree(path, _store_file(repo), transform=transform, keep_user_xattrs=keep_user_xattrs)
    _check_cancelled()
    digest = store_image(repo, fs, version=version)
    repo.publish_image(digest, name)  # syncfs first: never a name without its objects
    return digest


async def create_image(
    repo: Repository,
    path: PathArg,
    name: str | None = None,
    *,
    version: int = 1,
    transform: bool = True,
    keep_user_xattrs: bool = False,
    limiter: trio.CapacityLimiter | None = None,
) -> Digest:
    """Store the directory tree ``path`` in ``repo`` as a composefs image; its image ID.

    cfsctl ``create-image PATH [NAME]``: every regular file over 64 bytes is stored as
    an object, the tree transformed (unless ``transform`` is false), its EROFS
    (``version`` 1 or 0) stored as an object, then, after a ``syncfs``, published as
    ``images/<hex>`` and, with ``name``, ``images/refs/<name>``.

    Raises:
        ScanError, OSError: the directory cannot be read.
        RepositoryError: the repository is read-only, or ``name`` is not a valid ref.
    """
    return await trio.to_thread.run_sync(
        _create_image_sync,
        repo,
        path,
        name,
        version,
        transform,
        keep_user_xattrs,
        limiter=_limiter(limiter),
    )


def _image_id_sync(
    source: PathArg | FileSystem,
    algorithm: Algorithm,
    version: int,
    transform: bool,
) -> Digest:
    if isinstance(source, FileSystem):
        fs = source
    else:
        fs = scan_tree(source, _hash_file(algorithm), transform=transform)
    hasher = FsVerityHasher(algorithm)
    for piece in iter_erofs(fs, version=version):
        hasher.update(piece)
    return hasher.digest()


async def compute_image_id(
    source: PathArg | FileSystem,
    algorithm: Algorithm = Algorithm.SHA512,
    *,
    version: int = 1,
    transform: bool = True,
    limiter: trio.CapacityLimiter | None = None,
) -> Digest:
    """The image ID of a directory tree (scanned as :func:`create_image` does) or of a
    :class:`~trio_composefs.fs.FileSystem` (taken as it is), storing nothing.

    cfsctl ``compute-id PATH``. The ID is the fs-verity digest of the EROFS image in
    ``algorithm`` (a repository's ``repo.algorithm``; cfsctl's default without a
    repository is SHA-512). ``transform`` applies to a directory only.
    """
    return await trio.to_thread.run_sync(
        _image_id_sync, source, algorithm, version, transform, limiter=_limiter(limiter)
    )


def _dumpfile_sync(
    source: PathArg | FileSystem,
    write: Callable[[bytes], object],
    algorithm: Algorithm,
    transform: bool,
) -> None:
    if isinstance(source, FileSystem):
        fs = source
    else:
        fs = scan_tree(source, _hash_file(algorithm), transform=transform)
    for piece in _dumpfile_lines(fs):
        write(piece)


async def write_dumpfile(
    source: PathArg | FileSystem,
    write: Callable[[bytes], object],
    *,
    algorithm: Algorithm = Algorithm.SHA512,
    transform: bool = True,
    limiter: trio.CapacityLimiter | None = None,
) -> None:
    """Write the composefs dumpfile of a directory tree or of a tree (an image's, from
    :func:`read_image`) to ``write``, as cfsctl ``create-dumpfile PATH`` does.

    ``write`` is called from the worker thread with pieces of whole lines (a file's
    ``write`` will do). A directory is scanned as by :func:`create_image` with its
    files hashed in ``algorithm`` (nothing is stored).
    """
    await trio.to_thread.run_sync(
        _dumpfile_sync, source, write, algorithm, transform, limiter=_limiter(limiter)
    )


def _read_image_sync(repo: Repository, name: str) -> FileSystem:
    return read_erofs(_read_image_bytes(repo, name))


async def read_image(
    repo: Repository, name: str, *, limiter: trio.CapacityLimiter | None = None
) -> FileSystem:
    """The tree of the stored image ``name`` (hex image ID, ``refs/NAME`` or a ref name).

    An image named by its digest in a secure repository is measured first.

    Raises:
        ObjectNotFoundError: no such image.
        ErofsError: the image is corrupt.
    """
    return await trio.to_thread.run_sync(_read_image_sync, repo, name, limiter=_limiter(limiter))
