"""``docker-archive:FILE[:REF]``: what ``docker save``, ``podman save`` and skopeo write.

The archive's ``manifest.json`` lists images, each with a ``Config`` member,
``RepoTags`` and ``Layers`` members. Such an archive holds no image manifest,
so one is synthesized exactly as skopeo (containers/image,
``docker/internal/tarfile``) synthesizes it, so that an image pulled from a
docker-archive gets the manifest digest ``skopeo inspect --raw`` shows, which
is also the digest skopeo's image proxy reports and so the name cfsctl stores
the image under (``oci-manifest-<digest>``):

- a Docker v2 schema 2 manifest, Go ``json.Marshal`` layout: compact, keys in
  the order ``schemaVersion, mediaType, config, layers`` and
  ``mediaType, size, digest`` in each descriptor;
- the config descriptor: the config member's bytes as they are, its sha256
  and length, media type ``application/vnd.docker.container.image.v1+json``;
- one layer descriptor per entry of the config's ``rootfs.diff_ids`` (a
  repeated diff_id repeats its descriptor), each naming the **uncompressed**
  layer: digest = the diff_id, size = the uncompressed length, and media type
  ``application/vnd.docker.image.rootfs.diff.tar.gzip`` whatever the layer's
  compression (plain, gzip, bzip2, xz or zstd, told by the same magic numbers
  skopeo uses). So the manifest does not depend on how the layers are
  compressed, and a layer blob is served decompressed (as skopeo's
  ``GetBlob`` does): the importer's digest check is then a check of the
  diff_id.

Finding a compressed layer's uncompressed length means decompressing it once
when the manifest is resolved (skopeo does the same); plain layers (what
``docker save``, ``podman save`` and ``skopeo copy`` write) cost nothing.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, cast

import attrs
import trio
import zstandard

from ..._errors import FormatError
from ...formats._json import load_json
from .._index import parse_json, verify_blob
from .._model import MEDIA_TYPES, Descriptor, ImageSourceError, Platform, ResolvedImage
from ._archive import ArchiveSource
from ._tarindex import CHUNK, TarArchive, TarMember

__all__ = ["DockerArchiveSource", "normalize_repo_tag"]


def normalize_repo_tag(name: str) -> str:
    """``busybox`` → ``busybox:latest``; ``docker.io/library/`` and ``docker.io/`` dropped."""
    if "@" not in name and ":" not in name.rpartition("/")[2]:
        name += ":latest"
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


#: containers/image's compression magic numbers (``pkg/compression``), tried in turn.
_MAGIC: Final = (
    ("gzip", b"\x1f\x8b\x08"),
    ("bzip2", b"BZh"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)


def layer_compression(head: bytes) -> str | None:
    """The compression a layer's first bytes announce, as skopeo detects it; ``None``: plain."""
    for name, magic in _MAGIC:
        if head.startswith(magic):
            return name
    return None


class _MemberFile(io.RawIOBase):
    """A member's bytes as a blocking file (reads are ``pread`` calls: use it in a thread)."""

    def __init__(self, archive: TarArchive, member: TarMember) -> None:
        self._archive = archive
        self._member = member
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._member.size - self._pos)
        if n <= 0:
            return 0
        data = self._archive.pread(self._member, self._pos, n)
        buffer[:n] = data
        self._pos += n
        return n


_DECOMPRESS_ERRORS: Final = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def _decompressor(archive: TarArchive, member: TarMember, compression: str) -> io.BufferedIOBase:
    """A blocking reader of a member's decompressed bytes (all frames or members, in turn)."""
    raw = _MemberFile(archive, member)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, CHUNK), mode="rb")
    if compression == "bzip2":
        return bz2.BZ2File(io.BufferedReader(raw, CHUNK))
    if compression == "xz":
        return lzma.LZMAFile(io.BufferedReader(raw, CHUNK))
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(Any, raw), read_size=CHUNK, read_across_frames=True
    )
    return cast(io.BufferedIOBase, reader)


@attrs.frozen
class _Layer:
    """A layer member, how it is compressed and its uncompressed length."""

    member: TarMember
    compression: str | None
    size: int


@attrs.define(eq=False)
class _DecompressedStream:
    """Async iterator over a compressed member's decompressed bytes, one thread hop a chunk."""

    reader: io.BufferedIOBase
    where: str
    done: bool = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.done:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        try:
            data = await trio.to_thread.run_sync(self.reader.read, CHUNK)
        except _DECOMPRESS_ERRORS as exc:
            self.done = True
            raise FormatError(f"{self.where}: cannot decompress: {exc}") from None
        if not data:
            self.done = True
            raise StopAsyncIteration
        return data


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
    _layers: dict[str, _Layer] = attrs.field(factory=dict, init=False)

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

    def _uncompressed_size(self, member: TarMember, compression: str) -> int:
        """Decompress a member to count its bytes (blocking: call it in a thread)."""
        reader = _decompressor(self.archive, member, compression)
        total = 0
        try:
            while True:
                trio.from_thread.check_cancelled()
                n = len(reader.read(CHUNK))
                if not n:
                    return total
                total += n
        except _DECOMPRESS_ERRORS as exc:
            raise FormatError(
                f"{self.path}: member {member.name!r} ({compression}) does not decompress: {exc}"
            ) from None

    async def _layer(self, name: str) -> _Layer:
        member = self.archive.get(name)
        compression = layer_compression(await self.archive.read_head(member, 8))
        if compression is None:
            return _Layer(member, None, member.size)
        size = await trio.to_thread.run_sync(self._uncompressed_size, member, compression)
        return _Layer(member, compression, size)

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """Synthesize the selected image's Docker v2 schema 2 manifest, as skopeo does.

        ``platform`` is not used: an archive entry is a single image.

        Raises:
            FormatError: the archive's JSON or a compressed layer is broken, the
                config lists another number of diff_ids than there are layers,
                or one layer member stands for two different diff_ids.
            ImageSourceError: a member is missing, or the image asked for is not there.
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
        layers: dict[str, _Layer] = {}
        members: dict[str, str] = {}  # member name -> the diff_id it stands for
        descriptors = []
        for i, (name, diff_id) in enumerate(zip(layer_names, diff_ids, strict=True)):
            if not isinstance(name, str):
                raise FormatError(f"{self.path}: manifest.json: a layer path is not a string")
            where = f"{self.path}: config {config_name!r} diff_ids[{i}]"
            if not isinstance(diff_id, str):
                raise FormatError(f"{where} is not a string")
            Descriptor.from_json({"mediaType": "", "digest": diff_id, "size": 0}, where=where)
            if diff_id not in layers:  # a repeated diff_id reuses the first layer's member
                layer = await self._layer(name)
                other = members.setdefault(layer.member.name, diff_id)
                if other != diff_id:
                    raise FormatError(
                        f"{self.path}: layer member {name!r} stands for two diff_ids,"
                        f" {other} and {diff_id}"
                    )
                layers[diff_id] = layer
            descriptors.append(
                {
                    "mediaType": MEDIA_TYPES.DOCKER_LAYER_GZIP,  # whatever the compression
                    "size": layers[diff_id].size,
                    "digest": diff_id,
                }
            )
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPES.DOCKER_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPES.DOCKER_CONFIG,
                "size": len(config_bytes),
                "digest": config_digest,
            },
            "layers": descriptors,
        }
        data = json.dumps(manifest, separators=(",", ":")).encode()
        self._blobs = {config_digest: config_member}
        self._layers = layers
        return ResolvedImage(
            data, "sha256:" + hashlib.sha256(data).hexdigest(), MEDIA_TYPES.DOCKER_MANIFEST
        )

    async def read_blob(self, descriptor: Descriptor, *, max_size: int = 64 << 20) -> bytes:
        """A small blob (the config, or a layer, decompressed), whole and checked."""
        layer = self._layers.get(descriptor.digest)
        if layer is None or layer.compression is None:
            return await super().read_blob(descriptor, max_size=max_size)
        if descriptor.size > max_size:
            raise ImageSourceError(
                f"{self.path}: blob {descriptor.digest} is {descriptor.size} bytes"
                f" (more than {max_size})"
            )
        async with self.open_blob(descriptor) as stream:
            data = b"".join([piece async for piece in stream])
        return verify_blob(data, descriptor, where=f"{self.path}: member {layer.member.name!r}")

    @asynccontextmanager
    async def open_blob(self, descriptor: Descriptor) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a blob in chunks of at most 1 MiB; a layer comes decompressed.

        Not checked here: the importer checks the bytes against the descriptor's
        digest, which for a layer is its diff_id.
        """
        layer = self._layers.get(descriptor.digest)
        if layer is None or layer.compression is None:
            async with super().open_blob(descriptor) as stream:
                yield stream
            return
        if layer.size != descriptor.size:
            raise FormatError(
                f"{self.path}: member {layer.member.name!r} decompresses to {layer.size}"
                f" bytes, the descriptor says {descriptor.size}"
            )
        where = f"{self.path}: member {layer.member.name!r} ({layer.compression})"
        reader = await trio.to_thread.run_sync(
            _decompressor, self.archive, layer.member, layer.compression
        )
        try:
            yield _DecompressedStream(reader, where)
        finally:
            reader.close()

    def _find_member(self, descriptor: Descriptor) -> TarMember:
        layer = self._layers.get(descriptor.digest)
        member = layer.member if layer is not None else self._blobs.get(descriptor.digest)
        if member is None:
            raise ImageSourceError(
                f"{self.description}: no blob {descriptor.digest}"
                + ("" if self._blobs else " (call resolve() first)")
            )
        return member
