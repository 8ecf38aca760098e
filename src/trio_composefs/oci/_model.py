"""Where images come from: the ``ImageSource`` protocol, descriptors and source references.

An image source hands out an image's manifest and its blobs. Implementations:
an OCI image layout directory (``oci:PATH[:TAG|@sha256:...]``), an OCI archive
(``oci-archive:FILE[:TAG]``), a docker archive (``docker-archive:FILE[:REF]``),
and any other transport through skopeo. :func:`parse_source` turns the string a
user types into a :class:`SourceRef`.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import attrs

from .._errors import FormatError, ImageSourceError, InvalidNameError
from ..formats._sha256id import Sha256Id

__all__ = [
    "MEDIA_TYPES",
    "Descriptor",
    "ImageSource",
    "ImageSourceError",
    "Platform",
    "ResolvedImage",
    "SourceRef",
    "parse_source",
]


class MEDIA_TYPES:  # a namespace of constants
    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
    OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
    DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
    DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
    DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


@attrs.frozen
class Platform:
    """An OCI platform (``os``/``architecture``/``variant``)."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def current(cls) -> Platform:
        """The platform this program runs on, in OCI's spelling."""
        machine = _platform.machine().lower()
        arch = {
            "x86_64": "amd64",
            "amd64": "amd64",
            "aarch64": "arm64",
            "arm64": "arm64",
            "armv7l": "arm",
            "ppc64le": "ppc64le",
            "s390x": "s390x",
            "riscv64": "riscv64",
            "i686": "386",
        }.get(machine, machine)
        variant = "v7" if machine == "armv7l" else None
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]``, e.g. ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidNameError(f"not a platform: {text!r} (expected os/arch[/variant])")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _sha256_id(text: str) -> Sha256Id:
    return Sha256Id.parse(text)


def _optional_sha256_id(text: str | None) -> Sha256Id | None:
    return None if text is None else Sha256Id.parse(text)


@attrs.frozen
class Descriptor:
    """An OCI content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: Sha256Id = attrs.field(converter=_sha256_id)
    size: int
    annotations: Mapping[str, str] = attrs.field(factory=dict)
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> Descriptor:
        """Validate a descriptor object from parsed JSON; ``where`` names it in errors."""
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: a descriptor must be a JSON object")
        media_type = obj.get("mediaType")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise FormatError(f"{where}: descriptor without mediaType or digest")
        digest = Sha256Id.parse(
            digest, error=f"{where}: unsupported or malformed digest {digest!r}"
        )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{where}: descriptor {digest} has no valid size")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise FormatError(f"{where}: annotations of {digest} are not an object")
        for key, value in annotations.items():
            if not isinstance(value, str):
                raise FormatError(f"{where}: annotation {key[:200]!r} of {digest} is not a string")
        plat = obj.get("platform")
        platform = None
        if plat is not None and not isinstance(plat, dict):
            raise FormatError(f"{where}: platform of {digest} is not an object")
        if isinstance(plat, dict):
            for key in ("os", "architecture", "variant"):
                if plat.get(key) is not None and not isinstance(plat[key], str):
                    raise FormatError(f"{where}: platform.{key} of {digest} is not a string")
            if plat.get("os"):
                platform = Platform(
                    plat["os"], plat.get("architecture") or "", plat.get("variant") or None
                )
        return cls(media_type, digest, size, dict(annotations), platform)


@attrs.frozen
class ResolvedImage:
    """An image manifest as the source gave it: raw bytes, their digest, media type."""

    manifest: bytes
    digest: str
    media_type: str


class ImageSource(Protocol):
    """Where an image's manifest and blobs are read from.

    Sources are async context managers (``async with source: ...``) that own
    whatever they opened (files, a skopeo process).
    """

    description: str
    """How to name the source in messages, e.g. ``oci:/srv/images:latest``."""

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """The image manifest (through an index, picking ``platform``: default the current one).

        Raises:
            ImageSourceError: no such image, tag or platform.
        """
        ...

    async def read_blob(self, descriptor: Descriptor, *, max_size: int = 64 << 20) -> bytes:
        """A small blob (config JSON), whole and checked against its digest."""
        ...

    def open_blob(
        self, descriptor: Descriptor
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream a blob's bytes as stored (compressed layers stay compressed).

        The bytes are not checked here: the importer hashes them as they flow.
        """
        ...

    async def __aenter__(self) -> ImageSource: ...
    async def __aexit__(self, *exc: object) -> None: ...


@attrs.frozen
class SourceRef:
    """A parsed image reference: ``transport`` and what follows it."""

    transport: str
    """``oci``, ``oci-archive``, ``docker-archive``, or another skopeo transport."""
    path: str
    """The layout directory or archive file (for skopeo transports: the rest, verbatim)."""
    tag: str | None = None
    digest: Sha256Id | None = attrs.field(default=None, converter=_optional_sha256_id)

    def __str__(self) -> str:
        if self.transport not in ("oci", "oci-archive", "docker-archive"):
            return f"{self.transport}:{self.path}"
        suffix = f":{self.tag}" if self.tag else f"@{self.digest}" if self.digest else ""
        return f"{self.transport}:{self.path}{suffix}"


_LOCAL = ("oci", "oci-archive", "docker-archive")


def parse_source(text: str) -> SourceRef:
    """Parse ``TRANSPORT:REST`` as skopeo spells it.

    ``oci:PATH[:TAG]`` and ``oci:PATH@sha256:HEX``; ``oci-archive:FILE[:TAG]``;
    ``docker-archive:FILE[:REF]``; anything else (``docker://...``,
    ``containers-storage:...``) is kept verbatim for skopeo.
    """
    transport, sep, rest = text.partition(":")
    if not sep or not transport or not rest:
        raise InvalidNameError(
            f"not an image reference: {text!r}"
            " (expected TRANSPORT:..., e.g. oci:/path/to/layout:tag)"
        )
    if transport not in _LOCAL or transport == "docker-archive":
        # docker-archive:FILE[:REF] keeps REF (a repo tag or @N) in the path for its source.
        return SourceRef(transport, rest)
    digest = None
    tag = None
    if "@" in rest:
        rest, _, at = rest.rpartition("@")
        digest = Sha256Id.parse(at, error=f"not a sha256 digest in {text!r}: {at!r}")
    elif ":" in rest:
        path, _, maybe_tag = rest.rpartition(":")
        if maybe_tag and "/" not in maybe_tag:
            rest, tag = path, maybe_tag
    if not rest:
        raise InvalidNameError(f"no path in image reference {text!r}")
    return SourceRef(transport, rest, tag, digest)
