"""Where a FUSE mount finds the objects behind external files, and how it trusts them (L2).

An :class:`ObjectOpener` opens the object of one
:class:`~trio_composefs.fs.ExternalFile` (blocking; called in a worker thread) and
says whether the kernel already vouches for its bytes:

* :class:`RepositoryObjects` opens by digest through
  :meth:`Repository.open_object <trio_composefs.repository.Repository.open_object>`.
  In a secure repository that call has checked the kernel's fs-verity digest
  (``FS_IOC_MEASURE_VERITY``) against the name, and the kernel then verifies every
  page read: nothing is left for us to hash. In an insecure repository the object
  is measured too when the filesystem supports fs-verity; otherwise it is
  unverified and the :class:`~._verify.Verifier` hashes it.
* :class:`DirectoryObjects` opens the image's own redirect path (``XX/REST``, the
  ``trusted.overlay.redirect`` payload the kernel follows) below an objects
  directory, for images that live outside a repository, as
  :func:`~trio_composefs.mount.mounted` takes them. The path must be relative and
  stay below the directory (no ``..``, no symlink at the end).
"""

from __future__ import annotations

import os
from typing import Protocol

import attrs

from .._errors import ComposefsError, ObjectNotFoundError
from ..formats import Digest
from ..fs import ExternalFile
from ..repository import Repository

__all__ = ["DirectoryObjects", "ObjectOpener", "OpenedObject", "RepositoryObjects"]


@attrs.frozen
class OpenedObject:
    """An open object: its fd (the caller closes it) and whether the kernel verifies it."""

    fd: int
    kernel_verified: bool


class ObjectOpener(Protocol):
    """Opens the object behind an external file (blocking, thread-safe)."""

    def open(self, file: ExternalFile) -> OpenedObject:
        """Open ``file``'s object read-only.

        Raises:
            OSError, ComposefsError: it cannot be opened (missing, unreadable, or the
                kernel's fs-verity digest differs from its name).
        """
        ...

    def describe(self, file: ExternalFile) -> str:
        """Where ``file``'s object is, for log messages."""
        ...


def _kernel_digest(repo: Repository, fd: int) -> Digest | None:
    try:
        return repo.verity_ops.measure(fd, repo.algorithm)
    except (ComposefsError, OSError):
        return None


@attrs.define(eq=False)
class RepositoryObjects:
    """The objects of an open repository, by digest."""

    repo: Repository

    def open(self, file: ExternalFile) -> OpenedObject:
        if file.digest is None:
            raise ObjectNotFoundError(
                "the image gives this file no fs-verity digest (an empty metacopy xattr):"
                " it cannot be verified"
            )
        fd = self.repo.open_object(file.digest)
        if not self.repo.insecure:
            return OpenedObject(fd, True)  # open_object checked the measured digest
        return OpenedObject(fd, _kernel_digest(self.repo, fd) == file.digest)

    def describe(self, file: ExternalFile) -> str:
        if file.digest is None:
            return f"{self.repo.path}/objects/{file.payload}"
        return f"{self.repo.path}/objects/{file.digest.object_path()}"


def _check_payload(payload: str) -> str:
    parts = payload.split("/")
    if payload.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ObjectNotFoundError(f"redirect {payload!r} does not name a path below objects/")
    return payload


@attrs.define(eq=False)
class DirectoryObjects:
    """Objects below a directory, found by the image's redirect paths.

    Attributes:
        dirfd: an open fd of the objects directory (owned by the caller).
        label: how messages name the directory.
    """

    dirfd: int
    label: str = "objects"

    def open(self, file: ExternalFile) -> OpenedObject:
        if file.payload is None or file.digest is None:
            raise ObjectNotFoundError(
                "the image gives this file no redirect or no fs-verity digest: it cannot be"
                " verified"
            )
        fd = os.open(
            _check_payload(file.payload),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
            dir_fd=self.dirfd,
        )
        return OpenedObject(fd, False)

    def describe(self, file: ExternalFile) -> str:
        return f"{self.label}/{file.payload}"
