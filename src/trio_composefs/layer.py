"""The trio shell that imports one tar layer: a reader, object writers and the builder.

Data flows one way. The reader task pulls bytes from the source, hashes them
(sha256, for the diff_id check) and feeds the sans-IO :class:`TarSplitter`.
Inline bytes go to the :class:`SplitStreamBuilder` in stream order. Each file
over 64 bytes becomes an object job:

* a file of at most :data:`SMALL_OBJECT_MAX` bytes is gathered in memory and
  stored in one thread hop;
* a bigger one streams through a memory channel of a few
  :data:`~trio_composefs._sources.READ_SIZE` pieces to one thread that writes
  it, pulling one piece per hop and checking for cancellation between pieces.

Every job first takes a token, on its own behalf, from the import's shared
:class:`trio.CapacityLimiter`; the reader waits for that token before it reads
on, which is the backpressure that bounds memory. Readers and the builder use
their own limiters, so writers holding every token can never starve the reader
that feeds them.

After the tar ends, the sha256 is compared with the diff_id, the builder stores
the splitstream, one ``syncfs`` makes everything durable and only then is
``streams/oci-layer-<diff_id>`` published.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any, Protocol

import attrs
import trio

from ._errors import DigestMismatchError, InternalError
from ._sources import ByteSource, iter_source
from .builder import Digester, Item, PendingObject, SplitStreamBuilder
from .fsverity import Algorithm, Digest
from .hashpool import HashPool, digest_fd
from .splitstream import ContentType, SplitStreamEncoder
from .tarsplit import (
    END,
    NEED_DATA,
    Event,
    FileData,
    FileEnd,
    FileStart,
    Inline,
    Sentinel,
    TarSplitter,
)

__all__ = [
    "Importer",
    "LayerProgress",
    "LayerStats",
    "default_jobs",
    "import_layer",
    "layer_content_id",
    "open_importer",
]

SMALL_OBJECT_MAX = 1 << 20
"""Objects up to this size are gathered in memory and stored in a single thread hop."""

_OBJECT_CHANNEL_ITEMS = 4
"""Pieces (each at most READ_SIZE) buffered between the reader and a large object's writer."""

_BUILDER_CHANNEL_ITEMS = 64
"""Items queued for the builder; each is at most SMALL_OBJECT_MAX bytes or a pending object."""

_INLINE_BATCH = 1 << 20
"""The reader sends inline bytes to the builder in batches of about this size."""

_REPORT_EVERY = 64 << 20
"""Bytes read between two progress reports."""


def default_jobs() -> int:
    """The default number of concurrent object writers: two per CPU."""
    return 2 * (os.cpu_count() or 2)


def layer_content_id(diff_id: str) -> str:
    """The stream name of a layer: ``oci-layer-<diff_id>``."""
    return f"oci-layer-{diff_id}"


def _parse_diff_id(diff_id: str) -> bytes:
    algo, sep, hexdigest = diff_id.partition(":")
    if algo != "sha256" or not sep or len(hexdigest) != 64 or hexdigest.strip("0123456789abcdef"):
        raise DigestMismatchError(
            f"not a layer diff_id: {diff_id!r} (expected sha256: and 64 lowercase hex digits)"
        )
    return bytes.fromhex(hexdigest)


class ObjectTmpfileLike(Protocol):
    fd: int
    size: int

    def write(self, data: bytes | memoryview, /) -> None: ...
    def finish(self, digest: Digest | None = None) -> tuple[Digest, bool]: ...
    def abort(self) -> None: ...
    def __enter__(self) -> ObjectTmpfileLike: ...
    def __exit__(self, *exc: object) -> None: ...


class RepositoryLike(Protocol):
    """What the pipeline needs of a repository (a :class:`Repository`, or a test wrapper)."""

    @property
    def path(self) -> str: ...
    @property
    def algorithm(self) -> Algorithm: ...
    @property
    def verity_supported(self) -> bool: ...
    def ensure_writable(self) -> None: ...
    def begin_object(self) -> Any: ...
    def has_stream(self, content_id: str) -> Digest | None: ...
    def sync(self) -> None: ...
    def publish_stream(
        self, content_id: str, digest: Digest, ref: str | None = None, *, sync: bool = True
    ) -> None: ...


@attrs.frozen
class LayerStats:
    """What importing one layer did."""

    diff_id: str
    splitstream: Digest
    skipped: bool = False
    """The layer's stream already existed; nothing was read."""
    tar_bytes: int = 0
    objects: int = 0
    """External objects referenced by the layer (files over 64 bytes)."""
    objects_written: int = 0
    objects_deduplicated: int = 0
    object_bytes: int = 0
    inline_bytes: int = 0


@attrs.frozen
class LayerProgress:
    """A snapshot of one layer import, handed to the ``progress`` callback."""

    diff_id: str
    bytes_read: int
    objects_written: int
    objects_deduplicated: int
    objects_in_flight: int
    done: bool = False


@attrs.define(eq=False)
class _Counters:
    bytes_read: int = 0
    objects: int = 0
    written: int = 0
    deduplicated: int = 0
    in_flight: int = 0
    object_bytes: int = 0


class _NoLimit:
    """A limiter for ``to_thread`` when the job already holds a token of the real one."""

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await trio.lowlevel.checkpoint()

    def release_on_behalf_of(self, borrower: object) -> None:
        pass


_NO_LIMIT: Any = _NoLimit()


def _digester_for(repo: RepositoryLike, hash_pool: HashPool | None) -> Digester | None:
    if repo.verity_supported:
        return None  # the kernel measures every object
    alg = repo.algorithm
    if hash_pool is not None:
        pool = hash_pool
        return lambda fd, size: pool.digest_fd(fd, size, alg)
    return lambda fd, size: digest_fd(fd, size, alg)


def _store_parts(
    repo: RepositoryLike, parts: list[bytes], size: int, digester: Digester | None
) -> tuple[Digest, bool]:
    with repo.begin_object() as tmp:
        for part in parts:
            tmp.write(part)
        if tmp.size != size:
            raise InternalError(f"object job got {tmp.size} bytes, expected {size}")
        digest = digester(tmp.fd, size) if digester is not None else None
        result: tuple[Digest, bool] = tmp.finish(digest)
        return result


async def _receive_piece(receive: trio.MemoryReceiveChannel[bytes]) -> bytes | None:
    try:
        return await receive.receive()
    except trio.EndOfChannel:
        return None


def _store_streamed(
    repo: RepositoryLike,
    receive: trio.MemoryReceiveChannel[bytes],
    size: int,
    digester: Digester | None,
) -> tuple[Digest, bool]:
    with repo.begin_object() as tmp:
        while True:
            trio.from_thread.check_cancelled()
            piece = trio.from_thread.run(_receive_piece, receive)
            if piece is None:
                break
            tmp.write(piece)
        if tmp.size != size:
            raise InternalError(f"object job got {tmp.size} bytes, expected {size}")
        trio.from_thread.check_cancelled()
        digest = digester(tmp.fd, size) if digester is not None else None
        result: tuple[Digest, bool] = tmp.finish(digest)
        return result


def _sync_then_publish(
    repo: RepositoryLike, content_id: str, digest: Digest, name: str | None
) -> None:
    """syncfs, then name the stream: a published name never points at data a crash could lose.

    A cancellation that arrives before the name is linked wins: nothing is
    published. Once linking has begun the import is complete.
    """
    repo.sync()
    trio.from_thread.check_cancelled()
    repo.publish_stream(content_id, digest, name, sync=False)


def _store_splitstream_with(
    repo: RepositoryLike, digester: Digester | None
) -> Callable[[Callable[[Callable[[bytes], None]], None]], Digest]:
    def store(fill: Callable[[Callable[[bytes], None]], None]) -> Digest:
        with repo.begin_object() as tmp:
            fill(tmp.write)
            digest = digester(tmp.fd, tmp.size) if digester is not None else None
            stored: Digest = tmp.finish(digest)[0]
            return stored

    return store


@attrs.define(eq=False)
class _LayerReader:
    """The reader task of one layer: source → splitter → builder and object jobs."""

    repo: RepositoryLike
    limiter: trio.CapacityLimiter
    nursery: trio.Nursery
    to_builder: trio.MemorySendChannel[Item]
    digester: Digester | None
    counters: _Counters
    report: Callable[[], None]
    _splitter: TarSplitter = attrs.field(factory=TarSplitter, init=False)
    _inline: bytearray = attrs.field(factory=bytearray, init=False)
    # The file being read: gathered in memory (small) or streamed to its writer (large).
    _pending: PendingObject | None = attrs.field(default=None, init=False)
    _parts: list[bytes] | None = attrs.field(default=None, init=False)
    _stream: trio.MemorySendChannel[bytes] | None = attrs.field(default=None, init=False)

    async def run(
        self, source: ByteSource, on_data: Callable[[bytes], object], limiter: trio.CapacityLimiter
    ) -> None:
        next_report = _REPORT_EVERY
        splitter = self._splitter
        async with aclosing(iter_source(source, limiter=limiter, on_data=on_data)) as chunks:
            async for data in chunks:
                self.counters.bytes_read += len(data)
                if self.counters.bytes_read >= next_report:
                    next_report += _REPORT_EVERY
                    self.report()
                splitter.receive_data(data)
                while (event := splitter.next_event()) is not NEED_DATA:
                    await self._handle(event)
        splitter.receive_data(b"")
        while (event := splitter.next_event()) is not END:
            await self._handle(event)
        await self._flush_inline()

    async def _handle(self, event: Event | Sentinel) -> None:
        if isinstance(event, Inline):
            self._inline += event.data
            if len(self._inline) >= _INLINE_BATCH:
                await self._flush_inline()
        elif isinstance(event, FileData):
            if self._stream is not None:
                await self._stream.send(event.data)
            elif self._parts is not None:
                self._parts.append(event.data)
            else:  # pragma: no cover - the splitter's contract
                raise InternalError("file data outside a file")
        elif isinstance(event, FileStart):
            await self._flush_inline()
            pending = self._pending = PendingObject(event.size)
            self.counters.objects += 1
            self.counters.object_bytes += event.size
            await self.to_builder.send(pending)
            if event.size <= SMALL_OBJECT_MAX:
                self._parts = []
            else:
                self._stream = await self._start_job(pending, None)
        elif isinstance(event, FileEnd):
            if self._pending is None:  # pragma: no cover - the splitter's contract
                raise InternalError("end of a file that never started")
            if self._stream is not None:
                await self._stream.aclose()
                self._stream = None
            elif self._parts is not None:
                await self._start_job(self._pending, self._parts)
                self._parts = None
            self._pending = None
        else:  # pragma: no cover - NEED_DATA and END are handled by the caller
            raise InternalError(f"unexpected splitter event {event!r}")

    async def _flush_inline(self) -> None:
        if self._inline:
            await self.to_builder.send(bytes(self._inline))
            self._inline.clear()

    async def _start_job(
        self, pending: PendingObject, parts: list[bytes] | None
    ) -> trio.MemorySendChannel[bytes] | None:
        """Take a writer token (the backpressure point), then start the object's job."""
        token = object()
        await self.limiter.acquire_on_behalf_of(token)
        self.counters.in_flight += 1
        send: trio.MemorySendChannel[bytes] | None = None
        repo, digester, size = self.repo, self.digester, pending.size
        if parts is None:
            send, receive = trio.open_memory_channel[bytes](_OBJECT_CHANNEL_ITEMS)

            async def job() -> tuple[Digest, bool]:
                return await trio.to_thread.run_sync(
                    _store_streamed, repo, receive, size, digester, limiter=_NO_LIMIT
                )
        else:
            data = parts

            async def job() -> tuple[Digest, bool]:
                return await trio.to_thread.run_sync(
                    _store_parts, repo, data, size, digester, limiter=_NO_LIMIT
                )

        self.nursery.start_soon(self._run_job, job, pending, token)
        return send

    async def _run_job(
        self,
        job: Callable[[], Awaitable[tuple[Digest, bool]]],
        pending: PendingObject,
        token: object,
    ) -> None:
        counters = self.counters
        try:
            digest, present = await job()
        finally:
            self.limiter.release_on_behalf_of(token)
            counters.in_flight -= 1
        if present:
            counters.deduplicated += 1
        else:
            counters.written += 1
        pending.set_result(digest, present)


@attrs.define(eq=False)
class Importer:
    """Imports layers into one repository, sharing a limiter and a hash pool.

    Make one with :func:`open_importer`. Every layer imported through it, from
    as many tasks as you like, shares :attr:`limiter` (the object writers) and
    :attr:`hash_pool` (the processes that compute fs-verity digests in
    userspace when the kernel cannot).
    """

    repo: RepositoryLike
    limiter: trio.CapacityLimiter
    hash_pool: HashPool | None = None

    async def import_layer(
        self,
        source: ByteSource,
        diff_id: str,
        *,
        name: str | None = None,
        progress: Callable[[LayerProgress], object] | None = None,
    ) -> LayerStats:
        """Split a tar layer into the repository and publish ``streams/oci-layer-<diff_id>``.

        Args:
            source: the uncompressed tar (see :data:`ByteSource`).
            diff_id: ``sha256:<hex>`` of the tar; checked against the bytes
                read before anything is published.
            name: also publish ``streams/refs/<name>``.
            progress: called on the trio thread with a :class:`LayerProgress`
                about every 64 MiB read and once at the end.

        Returns:
            The splitstream's digest and what was stored. A layer whose stream
            already exists is not read again (``skipped=True``).

        Raises:
            ExceptionGroup: errors from the reader, the writers or the builder
                (:class:`TarError`, :class:`DigestMismatchError`, ``OSError``
                such as ENOSPC, ...), all of them, as raised in the layer's
                nursery; nothing is published then.

        **Cancellation:** safe at any point. Objects already linked stay (they
        are complete and correctly named; gc removes them if unused); no
        stream name is published unless the import completes.
        """
        expected = _parse_diff_id(diff_id)
        content_id = layer_content_id(diff_id)
        repo = self.repo
        own = trio.CapacityLimiter(1)  # the reader's and builder's hops
        existing = await trio.to_thread.run_sync(repo.has_stream, content_id, limiter=own)
        if existing is not None:
            if name is not None:
                await trio.to_thread.run_sync(
                    repo.publish_stream, content_id, existing, name, limiter=own
                )
            return LayerStats(diff_id=diff_id, splitstream=existing, skipped=True)
        await trio.to_thread.run_sync(repo.ensure_writable, limiter=own)

        digester = _digester_for(repo, self.hash_pool)
        encoder = SplitStreamEncoder(repo.algorithm, ContentType.OCI_LAYER)
        builder = SplitStreamBuilder(
            encoder=encoder,
            store=_store_splitstream_with(repo, digester),
            spool_dir=repo.path,
            limiter=trio.CapacityLimiter(1),
        )
        counters = _Counters()
        sha = hashlib.sha256()

        def report(done: bool = False) -> None:
            if progress is not None:
                progress(
                    LayerProgress(
                        diff_id=diff_id,
                        bytes_read=counters.bytes_read,
                        objects_written=counters.written,
                        objects_deduplicated=counters.deduplicated,
                        objects_in_flight=counters.in_flight,
                        done=done,
                    )
                )

        send_item, receive_item = trio.open_memory_channel[Item](_BUILDER_CHANNEL_ITEMS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(builder.run, receive_item)
            async with send_item:
                reader = _LayerReader(
                    repo, self.limiter, nursery, send_item, digester, counters, report
                )
                await reader.run(source, sha.update, own)
                if sha.digest() != expected:
                    raise DigestMismatchError(
                        f"layer {diff_id}: the tar's sha256 is sha256:{sha.hexdigest()},"
                        f" not the diff_id; nothing was published"
                    )
        digest = builder.digest
        if digest is None:  # pragma: no cover - run() returned normally
            raise InternalError("splitstream builder finished without a digest")
        await trio.to_thread.run_sync(
            _sync_then_publish, repo, content_id, digest, name, limiter=own
        )
        report(done=True)
        return LayerStats(
            diff_id=diff_id,
            splitstream=digest,
            tar_bytes=counters.bytes_read,
            objects=counters.objects,
            objects_written=counters.written,
            objects_deduplicated=counters.deduplicated,
            object_bytes=counters.object_bytes,
            inline_bytes=builder.inline_bytes,
        )


@asynccontextmanager
async def open_importer(
    repo: RepositoryLike,
    *,
    jobs: int | None = None,
    limiter: trio.CapacityLimiter | None = None,
    hash_processes: int | None = None,
) -> AsyncIterator[Importer]:
    """An :class:`Importer` for ``repo``, with its limiter and hash pool.

    Args:
        jobs: object writers running at once (default :func:`default_jobs`).
        limiter: share an existing limiter instead (``jobs`` is then ignored).
        hash_processes: worker processes computing digests in userspace
            (default: one per CPU; 0 hashes in the writer threads). Not
            started when the kernel measures fs-verity itself.
    """
    if limiter is None:
        limiter = trio.CapacityLimiter(jobs if jobs is not None else default_jobs())
    if repo.verity_supported or hash_processes == 0:
        yield Importer(repo, limiter, None)
        return
    pool = HashPool(workers=hash_processes)
    try:
        yield Importer(repo, limiter, pool)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pool.close)


async def import_layer(
    repo: RepositoryLike,
    source: ByteSource,
    diff_id: str,
    *,
    name: str | None = None,
    limiter: trio.CapacityLimiter | None = None,
    progress: Callable[[LayerProgress], object] | None = None,
) -> LayerStats:
    """Import one tar layer; see :meth:`Importer.import_layer`.

    Starts and stops its own hash pool; to import many layers, use one
    :func:`open_importer` for all of them instead.
    """
    async with open_importer(repo, limiter=limiter) as importer:
        return await importer.import_layer(source, diff_id, name=name, progress=progress)
