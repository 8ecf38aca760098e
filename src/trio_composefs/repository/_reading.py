"""Reading splitstreams back out of a repository: chunks, the original bytes, tar entries.

Blocking code (no trio): the CLI calls it directly and async callers run it in
a worker thread. A splitstream file is mapped, not read, so a layer of any
size costs no more memory than its largest inline piece.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .._errors import ComposefsError, FormatError
from ..formats._chunks import Chunk, ExternalChunk, InlineChunk
from ..formats._fsverity import Digest
from ..formats._splitstream import SplitStreamInfo, iter_chunks, parse_splitstream
from ..formats._tarentries import TarEntry, iter_entries
from ._repository import Repository

__all__ = [
    "copy_stream",
    "iter_layer_entries",
    "open_splitstream",
    "read_stream_info",
    "stream_chunks",
    "stream_is_complete",
    "usable_stream",
]

_COPY_SIZE = 1 << 20


@contextmanager
def open_splitstream(
    repo: Repository, name: str, *, content_type: int | None = None
) -> Iterator[tuple[SplitStreamInfo, mmap.mmap]]:
    """Resolve ``name`` (a content id or ``refs/...``) and map its splitstream."""
    digest = repo.resolve_stream(name)
    fd = repo.open_object(digest)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            try:
                info = parse_splitstream(data, algorithm=repo.algorithm, content_type=content_type)
            except FormatError as e:
                raise type(e)(f"stream {name} (object {digest.object_path()}): {e}") from None
            yield info, data
    finally:
        os.close(fd)


def stream_chunks(
    repo: Repository, name: str, *, content_type: int | None = None
) -> Iterator[Chunk]:
    """The chunks of stream ``name``, in order."""
    with open_splitstream(repo, name, content_type=content_type) as (info, data):
        yield from iter_chunks(data, info, repo.object_size)


def copy_stream(repo: Repository, name: str, write: Callable[[bytes], object]) -> int:
    """Write the reassembled bytes of stream ``name`` through ``write``; return the count."""
    total = 0
    for chunk in stream_chunks(repo, name):
        if isinstance(chunk, InlineChunk):
            write(chunk.data)
            total += len(chunk.data)
        else:
            total += _copy_object(repo, chunk, write)
    return total


def _copy_object(repo: Repository, chunk: ExternalChunk, write: Callable[[bytes], object]) -> int:
    fd = repo.open_object(chunk.digest)
    try:
        done = 0
        while piece := os.read(fd, _COPY_SIZE):
            write(piece)
            done += len(piece)
    finally:
        os.close(fd)
    if done != chunk.size:
        raise FormatError(
            f"object {chunk.digest.object_path()} has {done} bytes, the stream expects {chunk.size}"
        )
    return done


def iter_layer_entries(repo: Repository, name: str) -> Iterator[TarEntry]:
    """The tar entries of a layer stream, read from its inline chunks and object sizes."""
    yield from iter_entries(stream_chunks(repo, name))


def object_digests(repo: Repository, name: str) -> list[Digest]:
    """The object references of stream ``name``, without decompressing it."""
    with open_splitstream(repo, name) as (info, _data):
        return list(info.object_refs)


def read_stream_info(
    repo: Repository, digest: Digest, *, content_type: int | None = None
) -> SplitStreamInfo | None:
    """The parsed header of the splitstream object ``digest``, or None if it is missing,
    empty or does not parse (for checks that report damage themselves)."""
    try:
        fd = repo.open_object(digest)
    except (OSError, ComposefsError):
        return None
    try:
        if os.fstat(fd).st_size == 0:
            return None
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            return parse_splitstream(data, algorithm=repo.algorithm, content_type=content_type)
    except (OSError, ComposefsError, ValueError):
        return None
    finally:
        os.close(fd)


def stream_is_complete(
    repo: Repository, digest: Digest, *, content_type: int | None = None
) -> bool:
    """Whether the splitstream object ``digest`` exists, parses, and has every object it names.

    What a pull asks before it skips a layer (or an image) as already stored: a stream
    whose object, header or file objects were lost is imported again, which repairs it.
    """
    info = read_stream_info(repo, digest, content_type=content_type)
    return info is not None and all(repo.has_object(ref) for ref in info.object_refs)


def usable_stream(repo: Repository, name: str, *, content_type: int | None = None) -> Digest | None:
    """The object of stream ``name`` if the name resolves and the stream is complete, else None."""
    try:
        digest = repo.resolve_stream(name)
    except ComposefsError:
        return None
    return digest if stream_is_complete(repo, digest, content_type=content_type) else None
