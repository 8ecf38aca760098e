"""``docker-archive:FILE[:REF]``: what ``docker save``, ``podman save`` and skopeo write.

The archive's ``manifest.json`` lists images, each with a ``Config`` member,
``RepoTags`` and ``Layers`` members. Such an archive holds no image manifest,
so one is synthesized, as skopeo does for this transport: a Docker v2 schema 2
manifest whose config descriptor is the config member's sha256 and size, and
whose layer descriptors give each layer member's sha256, size and a media
type found from its first bytes (plain tar, gzip, or zstd). The JSON is
compact with a fixed key order, so the same archive always gives the same
manifest digest.

A layer's sha256 is not computed when it is already known: a member called
``blobs/sha256/HEX`` (docker 25+) is named by it, and a plain tar layer's
digest is its diff_id from the config. Other layers (gzip in a legacy layout)
are hashed once, when the manifest is resolved. The importer checks every
layer's digest as it streams anyway.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs
import trio

from ..._errors import FormatError
from ...formats._json import load_json
from .._index import parse_json
from .._model import MEDIA_TYPES, Descriptor, ImageSourceError, Platform, ResolvedImage
from ._archive import ArchiveSource
from ._tarindex import TarMember

__all__ = ["DockerArchiveSource", "normalize_repo_tag"]


def normalize_repo_tag(name: str) -> str:
    """``busybox`` → ``busybox:latest``; ``docker.io/library/`` and ``docker.io/`` dropped."""
    if "@" not in name and ":" not in name.rpartition("/")[2]:
        name += ":latest"
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _layer_media_type(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return MEDIA_TYPES.DOCKER_LAYER_GZIP
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return (
            MEDIA_TYPES.OCI_LAYER_ZSTD
        )  # Docker's schema has no zstd type: OCI's is the usual one
    return MEDIA_TYPES.DOCKER_LAYER


def _repo_tags(entry: dict[str, Any]) -> list[str]:
    """An entry's ``RepoTags`` that are strings (absent, ``null`` or mistyped: none)."""
    tags = entry.get("RepoTags")
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


@attrs.define(eq=False)
class DockerArchiveSource(ArchiveSource):
    """An :class:`~trio_composefs.oci.ImageSource` over a ``docker-archive:`` tar file.

    Args:
        path: the archive.
        ref: which image, when it holds several: one of its ``RepoTags``
            (``name:tag``; ``docker.io/library/`` may be left out) or ``@N``, the
            N-th entry of ``manifest.json`` (from 0). Default: the only image.
    """

    ref: str | None = None
    _blobs: dict[str, TarMember] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.description = f"docker-archive:{self.path}" + (f":{self.ref}" if self.ref else "")

    @classmethod
    def from_reference(cls, rest: str) -> DockerArchiveSource:
        """Parse what follows ``docker-archive:`` as skopeo does: split at the first colon."""
        path, _, ref = rest.partition(":")
        if not path:
            raise ImageSourceError(f"no file in docker-archive:{rest}")
        return cls(path, ref or None)

    async def __aenter__(self) -> DockerArchiveSource:
        await self._open_archive()
        return self

    async def _read_json(self, name: str) -> Any:
        member = self.archive.get(name)
        if member.size > 64 << 20:
            raise FormatError(f"{self.path}: member {name!r} is implausibly large")
        data = await self.archive.read(member)
        where = f"{self.path}: member {name!r}"
        try:
            return load_json(data, where=where)
        except FormatError as exc:  # keep the message's old wording
            raise FormatError(str(exc).replace(f"{where}: ", f"{where} is ", 1)) from None

    def _select(self, entries: list[Any]) -> dict[str, Any]:
        where = f"{self.path}: manifest.json"
        if not entries:
            raise ImageSourceError(f"{where}: the archive holds no image")
        if self.ref is None:
            if len(entries) != 1:
                raise ImageSourceError(
                    f"{where}: the archive holds {len(entries)} images; choose one with"
                    f" docker-archive:{self.path}:NAME:TAG or :@N"
                    f" (tags: {', '.join(self._all_tags(entries)) or 'none'})"
                )
            return entries[0]  # type: ignore[no-any-return]
        if self.ref.startswith("@"):
            try:
                n = int(self.ref[1:])
            except ValueError:
                raise ImageSourceError(f"{where}: not an image number: {self.ref!r}") from None
            if not 0 <= n < len(entries):
                raise ImageSourceError(
                    f"{where}: no image {self.ref} (the archive holds {len(entries)})"
                )
            return entries[n]  # type: ignore[no-any-return]
        want = normalize_repo_tag(self.ref)
        for entry in entries:
            if any(normalize_repo_tag(t) == want for t in _repo_tags(entry)):
                return entry  # type: ignore[no-any-return]
        raise ImageSourceError(
            f"{where}: no image tagged {self.ref!r}"
            f" (tags: {', '.join(self._all_tags(entries)) or 'none'})"
        )

    @staticmethod
    def _all_tags(entries: list[Any]) -> list[str]:
        return [t for e in entries for t in _repo_tags(e)]

    async def _layer_digest(self, member: TarMember, media_type: str, diff_id: str | None) -> str:
        name = member.name
        if name.startswith("blobs/sha256/") and len(name) == 13 + 64:
            return "sha256:" + name[13:]
        if media_type == MEDIA_TYPES.DOCKER_LAYER and diff_id is not None:
            return diff_id

        def work() -> str:
            h = hashlib.sha256()
            pos = 0
            while pos < member.size:
                n = min(1 << 20, member.size - pos)
                h.update(self.archive.pread(member, pos, n))
                pos += n
            return "sha256:" + h.hexdigest()

        return await trio.to_thread.run_sync(work)

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """Synthesize the selected image's Docker v2 schema 2 manifest.

        ``platform`` is not used: an archive entry is a single image.
        """
        entries = await self._read_json("manifest.json")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise FormatError(f"{self.path}: manifest.json is not a list of objects")
        entry = self._select(entries)
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise FormatError(f"{self.path}: manifest.json entry without Config or Layers")
        archive = self.archive
        config_member = archive.get(config_name)
        if config_member.size > 64 << 20:
            raise FormatError(f"{self.path}: member {config_name!r} is implausibly large")
        config_bytes = await archive.read(config_member)
        config = parse_json(config_bytes, where=f"{self.path}: member {config_name!r}")
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_names):
            raise FormatError(
                f"{self.path}: config {config_name!r} lists"
                f" {len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff_ids"
                f" for {len(layer_names)} layers"
            )
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        blobs = {config_digest: config_member}
        layers = []
        for name, diff_id in zip(layer_names, diff_ids, strict=True):
            if not isinstance(name, str):
                raise FormatError(f"{self.path}: manifest.json: a layer path is not a string")
            member = archive.get(name)
            media_type = _layer_media_type(await archive.read_head(member, 4))
            digest = await self._layer_digest(
                member, media_type, diff_id if isinstance(diff_id, str) else None
            )
            blobs[digest] = member
            layers.append({"mediaType": media_type, "size": member.size, "digest": digest})
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPES.DOCKER_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPES.DOCKER_CONFIG,
                "size": len(config_bytes),
                "digest": config_digest,
            },
            "layers": layers,
        }
        data = json.dumps(manifest, separators=(",", ":")).encode()
        self._blobs = blobs
        return ResolvedImage(
            data, "sha256:" + hashlib.sha256(data).hexdigest(), MEDIA_TYPES.DOCKER_MANIFEST
        )

    def _find_member(self, descriptor: Descriptor) -> TarMember:
        member = self._blobs.get(descriptor.digest)
        if member is None:
            raise ImageSourceError(
                f"{self.description}: no blob {descriptor.digest}"
                + ("" if self._blobs else " (call resolve() first)")
            )
        return member
