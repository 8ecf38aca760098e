"""Copy a stored OCI image, with everything it needs, from one repository into another.

What ``cfsctl oci copy IMAGE --from REPO [--tag NAME]`` does. An image's closure
is its manifest splitstream and what it reaches: the config splitstream, the
layer splitstreams (named ``oci-layer-<diff_id>``), the composefs (EROFS)
images the config names (``composefs.image…``), the raw manifest and config
JSON objects, and every file object of the layers and images.

The copy keeps the source's object ids (both repositories must use one
fs-verity algorithm), so the copied streams' references hold as they are:

1. every object of the closure is added with
   :meth:`Repository.add_object_from`, which re-hashes it and refuses (with
   :class:`DigestMismatchError`) an object whose content is not its name, then
   hard-links it (one filesystem) or copies it (another filesystem);
2. one ``syncfs`` on the destination;
3. only then the names: layer streams (where the destination has no complete
   stream of that name), the config and manifest streams, ``images/<hex>``
   for each composefs image, and last the tag.

A failure before step 3 leaves only unnamed objects in the destination, which
``gc`` removes; nothing of the image is named there.
"""

from __future__ import annotations

import hashlib
import mmap
import os

import attrs
import trio

from .._errors import DigestMismatchError, RepositoryError
from ..formats._fsverity import Digest
from ..formats._splitstream import MAGIC_PROBE_BYTES, has_splitstream_magic, parse_splitstream
from ..importer._importer import layer_content_id
from ..repository import Repository, referenced_objects, stream_is_complete
from ..repository._writing import ImageName, StreamName, publish_after_sync
from ._build import config_content_id, manifest_content_id
from ._names import _check_tag
from ._stored import StoredImage, open_image, tag_image

__all__ = ["CopyStats", "copy_image"]

#: Objects added at once (each addition is a thread hop: open, hash, link or copy).
DEFAULT_JOBS = 4


@attrs.frozen
class CopyStats:
    """What :func:`copy_image` did.

    Attributes:
        manifest_digest: the image's manifest digest (the same in both repositories).
        config_digest: its config digest.
        tag: the tag set in the destination, if any.
        objects: objects in the image's closure.
        linked: objects hard-linked from the source.
        copied: objects copied (another filesystem, or fs-verity needed).
        present: objects the destination had already.
        streams_named: stream names published in the destination.
        images_named: composefs images published (``images/<hex>``).
    """

    manifest_digest: str
    config_digest: str
    tag: str | None
    objects: int
    linked: int
    copied: int
    present: int
    streams_named: tuple[str, ...]
    images_named: tuple[Digest, ...]


@attrs.define
class _Closure:
    """The objects of an image, leaves first, and the names to publish."""

    objects: dict[Digest, None] = attrs.field(factory=dict)  # an ordered set
    streams: list[tuple[str, Digest]] = attrs.field(factory=list)
    images: list[Digest] = attrs.field(factory=list)


def _stream_refs(repo: Repository, digest: Digest) -> tuple[list[Digest], list[Digest]]:
    """A splitstream's ``(object_refs, stream_refs)``."""
    fd = repo.open_object(digest)
    try:
        if os.fstat(fd).st_size == 0:
            raise RepositoryError(f"{repo.path}: splitstream {digest} is empty")
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            info = parse_splitstream(data, algorithm=repo.algorithm)
            return list(info.object_refs), list(info.stream_refs)
    finally:
        os.close(fd)


def _closure(src: Repository, dst: Repository, stored: StoredImage) -> _Closure:
    """Walk the image in ``src`` (blocking). Layer streams that ``dst`` already has,
    complete and identical, are not walked: their objects are there."""
    closure = _Closure()
    images = {digest for _, digest in stored.images}
    layers = {digest for _, digest in stored.layers}
    walked: set[Digest] = set()

    def add_image(digest: Digest) -> None:
        if digest in walked:
            return
        walked.add(digest)
        for obj in sorted(referenced_objects(src, digest), key=lambda d: d.raw):
            closure.objects.setdefault(obj)
        closure.objects.setdefault(digest)

    def add_stream(digest: Digest) -> None:
        if digest in walked:
            return
        walked.add(digest)
        objects, streams = _stream_refs(src, digest)
        for obj in objects:
            closure.objects.setdefault(obj)
        for ref in streams:
            if ref in images:
                add_image(ref)
            elif has_splitstream_magic(src.read_object_head(ref, MAGIC_PROBE_BYTES)):
                if ref in layers and stream_is_complete(dst, ref):
                    walked.add(ref)  # a layer (no stream refs): its objects are in dst already
                    closure.objects.setdefault(ref)
                else:
                    add_stream(ref)
            else:  # an image the config does not name as such: still an EROFS image
                add_image(ref)
        closure.objects.setdefault(digest)

    add_stream(stored.manifest_stream)
    closure.streams = [(layer_content_id(d), s) for d, s in stored.layers]
    closure.streams.append((config_content_id(stored.config_digest), stored.config_stream))
    closure.streams.append((manifest_content_id(stored.manifest_digest), stored.manifest_stream))
    closure.images = [digest for _, digest in stored.images]
    return closure


def _open_checked(src: Repository, image: str) -> StoredImage:
    """Open ``image`` in ``src`` and check its manifest and config JSON against their digests."""
    stored = open_image(src, image)
    for what, data, digest in (
        ("manifest", stored.manifest, stored.manifest_digest),
        ("config", stored.config, stored.config_digest),
    ):
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatchError(
                f"{src.path}: the stored {what} {digest} has digest {actual}; not copied"
            )
    return stored


def _publish(dst: Repository, closure: _Closure, layer_names: set[str]) -> list[str]:
    """One syncfs, then the names (blocking). Layer names the destination has (complete)
    are kept; the config and manifest names are (re)pointed at the copied streams."""
    names: list[StreamName | ImageName] = []
    for name, digest in closure.streams:
        if name in layer_names:
            have = dst.has_stream(name)
            if have is not None and stream_is_complete(dst, have):
                continue
        names.append(StreamName(name, digest))
    names += [ImageName(digest) for digest in closure.images]
    publish_after_sync(dst, names, check_cancelled=trio.from_thread.check_cancelled)
    return [n.content_id for n in names if isinstance(n, StreamName)]


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from the workers' group: the first one (one failing worker
    cancels the others, whose Cancelled never reaches here)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def copy_image(
    src: Repository,
    dst: Repository,
    image: str,
    *,
    tag: str | None = None,
    jobs: int = DEFAULT_JOBS,
    limiter: trio.CapacityLimiter | None = None,
) -> CopyStats:
    """Copy the stored image ``image`` of ``src`` into ``dst``, verified, and tag it.

    Args:
        src: the repository that has the image (read only).
        dst: the repository to copy it into (same fs-verity algorithm).
        image: a tag, ``@sha256:...`` or ``sha256:...`` (manifest digest) in ``src``.
        tag: tag the image in ``dst`` (replacing a tag of that name).
        jobs: objects added at once.
        limiter: the thread limiter for the blocking work (default: trio's).

    Returns:
        What was copied, linked and named.

    Raises:
        ObjectNotFoundError: no such image in ``src``, or an object of it is missing.
        DigestMismatchError: an object (or the manifest or config JSON) of ``src``
            does not match its digest; nothing of the image is named in ``dst``.
        RepositoryError: the repositories use different algorithms; ``dst`` is read-only.

    **Cancellation:** at any point; objects added so far stay unnamed (gc removes them).
    """
    if src.algorithm is not dst.algorithm:
        raise RepositoryError(
            f"cannot copy from {src.path} ({src.algorithm}) into {dst.path} ({dst.algorithm}):"
            " the object ids differ between algorithms"
        )
    if tag is not None:
        _check_tag(tag)

    await trio.to_thread.run_sync(dst.ensure_writable, limiter=limiter)
    stored = await trio.to_thread.run_sync(_open_checked, src, image, limiter=limiter)
    closure = await trio.to_thread.run_sync(_closure, src, dst, stored, limiter=limiter)
    counts = {"present": 0, "linked": 0, "copied": 0}
    pending = list(closure.objects)
    pending.reverse()  # popped from the end: leaves first

    async def worker() -> None:
        while pending:
            digest = pending.pop()
            outcome = await trio.to_thread.run_sync(
                dst.add_object_from, src, digest, limiter=limiter
            )
            counts[outcome] += 1

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, jobs)):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from None
    layer_names = {layer_content_id(d) for d, _ in stored.layers}
    named = await trio.to_thread.run_sync(_publish, dst, closure, layer_names, limiter=limiter)
    if tag is not None:
        await trio.to_thread.run_sync(tag_image, dst, stored.manifest_digest, tag, limiter=limiter)
    return CopyStats(
        manifest_digest=stored.manifest_digest,
        config_digest=stored.config_digest,
        tag=tag,
        objects=len(closure.objects),
        linked=counts["linked"],
        copied=counts["copied"],
        present=counts["present"],
        streams_named=tuple(named),
        images_named=tuple(closure.images),
    )
