"""OCI images: pull a manifest, its config and its layers (in parallel) into a repository; tags.

What a pull stores, exactly as composefs-rs does (so stream ids match):

* each tar layer as ``streams/oci-layer-<diff_id>`` (content type ``ocilayer``);
  a non-tar blob (an artifact) raw, as one object behind an ``oci_blob``
  splitstream ``streams/oci-layer-<blob digest>``;
* the config as ``streams/oci-config-<config digest>`` (``ociconfg``): named
  refs ``diff_id -> layer stream`` in config order, and the raw JSON as one
  external object;
* the manifest as ``streams/oci-manifest-<manifest digest>`` (``ocimanif``):
  named refs ``config:<config digest> -> config stream`` then each
  ``diff_id -> layer stream``, and the raw JSON as one external object;
* a tag as ``streams/refs/oci/<encoded name>`` -> the manifest stream, where the
  name is encoded ``%`` -> ``%25`` then ``/`` -> ``%2F``.

Both digests of every layer are checked before anything is published: the
stored blob's sha256 (and size) against the manifest, while it streams, and the
uncompressed tar's sha256 against the config's ``rootfs.diff_ids``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Final, cast

import attrs
import trio

from .._errors import (
    ComposefsError,
    DigestMismatchError,
    FormatError,
)
from ..formats._chunks import ExternalChunk
from ..formats._fsverity import Digest
from ..formats._splitstream import ContentType, encode_splitstream
from ..importer._decompress import Compression, open_verified_stream
from ..importer._entries import EntrySink
from ..importer._importer import (
    Importer,
    LayerProgress,
    LayerStats,
    RepositoryLike,
    layer_content_id,
    open_importer,
)
from ..importer._writers import digester_for
from ..repository._reading import stream_is_complete, usable_stream
from ..repository._repository import Repository
from ..repository._writing import StreamName, publish_after_sync, write_object
from ._build import (
    DEFAULT_IMAGE_REF,
    commit_image_streams,
    config_content_id,
    image_refs,
    manifest_content_id,
    read_external,
)
from ._image_tree import PartialTree
from ._manifest import _IMAGE_CONFIG_TYPES, _check_bytes, _diff_ids, _parse_manifest
from ._model import MEDIA_TYPES, Descriptor, ImageSource, Platform, SourceRef
from ._names import _check_tag
from ._tree_tap import ImageTreeTap
from .sources._docker import DockerArchiveSource
from .sources._layout import OciLayoutSource
from .sources._oci_archive import OciArchiveSource
from .sources._skopeo import SkopeoOptions, SkopeoProxySource

__all__ = [
    "ImageProgress",
    "ImageStats",
    "open_source",
    "pull_image",
]

_TAR_TYPES: Final[Mapping[str, Compression]] = {
    MEDIA_TYPES.OCI_LAYER: None,
    MEDIA_TYPES.OCI_LAYER_GZIP: "gzip",
    MEDIA_TYPES.OCI_LAYER_ZSTD: "zstd",
    MEDIA_TYPES.OCI_LAYER_ND: None,
    MEDIA_TYPES.OCI_LAYER_ND_GZIP: "gzip",
    MEDIA_TYPES.OCI_LAYER_ND_ZSTD: "zstd",
    MEDIA_TYPES.DOCKER_LAYER: None,
    MEDIA_TYPES.DOCKER_LAYER_GZIP: "gzip",
    MEDIA_TYPES.DOCKER_LAYER_FOREIGN_GZIP: "gzip",
}
"""Media types of tar layers and their compression; any other layer is stored raw."""

_MAX_JSON: Final = 64 << 20


# --------------------------------------------------------------------------- values


@attrs.frozen
class ImageStats:
    """What :func:`pull_image` did."""

    source: str
    manifest_digest: str
    config_digest: str
    manifest_stream: Digest
    """The fs-verity digest of the manifest splitstream (cfsctl prints it as ``verity``)."""
    config_stream: Digest
    tag: str | None
    layers: tuple[LayerStats, ...]
    """One per manifest layer, in manifest order."""
    skipped: bool = False
    """The manifest was already stored; nothing was read but the manifest."""
    images: tuple[tuple[str, Digest], ...] = ()
    """The composefs images (config named-ref name, image ID): ``composefs.image.v1``."""

    @property
    def image(self) -> Digest | None:
        """The image ID of the default (V1) composefs image, if one was made."""
        return dict(self.images).get(DEFAULT_IMAGE_REF)

    @property
    def layers_imported(self) -> int:
        """Layers read and split by this pull (not already present)."""
        return sum(1 for layer in self.layers if not layer.skipped)

    @property
    def objects_written(self) -> int:
        """New objects stored for the layers."""
        return sum(layer.objects_written for layer in self.layers)

    @property
    def objects_deduplicated(self) -> int:
        """Layer objects that were already in the repository."""
        return sum(layer.objects_deduplicated for layer in self.layers)

    @property
    def tar_bytes(self) -> int:
        """Uncompressed bytes read."""
        return sum(layer.tar_bytes for layer in self.layers)

    @property
    def object_bytes(self) -> int:
        """Bytes of file content referenced by the imported layers."""
        return sum(layer.object_bytes for layer in self.layers)


@attrs.frozen
class ImageProgress:
    """A snapshot handed to :func:`pull_image`'s ``progress`` callback (on the trio thread).

    Sent when a layer starts, while its compressed blob is read (at most every
    0.1 s per layer), whenever its :class:`LayerProgress` moves, when it ends or
    is skipped, and with a ``message`` for image-level steps (config, manifest,
    tag). Sizes come from the manifest, so a display can show totals and an ETA
    from the first event on.

    Attributes:
        layers_total: layers in the manifest.
        layers_done: layers finished (imported or skipped).
        layers_skipped: layers found already present (not read).
        layer: the layer this event is about, if any.
        message: an image-level step, if this event is one.
        bytes_total: compressed bytes of all layers (sum of the manifest's sizes).
        bytes_done: compressed bytes read so far, plus the sizes of skipped layers.
        layer_size: compressed size of ``layer``'s blob (from the manifest).
        layer_read: compressed bytes of ``layer``'s blob read so far.
        skipped: ``layer`` is already present and is not read.
    """

    layers_total: int
    layers_done: int
    layers_skipped: int
    layer: LayerProgress | None = None
    message: str | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    layer_size: int | None = None
    layer_read: int = 0
    skipped: bool = False


ProgressCallback = Callable[[ImageProgress], object]


# --------------------------------------------------------------------------- sources


def open_source(ref: SourceRef, *, skopeo: SkopeoOptions | None = None) -> ImageSource:
    """The :class:`ImageSource` for a parsed reference (enter it with ``async with``).

    ``skopeo`` (TLS verification, credentials) is for the transports skopeo
    serves (``docker://``...); the local ones ignore it.

    Raises:
        ImageSourceError: skopeo is needed and not installed (when entered).
    """
    if ref.transport == "oci":
        return OciLayoutSource(ref.path, tag=ref.tag, digest=ref.digest)
    if ref.transport == "oci-archive":
        return OciArchiveSource(ref.path, tag=ref.tag, digest=ref.digest)
    if ref.transport == "docker-archive":
        return DockerArchiveSource.from_reference(ref.path)
    # Any other transport (docker://, containers-storage:, dir:, ...) goes through
    # skopeo's image proxy, as composefs-rs does: layers stream from the source
    # while they are imported, nothing waits for a whole copy of the image.
    # (SkopeoSource, which copies to a directory first, remains for callers.)
    return SkopeoProxySource(str(ref), options=skopeo or SkopeoOptions())


# --------------------------------------------------------------------------- blocking repo work


def _store_blob_object(
    repo: RepositoryLike,
    pieces: Any,
    hash_pool: Any,
) -> tuple[Digest, int, bool]:
    """Write a verified blob stream (pulled from the trio side) as one object."""

    async def pull() -> bytes | None:
        try:
            piece: bytes = await pieces.__anext__()
            return piece
        except StopAsyncIteration:
            return None

    size = 0

    def received() -> Iterator[bytes]:
        nonlocal size
        while (piece := trio.from_thread.run(pull)) is not None:
            size += len(piece)
            yield piece

    obj, present = write_object(repo, received(), digester=digester_for(repo, hash_pool))
    return obj, size, present


def _store_blob_stream(repo: Repository, cid: str, obj: Digest, size: int) -> Digest:
    splitstream = encode_splitstream(
        [ExternalChunk(obj, size)], algorithm=repo.algorithm, content_type=ContentType.OCI_BLOB
    )
    digest = repo.store_object(splitstream)
    publish_after_sync(
        repo, [StreamName(cid, digest)], check_cancelled=trio.from_thread.check_cancelled
    )
    return digest


# --------------------------------------------------------------------------- pull


@attrs.define(eq=False)
class _Pull:
    importer: Importer
    source: ImageSource
    progress: ProgressCallback | None
    layers_total: int = 0
    layers_done: int = 0
    layers_skipped: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    sizes: dict[str, int] = attrs.Factory(dict)
    read: dict[str, int] = attrs.Factory(dict)
    last: dict[str, LayerProgress] = attrs.Factory(dict)

    @property
    def repo(self) -> Repository:
        return cast(Repository, self.importer.repo)

    def report(
        self, layer: LayerProgress | None = None, message: str | None = None, skipped: bool = False
    ) -> None:
        if self.progress is None:
            return
        if layer is not None:
            self.last[layer.diff_id] = layer
        key = layer.diff_id if layer is not None else ""
        self.progress(
            ImageProgress(
                self.layers_total,
                self.layers_done,
                self.layers_skipped,
                layer,
                message,
                bytes_total=self.bytes_total,
                bytes_done=self.bytes_done,
                layer_size=self.sizes.get(key),
                layer_read=self.read.get(key, 0),
                skipped=skipped,
            )
        )

    def counted(self, pieces: AsyncIterator[bytes], diff_id: str) -> AsyncIterator[bytes]:
        """``pieces``, counting the compressed bytes read for the progress events."""
        return _Counted(pieces, self, diff_id)

    async def thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.importer.metadata_limiter)

    async def ensure_layer(
        self, desc: Descriptor, diff_id: str, entries: EntrySink | None = None
    ) -> tuple[LayerStats, bool]:
        """Import one layer unless it is present, or being imported by another task here.

        Returns its stats and whether ``entries`` received all its entries (a tar
        layer this call imported).
        """
        repo = self.repo
        compression = _TAR_TYPES.get(desc.media_type, "raw")
        cid = layer_content_id(diff_id)  # also for raw blobs, as upstream (their digest, usually)
        self.sizes[diff_id] = desc.size
        while True:
            # Not just the name: a stream whose object, header or files are lost is
            # imported again (which repairs it), never skipped.
            existing = await self.thread(
                lambda: (
                    usable_stream(repo, cid, content_type=ContentType.OCI_LAYER)
                    if compression != "raw"
                    else usable_stream(repo, cid)
                )
            )
            if existing is not None:
                self.layers_skipped += 1
                self.layers_done += 1
                self.bytes_done += desc.size
                self.report(LayerProgress(diff_id, 0, 0, 0, 0, done=True), skipped=True)
                return LayerStats(diff_id=diff_id, splitstream=existing, skipped=True), False
            event = self.importer.in_flight(cid)
            if event is None:
                break
            await event.wait()
        with self.importer.claim_layer(cid):
            self.report(LayerProgress(diff_id, 0, 0, 0, 0))
            if compression == "raw":
                stats = await self._import_blob(desc, diff_id, cid)
            else:
                stats = await self._import_tar(
                    desc, diff_id, cast(Compression, compression), entries
                )
        self.layers_done += 1
        self.report(
            LayerProgress(
                diff_id,
                stats.tar_bytes,
                stats.objects_written,
                stats.objects_deduplicated,
                0,
                done=True,
            )
        )
        return stats, compression != "raw" and entries is not None

    async def _import_tar(
        self,
        desc: Descriptor,
        diff_id: str,
        compression: Compression,
        entries: EntrySink | None = None,
    ) -> LayerStats:
        where = f"{self.source.description}: layer {desc.digest} (diff_id {diff_id})"
        async with (
            self.source.open_blob(desc) as pieces,
            open_verified_stream(
                self.counted(pieces, diff_id),
                compression=compression,
                digest=desc.digest,
                size=desc.size,
                where=where,
                detect=True,
            ) as stream,
        ):
            return await self.importer.import_layer(
                stream, diff_id, progress=lambda p: self.report(p), force=True, entries=entries
            )

    async def _import_blob(self, desc: Descriptor, diff_id: str, cid: str) -> LayerStats:
        where = f"{self.source.description}: blob {desc.digest}"
        async with (
            self.source.open_blob(desc) as pieces,
            open_verified_stream(
                self.counted(pieces, diff_id),
                compression=None,
                digest=desc.digest,
                size=desc.size,
                where=where,
            ) as stream,
        ):
            obj, size, present = await trio.to_thread.run_sync(
                _store_blob_object,
                self.importer.repo,
                stream,
                self.importer.hash_pool,
                limiter=trio.CapacityLimiter(1),  # its own: it waits for the stream's worker
            )
        digest = await self.thread(_store_blob_stream, self.repo, cid, obj, size)
        return LayerStats(
            diff_id=diff_id,
            splitstream=digest,
            tar_bytes=size,
            objects=1,
            objects_written=int(not present),
            objects_deduplicated=int(present),
            object_bytes=size,
        )


@attrs.define(eq=False)
class _Counted:
    """An async iterator over a blob's pieces that counts them for :class:`_Pull`'s events."""

    pieces: AsyncIterator[bytes]
    state: _Pull
    diff_id: str
    last_report: float = -1.0

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        piece = await self.pieces.__anext__()
        state = self.state
        state.read[self.diff_id] = state.read.get(self.diff_id, 0) + len(piece)
        state.bytes_done += len(piece)
        now = trio.current_time()
        if now - self.last_report >= 0.1:
            self.last_report = now
            layer = state.last.get(self.diff_id) or LayerProgress(self.diff_id, 0, 0, 0, 0)
            state.report(layer)
        return piece


async def pull_image(
    target: RepositoryLike | Importer,
    source: ImageSource,
    *,
    tag: str | None = None,
    platform: Platform | None = None,
    progress: ProgressCallback | None = None,
    layer_jobs: int | None = None,
) -> ImageStats:
    """Pull an image from ``source`` (already entered) into the repository.

    Layers are imported concurrently, largest first, at most ``layer_jobs``
    at once (default: one per CPU), each in its own task of a nursery nested
    in this call, all sharing the importer's object-writer limiter and hash
    pool. A layer whose stream exists is skipped; one that another pull through
    the same importer is importing is waited for, not imported twice.

    Args:
        target: a repository, or an :class:`Importer` to share with other
            pulls running at the same time.
        source: where the image comes from (``async with`` it first).
        tag: also publish ``streams/refs/oci/<encoded tag>``.
        platform: which image of an index (default: the current platform).
        progress: called with :class:`ImageProgress` snapshots.
        layer_jobs: layers imported at once.

    Returns:
        The manifest and config digests, their stream ids, and per-layer stats.

    Raises:
        ExceptionGroup: whatever the layer tasks raised, e.g.
            :class:`DigestMismatchError` (a blob or tar that does not match
            its digest, naming the layer and both digests), ``FormatError``.
            One failing layer cancels the others; the config, manifest and
            tag are then not published.
        ComposefsError: an invalid tag; errors of the source (no such image).

    **Cancellation:** safe at any point; layers already published stay (they
    are complete), the manifest and tag are published last.
    """
    ref = _check_tag(tag) if tag is not None else None
    if isinstance(target, Importer):
        return await _pull(target, source, ref, tag, platform, progress, layer_jobs)
    async with open_importer(target) as importer:
        return await _pull(importer, source, ref, tag, platform, progress, layer_jobs)


@attrs.frozen
class _Target:
    """What one pull resolved (the manifest, checked against its digest) and where it goes."""

    where: str
    manifest: bytes
    manifest_digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    ref: str | None
    tag: str | None

    @property
    def container(self) -> bool:
        return self.config.media_type in _IMAGE_CONFIG_TYPES

    @property
    def manifest_id(self) -> str:
        return manifest_content_id(self.manifest_digest)

    @property
    def config_id(self) -> str:
        return config_content_id(self.config.digest)


async def _pull(
    importer: Importer,
    source: ImageSource,
    ref: str | None,
    tag: str | None,
    platform: Platform | None,
    progress: ProgressCallback | None,
    layer_jobs: int | None,
) -> ImageStats:
    state = _Pull(importer, source, progress)
    await state.thread(state.repo.ensure_writable)
    resolved = await source.resolve(platform)
    where = source.description
    _check_bytes(resolved.manifest, resolved.digest, f"{where}: manifest {resolved.digest}")
    config_desc, layer_descs = _parse_manifest(resolved.manifest, where)
    target = _Target(
        where, resolved.manifest, resolved.digest, config_desc, tuple(layer_descs), ref, tag
    )
    state.layers_total = len(layer_descs)
    state.bytes_total = sum(d.size for d in layer_descs)
    existing, config_existing, stored_images = await _stored_streams(state, target)
    stored = stored_images or not target.container
    if existing is not None and config_existing is not None and stored:  # fast path
        return await _skip_stored(state, target, existing, config_existing, stored_images)
    config_bytes, config_stream, layers, tree = await _config_and_layers(
        state, target, config_existing, layer_jobs
    )
    return await _commit(state, target, config_bytes, config_stream, layers, tree)


async def _stored_streams(
    state: _Pull, target: _Target
) -> tuple[Digest | None, Digest | None, list[tuple[str, Digest]]]:
    """``(manifest stream, config stream, images)`` already stored for ``target``.

    The manifest stream is ``None`` when a layer it reaches is damaged (it is imported
    again and the streams rewritten); images whose objects are missing are left out.
    """
    repo = state.repo
    existing = await state.thread(repo.has_stream, target.manifest_id)
    config_existing = await state.thread(repo.has_stream, target.config_id)
    stored_images: list[tuple[str, Digest]] = []
    if existing is not None and config_existing is not None:
        _, config_named = await state.thread(
            read_external, repo, target.config_id, ContentType.OCI_CONFIG
        )
        stored_images = image_refs(config_named)
        if target.container and not all(repo.has_object(d) for _, d in stored_images):
            stored_images = []
        layer_streams = [d for k, d in config_named.items() if not k.startswith("composefs.image")]
        if not await state.thread(lambda: all(stream_is_complete(repo, d) for d in layer_streams)):
            stored_images = []
            existing = None  # a layer was damaged: re-import it, then rewrite the streams
    return existing, config_existing, stored_images


async def _skip_stored(
    state: _Pull,
    target: _Target,
    existing: Digest,
    config_existing: Digest,
    stored_images: list[tuple[str, Digest]],
) -> ImageStats:
    """The stats of a pull that found the whole image stored (only the tag is published)."""
    repo = state.repo
    _, named = await state.thread(read_external, repo, target.manifest_id, ContentType.OCI_MANIFEST)
    # Report the layers in the image's order (named refs are sorted by name).
    order = [d.digest for d in target.layers]
    with contextlib.suppress(ComposefsError, ValueError, KeyError, TypeError):
        config_json, _ = await state.thread(
            read_external, repo, target.config_id, ContentType.OCI_CONFIG
        )
        order = list(json.loads(config_json)["rootfs"]["diff_ids"])
    layer_ids = [(d, named[d]) for d in order if d in named]
    layer_ids += [
        (k, v)
        for k, v in named.items()
        if not k.startswith("config:") and k not in {d for d, _ in layer_ids}
    ]
    if target.ref is not None:
        await state.thread(repo.publish_stream, target.manifest_id, existing, target.ref)
    state.layers_done = state.layers_skipped = len(target.layers)
    state.bytes_done = state.bytes_total
    state.report(message=f"already have manifest {target.manifest_digest}")
    return ImageStats(
        source=target.where,
        manifest_digest=target.manifest_digest,
        config_digest=target.config.digest,
        manifest_stream=existing,
        config_stream=config_existing,
        tag=target.tag,
        layers=tuple(LayerStats(d, s, skipped=True) for d, s in layer_ids),
        skipped=True,
        images=tuple(stored_images),
    )


async def _config_and_layers(
    state: _Pull, target: _Target, config_existing: Digest | None, layer_jobs: int | None
) -> tuple[bytes | None, Digest | None, tuple[LayerStats, ...], PartialTree | None]:
    """Read the config (unless stored) and import the layers that are not stored.

    Returns:
        ``(config bytes, config stream, layers, tree)``: the bytes when the config
        stream is to be (re)written, else the stored stream to reuse; the tree of the
        layers built while importing them (a container image), if any.
    """
    repo, where, config_desc = state.repo, target.where, target.config
    config_digest = config_desc.digest
    if config_existing is not None:
        config_bytes, named = await state.thread(
            read_external, repo, target.config_id, ContentType.OCI_CONFIG
        )
        diff_ids = _diff_ids(config_desc, config_bytes, target.layers, where)
        missing = [d for d in diff_ids if d not in named]
        if missing:
            raise FormatError(f"stream {target.config_id} has no layer ref for {missing[0]}")
        complete = await state.thread(
            lambda: all(stream_is_complete(repo, named[d]) for d in diff_ids)
        )
        if complete:
            layers = tuple(LayerStats(d, named[d], skipped=True) for d in diff_ids)
            state.layers_done = state.layers_skipped = len(layers)
            state.bytes_done = state.bytes_total
            return None, config_existing, layers, None
        # A damaged layer: import what is missing, then rewrite the config stream.
        layers, tree = await _import_layers(state, target, diff_ids, layer_jobs)
        return config_bytes, None, layers, tree
    state.report(message=f"reading config {config_digest}")
    config_bytes = await state.source.read_blob(config_desc)
    _check_bytes(config_bytes, config_digest, f"{where}: config {config_digest}")
    if len(config_bytes) != config_desc.size:
        raise DigestMismatchError(
            f"{where}: config {config_digest} has {len(config_bytes)} bytes,"
            f" the manifest says {config_desc.size}"
        )
    diff_ids = _diff_ids(config_desc, config_bytes, target.layers, where)
    layers, tree = await _import_layers(state, target, diff_ids, layer_jobs)
    return config_bytes, None, layers, tree


async def _commit(
    state: _Pull,
    target: _Target,
    config_bytes: bytes | None,
    config_stream: Digest | None,
    layers: tuple[LayerStats, ...],
    tree: PartialTree | None = None,
) -> ImageStats:
    """Build the composefs image, store config and manifest streams, then name them."""
    state.report(message=f"storing manifest {target.manifest_digest}")
    layer_refs = [(stats.diff_id, stats.splitstream) for stats in layers]
    if target.container:
        state.report(message="building the composefs image")
    config_stream, manifest_stream, images = await state.thread(
        lambda: commit_image_streams(
            state.repo,
            config_digest=target.config.digest,
            config_bytes=config_bytes,
            config_stream=config_stream,
            manifest_digest=target.manifest_digest,
            manifest_bytes=target.manifest,
            layer_refs=layer_refs,
            ref=target.ref,
            container=target.container,
            check_cancelled=trio.from_thread.check_cancelled,
            tree=tree,
        )
    )
    return ImageStats(
        source=target.where,
        manifest_digest=target.manifest_digest,
        config_digest=target.config.digest,
        manifest_stream=manifest_stream,
        config_stream=config_stream,
        tag=target.tag,
        layers=layers,
        images=tuple(images),
    )


async def _import_layers(
    state: _Pull, target: _Target, diff_ids: Sequence[str], layer_jobs: int | None
) -> tuple[tuple[LayerStats, ...], PartialTree | None]:
    """Import the layers not stored (largest first); for a container image, also build
    its tree from their entries meanwhile (:class:`ImageTreeTap`).

    Returns:
        The layers' stats in config order, and the tree (``None``: read them all back).
    """
    descs = target.layers
    results: list[LayerStats | None] = [None] * len(descs)
    limit = trio.CapacityLimiter(layer_jobs or os.cpu_count() or 2)
    order = sorted(range(len(descs)), key=lambda i: -descs[i].size)
    tap = ImageTreeTap(state.repo, diff_ids) if target.container else None

    async def one(i: int, token: object) -> None:
        try:
            sink = tap.sink(i) if tap is not None else None
            stats, tapped = await state.ensure_layer(descs[i], diff_ids[i], sink)
            results[i] = stats
            if tap is not None:
                tap.layer_done(i, stats, tapped=tapped)
        finally:
            limit.release_on_behalf_of(token)

    async with trio.open_nursery() as nursery:
        if tap is not None:
            nursery.start_soon(tap.run)
        for i in order:
            token = object()
            await limit.acquire_on_behalf_of(token)
            nursery.start_soon(one, i, token)
    out = tuple(r for r in results if r is not None)
    if len(out) != len(descs):  # pragma: no cover - the nursery raised otherwise
        raise ComposefsError("a layer task finished without a result")
    return out, tap.result() if tap is not None else None
