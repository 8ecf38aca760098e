"""An OCI image layout directory as an :class:`~trio_composefs.oci.ImageSource`.

The layout (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``) is read
directly, as composefs-rs does for the ``oci:`` transport. A tag selects the
index entries annotated ``org.opencontainers.image.ref.name``; ``@sha256:...``
selects a manifest (or index) by digest. Image indexes are resolved to one
manifest by platform (default: the current one).
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio

from ..._errors import DigestMismatchError, FormatError
from ...formats._json import load_json
from ...formats._sha256id import Sha256Id
from .._index import describe_manifest, resolve_from_index, verify_blob
from .._model import Descriptor, ImageSourceError, Platform, ResolvedImage

__all__ = ["REF_NAME_ANNOTATION", "OciLayoutSource"]

REF_NAME_ANNOTATION: Final = "org.opencontainers.image.ref.name"
_READ_SIZE: Final = 1 << 20
#: The largest index.json or manifest read.
_MAX_METADATA: Final = 64 << 20


def _open_regular(path: str, *, within: str | None = None) -> int:
    """Open a file of the layout for reading, refusing anything but a regular file.

    ``O_NONBLOCK`` keeps a FIFO planted in the layout from blocking the open
    (and with it Ctrl-C); it is cleared once the file is known to be regular.
    With ``within`` (the layout directory), the file actually opened, after any
    symlinks, must lie inside that directory: a blob that is a symlink to a host
    file is refused without reading a byte of it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if within is not None:
            real = os.readlink(f"/proc/self/fd/{fd}")
            root = os.path.realpath(within)
            if os.path.commonpath([root, real]) != root:
                raise ImageSourceError(
                    f"{path} resolves outside the layout directory {within}; refusing it"
                )
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageSourceError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class OciLayoutSource:
    """Images in an OCI layout directory (``oci:PATH[:TAG]`` or ``oci:PATH@sha256:...``).

    Args:
        path: the layout directory.
        tag: pick the index entry with this ref name annotation.
        digest: pick the manifest (or index) with this digest.
    """

    def __init__(self, path: str, *, tag: str | None = None, digest: str | None = None) -> None:
        self.path = path
        self.tag = tag
        self.digest = digest
        suffix = f":{tag}" if tag else f"@{digest}" if digest else ""
        self.description = f"oci:{path}{suffix}"
        self._limiter = trio.CapacityLimiter(4)

    async def __aenter__(self) -> OciLayoutSource:
        await trio.to_thread.run_sync(self._check_layout, limiter=self._limiter)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------ blocking helpers

    def _check_layout(self) -> None:
        marker = os.path.join(self.path, "oci-layout")
        try:
            with os.fdopen(_open_regular(marker), "rb") as f:
                data = load_json(f.read(1 << 16), where=f"{self.description}: oci-layout")
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                raise ImageSourceError(f"{self.description}: no such directory") from None
            raise ImageSourceError(
                f"{self.description}: not an OCI image layout (no oci-layout file)"
            ) from None
        except (OSError, ValueError, FormatError) as e:
            raise ImageSourceError(f"{self.description}: unreadable oci-layout file: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("imageLayoutVersion"), str):
            raise ImageSourceError(f"{self.description}: oci-layout has no imageLayoutVersion")

    def _blob_path(self, digest: str) -> str:
        hexd = Sha256Id.parse(
            digest, error=f"{self.description}: unsupported digest {digest!r}"
        ).hex
        return os.path.join(self.path, "blobs", "sha256", hexd)

    def _read_verified(self, desc: Descriptor, max_size: int) -> bytes:
        if desc.size > max_size:
            raise ImageSourceError(
                f"{self.description}: blob {desc.digest} has {desc.size} bytes,"
                f" more than the {max_size} allowed for it"
            )
        try:
            with os.fdopen(
                _open_regular(self._blob_path(desc.digest), within=self.path), "rb"
            ) as f:
                data = f.read(desc.size + 1)
        except FileNotFoundError:
            raise ImageSourceError(
                f"{self.description}: blob {desc.digest} is missing from the layout"
            ) from None
        except OSError as e:
            raise ImageSourceError(f"{self.description}: blob {desc.digest}: {e}") from None
        if len(data) > desc.size:
            raise DigestMismatchError(
                f"{self.description}: blob {desc.digest} has more than the"
                f" {desc.size} bytes its descriptor says"
            )
        return verify_blob(data, desc, where=self.description)

    def _read_index(self) -> bytes:
        try:
            fd = _open_regular(os.path.join(self.path, "index.json"), within=self.path)
            with os.fdopen(fd, "rb") as f:
                data = f.read(_MAX_METADATA + 1)
        except FileNotFoundError:
            raise ImageSourceError(f"{self.description}: no index.json") from None
        except OSError as e:
            raise ImageSourceError(f"{self.description}: unreadable index.json: {e}") from None
        if len(data) > _MAX_METADATA:
            raise ImageSourceError(
                f"{self.description}: index.json is too large (more than {_MAX_METADATA} bytes)"
            )
        return data

    def _find_manifest(self, digest: str) -> Descriptor | None:
        """A descriptor for a manifest the index does not list, from the blob itself."""
        path = self._blob_path(digest)
        try:
            fd = _open_regular(path, within=self.path)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if size > _MAX_METADATA:
                raise ImageSourceError(f"{self.description}: {digest} is too big for a manifest")
            data = f.read(size)
        return describe_manifest(digest, data, where=self.description)

    # ------------------------------------------------------------ ImageSource

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """The image manifest (through indexes, picking ``platform``: default the current one).

        Raises:
            ImageSourceError: no such tag, digest or platform; a missing blob.
            DigestMismatchError: a manifest or index blob that does not match its digest.
            FormatError: a malformed index.
        """

        async def read(desc: Descriptor) -> bytes:
            return await trio.to_thread.run_sync(
                self._read_verified, desc, 64 << 20, limiter=self._limiter
            )

        async def find(digest: str) -> Descriptor | None:
            return await trio.to_thread.run_sync(self._find_manifest, digest, limiter=self._limiter)

        index = await trio.to_thread.run_sync(self._read_index, limiter=self._limiter)
        return await resolve_from_index(
            index,
            read,
            tag=self.tag,
            digest=self.digest,
            platform=platform,
            where=self.description,
            find_blob=find,
        )

    async def read_blob(self, descriptor: Descriptor, *, max_size: int = 64 << 20) -> bytes:
        """A small blob, whole, checked against the descriptor's size and digest."""
        return await trio.to_thread.run_sync(
            self._read_verified, descriptor, max_size, limiter=self._limiter
        )

    @asynccontextmanager
    async def open_blob(self, descriptor: Descriptor) -> AsyncIterator[AsyncIterator[bytes]]:
        """The blob's stored bytes in pieces of up to 1 MiB (not checked here).

        **Cancellation:** the file is closed synchronously on exit, so a
        cancelled import leaks nothing.
        """
        path = self._blob_path(descriptor.digest)

        def open_fd() -> int:
            try:
                return _open_regular(path, within=self.path)
            except FileNotFoundError:
                raise ImageSourceError(
                    f"{self.description}: blob {descriptor.digest} is missing from the layout"
                ) from None

        fd = await trio.to_thread.run_sync(open_fd, limiter=self._limiter)
        try:
            yield _FdPieces(fd, self._limiter)
        finally:
            os.close(fd)


class _FdPieces:
    """Read an fd in worker-thread hops; never closes it."""

    def __init__(self, fd: int, limiter: trio.CapacityLimiter) -> None:
        self._fd = fd
        self._limiter = limiter

    def fileno(self) -> int:
        """The fd, for a reader in a worker thread that reads it directly (no hop per piece)."""
        return self._fd

    def __aiter__(self) -> _FdPieces:
        return self

    async def __anext__(self) -> bytes:
        data = await trio.to_thread.run_sync(os.read, self._fd, _READ_SIZE, limiter=self._limiter)
        if not data:
            raise StopAsyncIteration
        return data
