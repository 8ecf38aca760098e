"""An OCI image layout directory as an :class:`~trio_composefs.oci_source.ImageSource`.

The layout (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``) is read
directly, as composefs-rs does for the ``oci:`` transport. A tag selects the
index entries annotated ``org.opencontainers.image.ref.name``; ``@sha256:...``
selects a manifest (or index) by digest. Image indexes are resolved to one
manifest by platform (default: the current one).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from ._errors import DigestMismatchError, FormatError
from .oci_source import MEDIA_TYPES, Descriptor, ImageSourceError, Platform, ResolvedImage

__all__ = ["REF_NAME_ANNOTATION", "OciLayoutSource"]

REF_NAME_ANNOTATION: Final = "org.opencontainers.image.ref.name"
_READ_SIZE: Final = 1 << 20
_INDEX_TYPES: Final = (MEDIA_TYPES.OCI_INDEX, MEDIA_TYPES.DOCKER_LIST)
_MAX_DEPTH: Final = 4


def _platform_matches(have: Platform, want: Platform) -> bool:
    if have.os != want.os or have.architecture != want.architecture:
        return False
    if want.variant is None or have.variant == want.variant:
        return True
    # arm64's only variant is v8: treat a missing one as v8
    return want.architecture == "arm64" and {have.variant, want.variant} <= {None, "v8"}


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
            with open(marker, "rb") as f:
                data = json.loads(f.read(1 << 16))
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                raise ImageSourceError(f"{self.description}: no such directory") from None
            raise ImageSourceError(
                f"{self.description}: not an OCI image layout (no oci-layout file)"
            ) from None
        except (OSError, ValueError) as e:
            raise ImageSourceError(f"{self.description}: unreadable oci-layout file: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("imageLayoutVersion"), str):
            raise ImageSourceError(f"{self.description}: oci-layout has no imageLayoutVersion")

    def _blob_path(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or hexd.strip("0123456789abcdef"):
            raise FormatError(f"{self.description}: unsupported digest {digest!r}")
        return os.path.join(self.path, "blobs", "sha256", hexd)

    def _read_verified(self, desc: Descriptor, max_size: int) -> bytes:
        if desc.size > max_size:
            raise ImageSourceError(
                f"{self.description}: blob {desc.digest} has {desc.size} bytes,"
                f" more than the {max_size} allowed for it"
            )
        try:
            with open(self._blob_path(desc.digest), "rb") as f:
                data = f.read(desc.size + 1)
        except FileNotFoundError:
            raise ImageSourceError(
                f"{self.description}: blob {desc.digest} is missing from the layout"
            ) from None
        except OSError as e:
            raise ImageSourceError(f"{self.description}: blob {desc.digest}: {e}") from None
        if len(data) != desc.size:
            raise DigestMismatchError(
                f"{self.description}: blob {desc.digest} has"
                f" {'more than ' if len(data) > desc.size else ''}{len(data)} bytes,"
                f" its descriptor says {desc.size}"
            )
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != desc.digest:
            raise DigestMismatchError(
                f"{self.description}: blob {desc.digest} is corrupt: its sha256 is {actual}"
            )
        return data

    def _read_json_file(self, path: str, what: str) -> Any:
        try:
            with open(path, "rb") as f:
                return json.loads(f.read(64 << 20))
        except FileNotFoundError:
            raise ImageSourceError(f"{self.description}: no {what}") from None
        except (OSError, ValueError) as e:
            raise ImageSourceError(f"{self.description}: unreadable {what}: {e}") from None

    def _descriptor_by_digest(self, digest: str) -> Descriptor:
        """A descriptor for a blob named only by digest; the blob's own mediaType says what."""
        path = self._blob_path(digest)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise ImageSourceError(f"{self.description}: no blob {digest} in the layout") from None
        if size > 64 << 20:
            raise ImageSourceError(f"{self.description}: {digest} is too big for a manifest")
        probe = Descriptor(MEDIA_TYPES.OCI_MANIFEST, digest, size)
        data = self._read_verified(probe, 64 << 20)
        try:
            obj = json.loads(data)
        except ValueError:
            raise ImageSourceError(f"{self.description}: {digest} is not a JSON manifest") from None
        media_type = obj.get("mediaType") if isinstance(obj, dict) else None
        if not isinstance(media_type, str):
            media_type = (
                MEDIA_TYPES.OCI_INDEX
                if isinstance(obj, dict) and "manifests" in obj
                else MEDIA_TYPES.OCI_MANIFEST
            )
        return Descriptor(media_type, digest, size)

    def _resolve(self, platform: Platform | None) -> ResolvedImage:
        want = platform or Platform.current()
        index = self._read_json_file(os.path.join(self.path, "index.json"), "index.json")
        entries = self._index_entries(index, "index.json")
        if self.digest is not None:
            matching = [d for d in entries if d.digest == self.digest]
            candidates = matching[:1] or [self._descriptor_by_digest(self.digest)]
        elif self.tag is not None:
            candidates = [d for d in entries if d.annotations.get(REF_NAME_ANNOTATION) == self.tag]
            if not candidates:
                tags = sorted({t for d in entries if (t := d.annotations.get(REF_NAME_ANNOTATION))})
                known = f" (tags: {', '.join(tags)})" if tags else " (it has no tags)"
                raise ImageSourceError(f"{self.path}: no image tagged {self.tag!r}{known}")
        else:
            candidates = entries
            if not candidates:
                raise ImageSourceError(f"{self.description}: the index lists no images")
        return self._pick(candidates, want, platform is not None, depth=0)

    def _index_entries(self, index: Any, where: str) -> list[Descriptor]:
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise FormatError(f"{self.description}: {where} has no manifests list")
        return [
            Descriptor.from_json(m, where=f"{self.description}: {where}")
            for m in index["manifests"]
        ]

    def _pick(
        self, candidates: list[Descriptor], want: Platform, explicit: bool, depth: int
    ) -> ResolvedImage:
        if depth > _MAX_DEPTH:
            raise FormatError(f"{self.description}: image indexes nested too deeply")
        if len(candidates) > 1:
            fitting = [
                d
                for d in candidates
                if d.platform is not None and _platform_matches(d.platform, want)
            ]
            if not fitting and all(d.platform is None for d in candidates):
                tags = sorted(
                    {t for d in candidates if (t := d.annotations.get(REF_NAME_ANNOTATION))}
                )
                raise ImageSourceError(
                    f"{self.description}: {len(candidates)} images and none declares a platform;"
                    f" name one with :TAG or @sha256:... (tags: {', '.join(tags) or 'none'})"
                )
            if not fitting:
                available = ", ".join(sorted({str(d.platform) for d in candidates if d.platform}))
                raise ImageSourceError(
                    f"{self.description}: no image for platform {want}"
                    f" (available: {available or 'none declared'})"
                )
            chosen = fitting[0]
        else:
            chosen = candidates[0]
            if (
                explicit
                and chosen.platform is not None
                and not _platform_matches(chosen.platform, want)
            ):
                raise ImageSourceError(
                    f"{self.description}: the image is for {chosen.platform}, not {want}"
                )
        data = self._read_verified(chosen, 64 << 20)
        if chosen.media_type in _INDEX_TYPES:
            try:
                nested = json.loads(data)
            except ValueError:
                raise FormatError(
                    f"{self.description}: index {chosen.digest} is not JSON"
                ) from None
            entries = self._index_entries(nested, f"index {chosen.digest}")
            if not entries:
                raise ImageSourceError(f"{self.description}: index {chosen.digest} is empty")
            return self._pick(entries, want, explicit, depth + 1)
        return ResolvedImage(manifest=data, digest=chosen.digest, media_type=chosen.media_type)

    # ------------------------------------------------------------ ImageSource

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """The image manifest (through indexes, picking ``platform``: default the current one).

        Raises:
            ImageSourceError: no such tag, digest or platform; a missing blob.
            DigestMismatchError: a manifest or index blob that does not match its digest.
            FormatError: a malformed index.
        """
        return await trio.to_thread.run_sync(self._resolve, platform, limiter=self._limiter)

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
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
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

    def __aiter__(self) -> _FdPieces:
        return self

    async def __anext__(self) -> bytes:
        data = await trio.to_thread.run_sync(os.read, self._fd, _READ_SIZE, limiter=self._limiter)
        if not data:
            raise StopAsyncIteration
        return data
