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


def _located(kind: str, message: str, *where: str | None) -> str:
    """``"<kind>: <message> (<where>, ...)"``, leaving out the places that are unknown."""
    known = [w for w in where if w is not None]
    return f"{kind}: {message}" + (f" ({', '.join(known)})" if known else "")


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
        super().__init__(
            _located(
                "tar",
                message,
                None if entry is None else f"entry {entry!r}",
                None if offset is None else f"byte offset {offset}",
            )
        )


class TreeError(FormatError):
    """Layer entries that do not make a filesystem tree.

    Attributes:
        path: the path of the entry at fault, when it is known.
        layer: the layer that holds it (its diff_id, or ``"layer N"``), when known.
    """

    def __init__(self, message: str, *, path: str | None = None, layer: str | None = None):
        self.reason = message
        self.path = path
        self.layer = layer
        super().__init__(
            _located(
                "tree",
                message,
                None if path is None else f"entry {path!r}",
                None if layer is None else f"in {layer}",
            )
        )


class SplitStreamError(FormatError):
    """A splitstream file that is truncated, inconsistent or of another kind."""


class DumpfileError(FormatError):
    """A composefs dumpfile (composefs-dump(5)) that the strict parser rejects.

    Attributes:
        line: the 1-based line number at fault, when known.
        field: the name of the field at fault (``PATH``, ``MODE``, ..., ``XATTR``).
    """

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None):
        self.reason = message
        self.line = line
        self.field = field
        super().__init__(
            _located(
                "dumpfile",
                message,
                None if line is None else f"line {line}",
                None if field is None else f"field {field}",
            )
        )


class ErofsError(FormatError):
    """A composefs EROFS image that cannot be read: truncated, corrupt or hostile.

    Attributes:
        nid: the inode number (byte offset / 32 in the inode table) at fault, when known.
        offset: the byte offset in the image where the problem was found, when known.
    """

    def __init__(self, message: str, *, nid: int | None = None, offset: int | None = None):
        self.reason = message
        self.nid = nid
        self.offset = offset
        super().__init__(
            _located(
                "erofs",
                message,
                None if nid is None else f"nid {nid}",
                None if offset is None else f"byte offset {offset}",
            )
        )


class InvalidNameError(ComposefsError, ValueError):
    """A tag, ref, stream name, platform or image reference that cannot be one.

    Raised before any work is done: an empty or absolute name, a ``.``/``..`` or
    empty component, a component starting with ``.`` (reserved for temporary
    files), a NUL, or a name too long or too deep for the repository.
    """


class ScanError(ComposefsError):
    """A directory tree that changed, or is too deep, while being scanned."""


class RepositoryError(ComposefsError):
    """A repository that cannot be opened, read or written as asked."""


class VerityUnsupportedError(RepositoryError):
    """The filesystem cannot enable fs-verity, and the repository requires it."""


class LockTimeoutError(RepositoryError, TimeoutError):
    """The repository's lock was not free within the time allowed (``--lock-timeout``)."""


class ObjectNotFoundError(RepositoryError, LookupError):
    """No object, stream or ref of that name exists in the repository."""


class UnsafeLayoutError(RepositoryError):
    """A directory the repository owns (``objects/XX``, ``streams/refs``...) is a symlink
    or not a directory; it is never followed. ``path`` is repository-relative."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class ImageSourceError(ComposefsError):
    """An image that cannot be found or read at its source."""


class SourceAuthenticationError(ImageSourceError):
    """The source (a registry) requires credentials, or refused the ones given."""


class SourceNetworkError(ImageSourceError, ConnectionError):
    """The connection to the source failed or broke (refused, reset, timed out, cut short).

    Also a :class:`ConnectionError`, so ``except OSError`` / ``except ConnectionError``
    catch it as they catch a socket's own errors.
    """


class DigestMismatchError(ComposefsError):
    """Data whose digest differs from the one it was promised to have."""


class InvalidDigestError(DigestError, FormatError, InvalidNameError):
    """Text that is not an OCI ``sha256:<64 lowercase hex digits>`` identifier: a diff_id,
    a descriptor's digest, a reference's ``@sha256:...``, a manifest digest given by name.

    The one syntax error of :class:`~trio_composefs.formats.Sha256Id`. It is also a
    :class:`FormatError` (read from a manifest or config) and an :class:`InvalidNameError`
    (given as a name), which is what these places raised before.
    """


class InvalidDiffIdError(InvalidDigestError, DigestMismatchError):
    """A layer diff_id given to the importer that is not ``sha256:<hex>``.

    Deprecated base: it remains a :class:`DigestMismatchError` (what was raised before)
    for one release; catch :class:`InvalidDigestError`.
    """


class ErofsWriteError(ComposefsError, ValueError):
    """A tree that cannot be written as a composefs EROFS image (a file too big for one
    chunk index, xattrs over the format's limits, an unknown version). The message names
    the entry at fault."""


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


class FuseUnavailableError(MountError):
    """A FUSE mount was asked for, but ``pyfuse3`` (or libfuse3) is not installed.

    The message says how to install it: ``apt-get install fuse3 libfuse3-dev``, then
    ``pip install 'trio-composefs[fuse]'``.
    """


class InternalError(ComposefsError):
    """An invariant of this library was broken. This is a bug: please report it."""

    def __init__(self, message: str):
        super().__init__(
            f"internal error: {message} (this is a bug in trio-composefs; please report it)"
        )


class DataAfterEndError(InternalError, RuntimeError):
    """Input fed to a sans-IO codec after its end of input was signalled.

    Raised alike by :class:`~trio_composefs.formats.TarSplitter`,
    :class:`~trio_composefs.formats.EntryReader` and
    :class:`~trio_composefs.formats.ChunkDecoder`. It is a bug in the code that drives the
    codec (ours, when it comes from this library): an :class:`InternalError`, and a
    :class:`RuntimeError` as misuse of a protocol object is in h11.
    """

    def __init__(self, message: str):
        ComposefsError.__init__(
            self,
            f"internal error: {message} (a bug in the code that feeds this codec;"
            " please report it if that is trio-composefs)",
        )
