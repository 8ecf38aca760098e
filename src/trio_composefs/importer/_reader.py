"""The reader task of one layer: source → tar splitter → builder and object jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing

import attrs
import trio

from .._errors import InternalError, TarError
from ..formats._fsverity import Digest
from ..formats._tarsplit import (
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
from ._builder import Digester, Item, PendingObject
from ._bytesource import ByteSource, iter_source
from ._entries import EntryTap
from ._handoff import Handoff, HandoffClosed
from ._writers import (
    NO_LIMIT,
    ManyDigester,
    RepositoryLike,
    StoreMany,
    store_batch,
    store_streamed,
)

SMALL_OBJECT_MAX = 1 << 20
"""Objects up to this size are gathered in memory and stored without streaming."""

BATCH_BYTES = 4 << 20
BATCH_OBJECTS = 32
"""Small objects are stored in batches, one thread hop and one writer token per batch.

A hop costs ~100 µs of CPU on a small VM, more than writing a 64 KiB file: the
benchmarks showed per-object hops, not bytes, bounding the import."""

STORE_BATCH_OBJECTS = 256
"""Small objects per batch when the hash processes store them (a batch then costs the
writer thread a memfd and one message, however many objects it holds)."""

FINISHING_JOBS = 4
"""Jobs of one layer whose bytes are written and whose digests are still being computed.

A job gives its writer token back once its bytes are in temporary files, so the
reader can start the next batch while the hash processes digest this one; this
bounds how many such jobs (and their open temporary files) a layer has."""

_OBJECT_CHANNEL_ITEMS = 8
"""Pieces (each at most READ_SIZE) queued between the reader and a large object's writer."""

_INLINE_BATCH = 1 << 20
"""The reader sends inline bytes to the builder in batches of about this size."""

_OUTBOX_ITEMS = 64
"""Items the reader hands the builder at once, in one channel message (one task switch)."""

_REPORT_EVERY = 64 << 20
"""Bytes read between two progress reports."""


@attrs.define(eq=False)
class Counters:
    bytes_read: int = 0
    objects: int = 0
    written: int = 0
    deduplicated: int = 0
    in_flight: int = 0
    object_bytes: int = 0


def new_splitter() -> TarSplitter:
    """The splitter of a layer import: one :class:`Inline` per run of inline bytes
    (``coalesce``), large files' content without a copy (``zero_copy``)."""
    return TarSplitter(coalesce=True, zero_copy=True)


_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))


def _refuse_compressed(head: bytes) -> None:
    """A tar stream never starts with gzip's or zstd's magic number: say what it is.

    (A tar's first bytes are the first entry's name; these are not UTF-8 text.)
    """
    for magic, kind in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            raise TarError(
                f"the input is {kind}-compressed, not a tar stream; decompress it first"
                f" (e.g. `{kind} -dc`), or let `oci pull` import the image (it decompresses"
                " layers itself)",
                offset=0,
            )


@attrs.define(eq=False)
class LayerReader:
    """The reader task of one layer: source → splitter → builder and object jobs."""

    repo: RepositoryLike
    limiter: trio.CapacityLimiter
    nursery: trio.Nursery
    to_builder: trio.MemorySendChannel[list[Item]]
    digester: Digester | None
    counters: Counters
    report: Callable[[], None]
    many_digester: ManyDigester | None = None
    tap: EntryTap | None = None
    """Where the layer's entries go, if they are wanted (it watches this reader's splitter)."""
    store_many: StoreMany | None = None
    """Set: the hash processes store small objects themselves (see ``many_storer_for``)."""
    batch_objects: int = BATCH_OBJECTS
    """Most small objects in one batch (more when a batch costs a few syscalls in all)."""
    finishing: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(FINISHING_JOBS)
    )
    """Jobs written but not yet digested and linked (their writer tokens are back)."""
    splitter: TarSplitter = attrs.field(factory=lambda: new_splitter())
    # Inline runs not yet posted (coalesced runs are large: join them once, or not at all).
    _inline: list[bytes] = attrs.field(factory=list, init=False)
    _inline_bytes: int = attrs.field(default=0, init=False)
    # The file being read: gathered in memory (small) or streamed to its writer (large).
    _pending: PendingObject | None = attrs.field(default=None, init=False)
    _parts: list[bytes | memoryview] | None = attrs.field(default=None, init=False)
    _stream: Handoff[bytes | memoryview] | None = attrs.field(default=None, init=False)
    # Small objects read completely, waiting to be stored together.
    _batch: list[tuple[PendingObject, list[bytes | memoryview]]] = attrs.field(
        factory=list, init=False
    )
    _batch_bytes: int = attrs.field(default=0, init=False)
    # Items for the builder, sent together.
    _outbox: list[Item] = attrs.field(factory=list, init=False)
    _outbox_bytes: int = attrs.field(default=0, init=False)
    _outbox_items: int = attrs.field(default=0, init=False)  # not counting entries

    async def run(
        self,
        source: ByteSource,
        on_data: Callable[[bytes], object] | None,
        limiter: trio.CapacityLimiter,
    ) -> None:
        try:
            await self._run(source, on_data, limiter)
        finally:
            if self._stream is not None:
                # wake the large object's writer thread: it discards the object
                self._stream.abort()

    async def _run(
        self,
        source: ByteSource,
        on_data: Callable[[bytes], object] | None,
        limiter: trio.CapacityLimiter,
    ) -> None:
        next_report = _REPORT_EVERY
        splitter = self.splitter
        async with aclosing(iter_source(source, limiter=limiter, on_data=on_data)) as chunks:
            async for data in chunks:
                if self.counters.bytes_read == 0:
                    _refuse_compressed(data)
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
        await self._flush_batch()
        await self._flush_inline()
        await self._send_outbox()

    async def _handle(self, event: Event | Sentinel) -> None:
        if isinstance(event, Inline):
            self._inline.append(event.data)
            self._inline_bytes += len(event.data)
            if self.tap is not None and (parts := self.tap.inline(event)):
                self._outbox += parts  # cheap to carry: not counted as items
            if self._inline_bytes >= _INLINE_BATCH:
                await self._flush_inline()
        elif isinstance(event, FileData):
            if self._stream is not None:
                await self._stream.put(event.data)
            elif self._parts is not None:
                self._parts.append(event.data)
            else:  # pragma: no cover - the splitter's contract
                raise InternalError("file data outside a file")
        elif isinstance(event, FileStart):
            await self._flush_inline()
            header = self.tap.large_header() if self.tap is not None else None
            pending = self._pending = PendingObject(event.size, header=header)
            self.counters.objects += 1
            self.counters.object_bytes += event.size
            await self._post(pending)
            if event.size <= SMALL_OBJECT_MAX:
                self._parts = []
            else:
                await self._flush_batch()
                self._stream = await self._start_job(pending)
        elif isinstance(event, FileEnd):
            if self._pending is None:  # pragma: no cover - the splitter's contract
                raise InternalError("end of a file that never started")
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            elif self._parts is not None:
                self._batch.append((self._pending, self._parts))
                self._batch_bytes += self._pending.size
                self._parts = None
                if len(self._batch) >= self.batch_objects or self._batch_bytes >= BATCH_BYTES:
                    await self._flush_batch()
            self._pending = None
        else:  # pragma: no cover - NEED_DATA and END are handled by the caller
            raise InternalError(f"unexpected splitter event {event!r}")

    async def _flush_inline(self) -> None:
        if self._inline:
            parts = self._inline
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._inline, self._inline_bytes = [], 0
            await self._post(data)

    async def _post(self, item: Item) -> None:
        """Queue an item for the builder; send the queue when it is long or heavy."""
        self._outbox.append(item)
        self._outbox_items += 1
        if isinstance(item, bytes):
            self._outbox_bytes += len(item)
        if self._outbox_items >= _OUTBOX_ITEMS or self._outbox_bytes >= _INLINE_BATCH:
            await self._send_outbox()

    async def _send_outbox(self) -> None:
        """Send the queued items; before blocking, start the batch the builder may wait for.

        The builder resolves objects in stream order, so it can be waiting for a
        batched object whose job has not started: blocking here without
        flushing would deadlock.
        """
        if not self._outbox:
            return
        items, self._outbox, self._outbox_bytes, self._outbox_items = self._outbox, [], 0, 0
        try:
            self.to_builder.send_nowait(items)
        except trio.WouldBlock:
            await self._flush_batch()
            await self.to_builder.send(items)

    async def _take_tokens(self) -> tuple[object, Callable[[], None], Callable[[], None]]:
        """A writer token and a finishing slot for one job (the backpressure point).

        Returns the borrower and two functions: ``release_writer`` (idempotent, trio
        thread) and ``release_from_thread`` (for the job's worker thread: schedules
        ``release_writer`` without waiting for the event loop). A job gives its writer
        token back as soon as its bytes are written, and keeps its finishing slot
        until its objects are digested and linked.
        """
        borrower = object()
        await self.finishing.acquire_on_behalf_of(borrower)
        try:
            await self.limiter.acquire_on_behalf_of(borrower)
        except BaseException:
            self.finishing.release_on_behalf_of(borrower)
            raise
        held = [True]
        limiter, trio_token = self.limiter, trio.lowlevel.current_trio_token()

        def release_writer() -> None:
            if held[0]:
                held[0] = False
                limiter.release_on_behalf_of(borrower)

        def release_from_thread() -> None:
            trio_token.run_sync_soon(release_writer)

        return borrower, release_writer, release_from_thread

    async def _flush_batch(self) -> None:
        """Store the batched small objects: one writer token and one thread hop for all."""
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        borrower, release_writer, release_from_thread = await self._take_tokens()
        self.counters.in_flight += len(batch)
        repo, digester, many = self.repo, self.digester, self.many_digester
        jobs = [(parts, p.size) for p, parts in batch]
        store_many = self.store_many

        async def job() -> list[tuple[Digest, bool]]:
            return await trio.to_thread.run_sync(
                store_batch,
                repo,
                jobs,
                digester,
                many,
                release_from_thread,
                store_many,
                limiter=NO_LIMIT,
            )

        self.nursery.start_soon(
            self._run_batch, job, [p for p, _ in batch], borrower, release_writer
        )

    async def _run_batch(
        self,
        job: Callable[[], Awaitable[list[tuple[Digest, bool]]]],
        pendings: list[PendingObject],
        borrower: object,
        release_writer: Callable[[], None],
    ) -> None:
        counters = self.counters
        try:
            results = await job()
        finally:
            release_writer()
            self.finishing.release_on_behalf_of(borrower)
            counters.in_flight -= len(pendings)
        for pending, (digest, present) in zip(pendings, results, strict=True):
            if present:
                counters.deduplicated += 1
            else:
                counters.written += 1
            pending.set_result(digest, present)

    async def _start_job(self, pending: PendingObject) -> Handoff[bytes | memoryview]:
        """Take a writer token (the backpressure point), then start a streamed object's job."""
        borrower, release_writer, release_from_thread = await self._take_tokens()
        self.counters.in_flight += 1
        repo, digester, size = self.repo, self.digester, pending.size
        pieces = Handoff[bytes | memoryview](_OBJECT_CHANNEL_ITEMS)

        async def job() -> list[tuple[Digest, bool]]:
            try:
                result = await trio.to_thread.run_sync(
                    store_streamed,
                    repo,
                    pieces.get_blocking,
                    size,
                    digester,
                    release_from_thread,
                    limiter=NO_LIMIT,
                )
            except HandoffClosed:
                # The reader is unwinding (cancelled or failed), so the layer's nursery
                # is about to cancel us: wait for it rather than raise a second error.
                await trio.sleep_forever()
            return [result]

        self.nursery.start_soon(self._run_batch, job, [pending], borrower, release_writer)
        return pieces
