"""``oci-archive:FILE[:TAG]``: an OCI image layout inside a tar file, read in place.

The archive's headers are scanned once; ``index.json`` and ``blobs/sha256/*``
are then read by ``pread`` at their offsets, never unpacked to disk. Tags,
digests and platforms follow the layout rules of
:mod:`trio_composefs.oci._index`. A compressed archive is refused (skopeo
does not write them; ``docker save | gzip`` users can decompress first).
"""

from __future__ import annotations

import attrs

from ..._errors import FormatError
from .._index import describe_manifest, resolve_from_index
from .._model import Descriptor, ImageSourceError, Platform, ResolvedImage
from ._archive import ArchiveSource
from ._tarindex import TarMember

__all__ = ["OciArchiveSource", "blob_path"]


def blob_path(digest: str) -> str:
    """Where a layout keeps a blob: ``blobs/sha256/HEX``."""
    algo, _, hexd = digest.partition(":")
    return f"blobs/{algo}/{hexd}"


@attrs.define(eq=False)
class OciArchiveSource(ArchiveSource):
    """An :class:`~trio_composefs.oci.ImageSource` over an ``oci-archive:`` tar file.

    Use as ``async with OciArchiveSource(path, tag=...) as source: ...``.
    """

    tag: str | None = None
    digest: str | None = None

    def __attrs_post_init__(self) -> None:
        suffix = f":{self.tag}" if self.tag else f"@{self.digest}" if self.digest else ""
        self.description = f"oci-archive:{self.path}{suffix}"

    async def __aenter__(self) -> OciArchiveSource:
        await self._open_archive()
        return self

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """The image manifest the tag, digest or single entry of ``index.json`` names."""
        archive = self.archive
        member = archive.lookup("index.json")
        if member is None:
            raise ImageSourceError(f"{self.path}: no index.json member (not an OCI archive?)")
        if member.size > 64 << 20:
            raise FormatError(f"{self.path}: index.json is implausibly large")
        index_json = await archive.read(member)
        return await resolve_from_index(
            index_json,
            self.read_blob,
            tag=self.tag,
            digest=self.digest,
            platform=platform,
            where=self.path,
            find_blob=self._find_manifest,
        )

    async def _find_manifest(self, digest: str) -> Descriptor | None:
        name = blob_path(digest)
        member = self.archive.lookup(name)
        if member is None:
            return None
        if member.size > 64 << 20:
            raise ImageSourceError(f"{self.path}: {digest} is too big for a manifest")
        data = await self.archive.read(member)
        return describe_manifest(digest, data, where=f"{self.path}: member {name!r}")

    def _find_member(self, descriptor: Descriptor) -> TarMember:
        return self.archive.get(blob_path(descriptor.digest))
