"""SplitStreamBuilder: assembles a splitstream in stream order while objects finish out of order.

The reader hands the builder inline bytes and *pending* objects, in tar order,
through a bounded channel. The builder task waits for each pending object in
turn (writers finish in any order), feeds the splitstream encoder, and spools
the compressed stream to an unlinked temporary file, so that neither a layer's
inline bytes nor its compressed stream is ever held whole in memory. At the
end it writes the splitstream file as an object and returns its digest.

Memory: one inline run is kept in memory up to :data:`RUN_MEMORY_MAX` bytes and
spilled to disk beyond that (the format frames a run by its length before its
bytes, so a run must be complete before it can be compressed).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO

import attrs
import trio

from .._errors import InternalError
from ..formats._fsverity import Digest
from ..formats._splitstream import SplitStreamEncoder
from ..formats._tarheader import TarHeader
from ._entries import EntryTap

__all__ = ["PendingObject", "SplitStreamBuilder"]

RUN_MEMORY_MAX = 4 << 20
"""Bytes of one inline run kept in memory before it is spilled to disk."""

_SMALL_WORK = 256 << 10
"""Encoder work below this many bytes runs on the trio thread (cheaper than a hop)."""

_OUT_FLUSH = 1 << 20
"""Compressed bytes kept in memory before they are appended to the spool file."""

_COPY_SIZE = 1 << 20

Digester = Callable[[int, int], Digest]
"""Computes an object's digest in userspace from ``(fd, size)``."""


@attrs.define(eq=False)
class PendingObject:
    """An external object whose digest is not known yet.

    The writer that stores it calls :meth:`set_result`; the builder awaits
    :meth:`wait` when the object's turn in the stream comes. ``header`` is the
    file's tar header when the layer's entries are tapped (its entry is made once
    the digest is known).
    """

    size: int
    header: TarHeader | None = attrs.field(default=None, kw_only=True)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)
    _digest: Digest | None = attrs.field(default=None, init=False)
    already_present: bool = attrs.field(default=False, init=False)

    def set_result(self, digest: Digest, already_present: bool) -> None:
        self._digest = digest
        self.already_present = already_present
        self._done.set()

    @property
    def digest(self) -> Digest | None:
        """The digest, once the writer has set it."""
        return self._digest

    async def wait(self) -> Digest:
        await self._done.wait()
        if self._digest is None:  # pragma: no cover - set_result always sets it
            raise InternalError("pending object resolved without a digest")
        return self._digest


class _Spool:
    """Blocking state of one splitstream being encoded. Used by one thread at a time."""

    def __init__(self, encoder: SplitStreamEncoder, spool_dir: str) -> None:
        self.encoder = encoder
        self.spool_dir = spool_dir
        self.out = bytearray()  # compressed stream not yet in the spool file
        self.spool: IO[bytes] | None = None
        self.spooled = 0
        self.run_parts: list[bytes] = []
        self.run_size = 0
        self.run_file: IO[bytes] | None = None

    # --- decisions the async side makes before calling in -------------------
    def inline_is_heavy(self, n: int) -> bool:
        return self.run_file is not None or self.run_size + n > RUN_MEMORY_MAX

    def close_is_heavy(self) -> bool:
        return (
            self.run_file is not None or self.run_size > _SMALL_WORK or len(self.out) > _OUT_FLUSH
        )

    # --- blocking work ------------------------------------------------------
    def _tempfile(self) -> IO[bytes]:
        return tempfile.TemporaryFile(dir=self.spool_dir, prefix=".tmp-spool-")

    def add_inline(self, data: bytes) -> None:
        self.run_size += len(data)
        if self.run_file is None and self.run_size > RUN_MEMORY_MAX:
            self.run_file = self._tempfile()
            for part in self.run_parts:
                self.run_file.write(part)
            self.run_parts.clear()
        if self.run_file is not None:
            self.run_file.write(data)
        else:
            self.run_parts.append(data)

    def close_run(self) -> None:
        if not self.run_size:
            return
        enc = self.encoder
        out = self.out
        out += enc.begin_inline(self.run_size)
        if self.run_file is not None:
            f = self.run_file
            f.seek(0)
            while piece := f.read(_COPY_SIZE):
                out += enc.inline_data(piece)
                self._maybe_flush()
            f.close()
            self.run_file = None
        else:
            for part in self.run_parts:
                out += enc.inline_data(part)
            self.run_parts.clear()
        self.run_size = 0
        self._maybe_flush()

    def external(self, digest: Digest, size: int) -> None:
        self.close_run()
        self.out += self.encoder.external(digest, size)

    def _maybe_flush(self, force: bool = False) -> None:
        if len(self.out) > _OUT_FLUSH or (force and self.out and self.spool is not None):
            if self.spool is None:
                self.spool = self._tempfile()
            self.spool.write(self.out)
            self.spooled += len(self.out)
            self.out.clear()

    def close(self) -> None:
        for f in (self.run_file, self.spool):
            if f is not None:
                f.close()
        self.run_file = self.spool = None

    def finish_into(self, write: Callable[[bytes], None]) -> None:
        """Finish the stream and write the whole splitstream file through ``write``."""
        self.close_run()
        self.out += self.encoder.finish()
        self._maybe_flush(force=True)
        stream_length = self.spooled + len(self.out)
        write(self.encoder.header(stream_length))
        if self.spool is not None:
            self.spool.flush()
            fd = self.spool.fileno()
            offset = 0
            while offset < self.spooled:
                piece = os.pread(fd, min(_COPY_SIZE, self.spooled - offset), offset)
                if not piece:
                    raise InternalError("splitstream spool file shrank while being copied")
                write(piece)
                offset += len(piece)
        if self.out:
            write(bytes(self.out))
            self.out.clear()


Item = bytes | PendingObject | tuple[TarHeader, bytes]
"""Inline bytes, an object, or (when entries are tapped) a completed entry's parts."""


@attrs.define(eq=False)
class SplitStreamBuilder:
    """Builds one splitstream from inline bytes and pending objects, in order.

    Create it, start :meth:`run` in the layer's nursery with the receiving end
    of a channel, and send it ``bytes`` (inline data) and
    :class:`PendingObject` items in stream order; close the channel to finish.
    With ``tap``, the layer's entries come too: ``(header, content)`` items (ignored
    by the encoder), and tapped objects' entries, complete when their digest is known;
    each message's entries go to the tap's sink at the message's end.
    :meth:`run` returns when the splitstream object is stored, with
    :attr:`digest` set.

    Args:
        encoder: a fresh :class:`SplitStreamEncoder` (its content type and
            named refs are set by the caller).
        store: called in a worker thread with a ``fill(write)`` function; it
            must create an object, call ``fill`` with the object's write
            method, and return the stored object's digest.
        spool_dir: where unlinked temporary files for long inline runs and the
            compressed stream go (the repository's own filesystem).
        limiter: bounds the builder's thread hops; give it its own, not the
            object writers' limiter.
        tap: where the layer's entries go, if they are wanted.

    **Cancellation:** :meth:`run` may be cancelled at any point; temporary
    files are unlinked files that vanish when closed, and nothing is stored
    unless :meth:`run` returns normally.
    """

    encoder: SplitStreamEncoder
    store: Callable[[Callable[[Callable[[bytes], None]], None]], Digest]
    spool_dir: str
    limiter: trio.CapacityLimiter
    tap: EntryTap | None = None
    digest: Digest | None = attrs.field(default=None, init=False)
    inline_bytes: int = attrs.field(default=0, init=False)

    async def run(self, receive: trio.MemoryReceiveChannel[list[Item]]) -> Digest:
        spool = _Spool(self.encoder, self.spool_dir)
        try:
            async with receive:
                tap = self.tap
                async for items in receive:
                    for item in items:
                        if isinstance(item, tuple):
                            if tap is not None:
                                tap.add(item)
                        else:
                            await self._add(spool, item)
                    if tap is not None:
                        await tap.flush()

            def finish() -> Digest:
                return self.store(spool.finish_into)

            self.digest = await trio.to_thread.run_sync(finish, limiter=self.limiter)
            return self.digest
        finally:
            spool.close()

    async def _add(self, spool: _Spool, item: bytes | PendingObject) -> None:
        if isinstance(item, PendingObject):
            # Most objects are resolved by the time their turn comes: don't
            # pay a checkpoint (a trip through the scheduler) for each of those;
            # the channel receive of every message is checkpoint enough.
            digest = item.digest if item.digest is not None else await item.wait()
            if item.header is not None and self.tap is not None:
                self.tap.add_external(item.header, digest, item.size)
            if spool.close_is_heavy():
                await trio.to_thread.run_sync(
                    spool.external, digest, item.size, limiter=self.limiter
                )
            else:
                spool.external(digest, item.size)
        else:
            self.inline_bytes += len(item)
            if spool.inline_is_heavy(len(item)):
                await trio.to_thread.run_sync(spool.add_inline, item, limiter=self.limiter)
            else:
                spool.add_inline(item)
