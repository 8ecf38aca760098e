"""The exception hierarchy: one root, a precise message in every leaf."""

from __future__ import annotations


class ComposefsError(Exception):
    """Root of every error this library raises on purpose.

    The CLI prints ``str(error)`` on one line for these and exits non-zero;
    anything else is a bug and shows a traceback.
    """


class DigestError(ComposefsError, ValueError):
    """A string or byte sequence is not a valid digest of the expected kind."""


class FormatError(ComposefsError):
    """Bytes that do not follow a format we read: tar, splitstream, meta.json."""


class TarError(FormatError):
    """A tar stream we cannot split.

    Attributes:
        entry: the path of the entry at fault, when it is known.
        offset: the byte offset in the tar stream where the problem was found.
    """

    def __init__(self, message: str, *, entry: str | None = None, offset: int | None = None):
        self.reason = message
        self.entry = entry
        self.offset = offset
        where = []
        if entry is not None:
            where.append(f"entry {entry!r}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"tar: {message}" + (f" ({', '.join(where)})" if where else ""))


class SplitStreamError(FormatError):
    """A splitstream file that is truncated, inconsistent or of another kind."""


class RepositoryError(ComposefsError):
    """A repository that cannot be opened, read or written as asked."""


class VerityUnsupportedError(RepositoryError):
    """The filesystem cannot enable fs-verity, and the repository requires it."""


class ObjectNotFoundError(RepositoryError, LookupError):
    """No object, stream or ref of that name exists in the repository."""


class DigestMismatchError(ComposefsError):
    """Data whose digest differs from the one it was promised to have."""


class MountError(ComposefsError):
    """A composefs image could not be mounted or unmounted.

    The message is one line naming what is at fault (the image, the mountpoint,
    the kernel) and what to do about it. Nothing is left mounted or attached
    when it is raised by a mount.

    Attributes:
        errno: the errno the kernel answered, when the failure came from a
            system call (``None`` for checks made before any call).
    """

    def __init__(self, message: str, *, errno: int | None = None):
        self.errno = errno
        super().__init__(message)


class InternalError(ComposefsError):
    """An invariant of this library was broken. This is a bug: please report it."""

    def __init__(self, message: str):
        super().__init__(
            f"internal error: {message} (this is a bug in trio-composefs; please report it)"
        )
