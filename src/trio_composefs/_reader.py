"""The reader task of one layer: source → tar splitter → builder and object jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing

import attrs
import trio

from ._errors import InternalError
from ._sources import ByteSource, iter_source
from ._writers import NO_LIMIT, RepositoryLike, store_parts, store_streamed
from .builder import Digester, Item, PendingObject
from .fsverity import Digest
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

SMALL_OBJECT_MAX = 1 << 20
"""Objects up to this size are gathered in memory and stored in a single thread hop."""

_OBJECT_CHANNEL_ITEMS = 4
"""Pieces (each at most READ_SIZE) buffered between the reader and a large object's writer."""

_INLINE_BATCH = 1 << 20
"""The reader sends inline bytes to the builder in batches of about this size."""

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


@attrs.define(eq=False)
class LayerReader:
    """The reader task of one layer: source → splitter → builder and object jobs."""

    repo: RepositoryLike
    limiter: trio.CapacityLimiter
    nursery: trio.Nursery
    to_builder: trio.MemorySendChannel[Item]
    digester: Digester | None
    counters: Counters
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
                    store_streamed, repo, receive, size, digester, limiter=NO_LIMIT
                )
        else:
            data = parts

            async def job() -> tuple[Digest, bool]:
                return await trio.to_thread.run_sync(
                    store_parts, repo, data, size, digester, limiter=NO_LIMIT
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
