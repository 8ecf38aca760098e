"""Writing objects and publishing names: the durability rules, each written once.

Blocking (layer L1). Both helpers take any object with the repository's methods (a
:class:`~trio_composefs.repository.Repository`, or a test wrapper such as
:class:`~trio_composefs.testing.FaultyRepository`, whose fault points they then meet).

* :func:`write_object`: pieces -> one temporary file -> size check -> digest -> link
  under the digest. The object is visible only once complete; on any error (or an
  exception raised from ``pieces``) the temporary file is discarded.
* :func:`publish_after_sync`: one ``syncfs``, then every name, in order. A crash
  before the sync leaves no name; after it, every object a name reaches is durable.
  This is the project's crash-safety invariant: no name without its data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, cast, overload

import attrs

from .._errors import InternalError
from ..formats._fsverity import Digest

__all__ = [
    "Digester",
    "ImageName",
    "ObjectTmpfileLike",
    "ObjectWriterLike",
    "PublisherLike",
    "StreamName",
    "StreamPublisherLike",
    "publish_after_sync",
    "write_object",
]

Digester = Callable[[int, int], Digest]
"""Computes an object's digest from ``(fd, size)`` (when the kernel does not measure it)."""


class ObjectTmpfileLike(Protocol):
    """An object being written (:class:`~trio_composefs.repository.ObjectTmpfile`)."""

    @property
    def fd(self) -> int: ...
    @property
    def size(self) -> int: ...
    def write(self, data: bytes, /) -> None: ...
    def finish(self, digest: Digest | None = None) -> tuple[Digest, bool]: ...
    def abort(self) -> None: ...


class ObjectWriterLike(Protocol):
    """What :func:`write_object` needs of a repository."""

    def begin_object(self) -> ObjectTmpfileLike: ...


class StreamPublisherLike(Protocol):
    """What :func:`publish_after_sync` needs of a repository to name streams."""

    def sync(self) -> None: ...
    def publish_stream(
        self, content_id: str, digest: Digest, ref: str | None = None, *, sync: bool = True
    ) -> None: ...


class PublisherLike(StreamPublisherLike, Protocol):
    """What :func:`publish_after_sync` needs of a repository to name streams and images."""

    def publish_image(
        self, digest: Digest, ref: str | None = None, *, sync: bool = True
    ) -> None: ...


def _nothing() -> None:
    pass


def write_object(
    repo: ObjectWriterLike,
    pieces: Iterable[bytes],
    *,
    size: int | None = None,
    digester: Digester | None = None,
    written: Callable[[], None] = _nothing,
) -> tuple[Digest, bool]:
    """Write ``pieces`` as one object and link it under its digest.

    Args:
        repo: the repository (or a wrapper).
        pieces: the content, in order (consumed once).
        size: the size the content must have; a different one is a bug of the
            caller (:class:`InternalError`) and nothing is linked.
        digester: computes the digest from ``(fd, size)``; ``None`` lets the
            repository decide (the kernel measures it, or it hashes the file).
        written: called once every byte is written, before the digest (e.g. to
            give a writer token back while the hashing waits).

    Returns:
        ``(digest, already_present)``: when already present, the new copy is discarded.
    """
    tmp = repo.begin_object()
    try:
        for piece in pieces:
            tmp.write(piece)
        if size is not None and tmp.size != size:
            raise InternalError(f"object job got {tmp.size} bytes, expected {size}")
        written()
        digest = digester(tmp.fd, tmp.size) if digester is not None else None
        return tmp.finish(digest)
    finally:
        tmp.abort()  # a no-op once linked


@attrs.frozen
class StreamName:
    """``streams/<content_id>`` -> ``digest``, and ``streams/refs/<ref>`` -> it."""

    content_id: str
    digest: Digest
    ref: str | None = None


@attrs.frozen
class ImageName:
    """``images/<hex>`` -> ``digest``, and ``images/refs/<ref>`` -> it."""

    digest: Digest
    ref: str | None = None


@overload
def publish_after_sync(
    repo: StreamPublisherLike,
    names: Sequence[StreamName],
    *,
    check_cancelled: Callable[[], None] = ...,
) -> None: ...
@overload
def publish_after_sync(
    repo: PublisherLike,
    names: Sequence[StreamName | ImageName],
    *,
    check_cancelled: Callable[[], None] = ...,
) -> None: ...
def publish_after_sync(
    repo: StreamPublisherLike,
    names: Sequence[StreamName | ImageName],
    *,
    check_cancelled: Callable[[], None] = _nothing,
) -> None:
    """``syncfs`` once, then link every name, in order: no name without its data.

    ``check_cancelled`` runs after the sync and before the first name (a trio
    worker thread passes ``trio.from_thread.check_cancelled``): a cancellation that
    arrives before then wins and nothing is named. Once linking has begun, every
    name is linked (or an error is raised).
    """
    repo.sync()
    check_cancelled()
    for name in names:
        if isinstance(name, StreamName):
            repo.publish_stream(name.content_id, name.digest, name.ref, sync=False)
        else:  # the overloads make sure that such a repo is a PublisherLike
            cast(PublisherLike, repo).publish_image(name.digest, name.ref, sync=False)
