"""Check a blob's digest and decompress it off the trio thread, overlapping with splitting.

:func:`open_verified_stream` starts one worker thread per blob. The thread reads
the stored (compressed) blob (from the source's fd itself when it has one, else
from pieces a trio task queues), hashes it (sha256, for the manifest's digest),
decompresses it (gzip with ISA-L or zlib, zstd, or passes it through), hashes the
output (sha256, the tar's diff_id) and queues pieces of at most :data:`OUTPUT_PIECE`
bytes in a :class:`~trio_composefs.importer._handoff.Handoff` (no round trip
through the event loop per piece). Meanwhile the consumer (the layer import)
splits the previous pieces on the trio thread: decompression and splitting
overlap, and the queue's few slots bound the memory.

The consumer's iterator ends only after the worker has checked the blob's size
and digest; if anything is wrong it raises instead, so a layer import that reads
to the end of the stream never publishes a blob that did not match.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import Any, Final, Literal, Protocol, cast

import attrs
import trio
import zstandard

from .._errors import DigestMismatchError, FormatError, InternalError
from ._handoff import Handoff, HandoffClosed

_GZIP: ModuleType
"""The gzip implementation: ISA-L's ``isal.igzip`` when importable, else :mod:`gzip` (zlib).

Both decode the same format to the same bytes (ISA-L only decodes faster: 2x zlib's speed
on a real Debian layer on the benchmark machine, and it releases the GIL), and both read
concatenated members and skip zero padding after the last one; they differ only in the
wording of their errors. Tests force the fallback by replacing this attribute.
"""
_ISAL_ERRORS: tuple[type[BaseException], ...]
try:
    from isal import igzip, isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; the fallback is tested
    _GZIP, _ISAL_ERRORS = gzip, ()
else:
    _GZIP, _ISAL_ERRORS = igzip, (cast("type[BaseException]", isal_zlib.error),)

__all__ = ["GZIP_BACKEND", "OUTPUT_PIECE", "Compression", "open_verified_stream"]

GZIP_BACKEND: Final = "zlib" if _GZIP is gzip else "isal"
"""Which gzip implementation decompresses layers: ``"isal"`` or ``"zlib"``."""

_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    zlib.error,
    zstandard.ZstdError,
    *_ISAL_ERRORS,
)

Compression = Literal["gzip", "zstd"] | None

OUTPUT_PIECE: Final = 1 << 20
"""The largest decompressed piece handed to the consumer."""

_CHANNEL_SLOTS: Final = 8
"""Pieces queued each way (stored pieces in, decompressed pieces out)."""

_READ_SIZE: Final = 1 << 20
"""What the worker reads at once from a source's file descriptor."""


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


#: Fault-injection hook for tests (set by :mod:`trio_composefs.testing`): wraps the
#: decompressing reader of each compressed blob, in its worker thread, as
#: ``hook(reader, compression, where)``. A context variable: it reaches only the blobs
#: opened from the task that set it.
DECOMPRESS_FAULT: ContextVar[Callable[[_Readable, str, str], _Readable] | None] = ContextVar(
    "trio_composefs_decompress_fault", default=None
)


@attrs.frozen
class _Finished:
    """Sent last by the worker: the blob was complete and matched its digest."""


_FINISHED: Final = _Finished()


class VerifiedStream:
    """The consumer's end: an async iterator of decompressed pieces.

    It stops only after the worker's :data:`_FINISHED` marker; a queue that
    ends without it (the worker failed) raises instead of looking like EOF.
    """

    def __init__(self, queue: Handoff[bytes | _Finished], where: str) -> None:
        self._queue = queue
        self._where = where
        self._done = False
        self.bytes_out = 0
        #: sha256 of the decompressed bytes, updated in the worker thread as it makes them.
        self.output_sha = hashlib.sha256()

    def sha256_of_output(self) -> bytes:
        """The sha256 of every decompressed byte (a tar layer's diff_id), once read to the end.

        The worker hashes each piece as it makes it, off the trio thread, so a layer
        import need not hash the stream again.
        """
        if not self._done:
            raise InternalError(f"{self._where}: the stream's digest asked before its end")
        return self.output_sha.digest()

    def __aiter__(self) -> VerifiedStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            raise InternalError(f"{self._where}: the decompressor stopped early")
        if isinstance(item, _Finished):
            self._done = True
            raise StopAsyncIteration
        self.bytes_out += len(item)
        return item


class _PullReader:
    """A blocking file-like reader, used in the worker thread, of the stored blob.

    It reads the source's file descriptor itself when the source has one (no trip
    through trio at all), else takes the pieces a trio task queues for it. Every
    piece is hashed and counted as it arrives; more bytes than the descriptor's size
    fail at once.
    """

    def __init__(self, next_piece: Callable[[], bytes | None], size: int, where: str) -> None:
        self._next = next_piece
        self._size = size
        self._where = where
        self._buffer = memoryview(b"")
        self.sha = hashlib.sha256()
        self.count = 0
        self.eof = False
        #: The exception the source raised (network, disk), if it failed.
        self.source_error: BaseException | None = None

    def _next_piece(self) -> bytes | None:
        while True:
            if self.source_error is not None:
                raise self.source_error  # a failed source stays failed
            try:
                piece = self._next()
            except HandoffClosed:
                raise
            except Exception as e:
                self.source_error = e
                raise
            if piece is None:
                self.eof = True
                return None
            if piece:
                break
        self.count += len(piece)
        if self.count > self._size:
            raise DigestMismatchError(
                f"{self._where}: the blob is longer than the {self._size} bytes its"
                " descriptor gives; nothing was published"
            )
        self.sha.update(piece)
        return piece

    def read(self, size: int = -1, /) -> bytes:
        if not self._buffer:
            if self.eof:
                return b""
            piece = self._next_piece()
            if piece is None:
                return b""
            self._buffer = memoryview(piece)
        if size < 0 or size >= len(self._buffer):
            out = bytes(self._buffer)
            self._buffer = memoryview(b"")
            return out
        out = bytes(self._buffer[:size])
        self._buffer = self._buffer[size:]
        return out

    def readinto(self, buffer: Any, /) -> int:
        """Fill ``buffer`` from what is unread (ISA-L's reader reads this way), copying once."""
        if not self._buffer:
            if self.eof:
                return 0
            piece = self._next_piece()
            if piece is None:
                return 0
            self._buffer = memoryview(piece)
        out = memoryview(buffer).cast("B")
        n = min(len(out), len(self._buffer))
        out[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def peek(self, n: int) -> bytes:
        """``n`` bytes from the start of what is unread (fewer only at EOF), not consumed."""
        while len(self._buffer) < n and not self.eof:
            piece = self._next_piece()
            if piece is not None:
                self._buffer = memoryview(bytes(self._buffer) + piece)
        return bytes(self._buffer[:n])

    def drain(self) -> int:
        """Read (and hash) what the decompressor left; return how many bytes that was."""
        left = len(self._buffer)
        self._buffer = memoryview(b"")
        while not self.eof:
            piece = self._next_piece()
            if piece is not None:
                left += len(piece)
        return left


_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff_compression(head: bytes, declared: Compression) -> Compression:
    """The compression the bytes actually use.

    Media types lie in the wild (skopeo labels the plain tars of a docker
    archive ``+gzip``), so the magic numbers decide; a tar has neither.
    """
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if len(head) < len(_ZSTD_MAGIC) and declared is not None:
        return declared  # too short to tell: let the decompressor say what is wrong
    return None


def _decompressing_reader(raw: _PullReader, compression: Compression) -> _Readable:
    if compression is None:
        return raw
    if compression == "gzip":
        reader: _Readable = _GZIP.GzipFile(fileobj=cast(Any, raw), mode="rb")
        return reader
    if compression == "zstd":
        zreader: _Readable = zstandard.ZstdDecompressor().stream_reader(
            cast(Any, raw), read_size=OUTPUT_PIECE, read_across_frames=True
        )
        return zreader
    raise InternalError(f"unknown compression {compression!r}")  # pragma: no cover


def _worker(
    next_piece: Callable[[], bytes | None],
    stream: VerifiedStream,
    out: Handoff[bytes | _Finished],
    compression: Compression,
    digest: str,
    size: int,
    where: str,
    detect: bool,
) -> None:
    raw = _PullReader(next_piece, size, where)
    if detect:
        compression = sniff_compression(raw.peek(4), compression)
    reader = _decompressing_reader(raw, compression)
    if compression is not None and (hook := DECOMPRESS_FAULT.get()) is not None:
        reader = hook(reader, compression, where)
    try:
        while True:
            trio.from_thread.check_cancelled()
            piece = reader.read(OUTPUT_PIECE)
            if not piece:
                break
            stream.output_sha.update(piece)
            out.put_blocking(piece)
    except _DECOMPRESS_ERRORS as e:
        if raw.source_error is not None:
            # The source failed (e.g. ConnectionResetError): its own error, never a
            # digest verdict on bytes that did not all arrive.
            raise raw.source_error from None
        # A corrupt blob usually fails to decompress first: say so by its digest if we can.
        with contextlib.suppress(DigestMismatchError):
            raw.drain()
            if raw.count == size and "sha256:" + raw.sha.hexdigest() == digest:
                raise FormatError(f"{where}: cannot decompress ({compression}): {e}") from None
        raise DigestMismatchError(
            f"{where}: the blob does not match the manifest's digest {digest}"
            f" ({raw.count} bytes read, sha256:{raw.sha.hexdigest()}"
            f"{' so far' if not raw.eof else ''}); it does not decompress either"
            f" ({compression}: {e}); nothing was published"
        ) from None
    trailing = raw.drain()
    if compression is not None and trailing:
        raise FormatError(f"{where}: {trailing} bytes after the end of the {compression} stream")
    if raw.count != size:
        raise DigestMismatchError(
            f"{where}: the blob has {raw.count} bytes, its descriptor says {size};"
            " nothing was published"
        )
    actual = "sha256:" + raw.sha.hexdigest()
    if actual != digest:
        raise DigestMismatchError(
            f"{where}: the blob's digest is {actual}, the manifest says {digest};"
            " nothing was published"
        )
    out.put_blocking(_FINISHED)


def _fd_reader(fd: int) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        return os.read(fd, _READ_SIZE) or None

    return read


@asynccontextmanager
async def open_verified_stream(
    pieces: AsyncIterator[bytes],
    *,
    compression: Compression,
    digest: str,
    size: int,
    where: str,
    detect: bool = False,
) -> AsyncIterator[VerifiedStream]:
    """Stream a stored blob's decompressed bytes, checking its size and sha256.

    Args:
        pieces: the blob as stored (e.g. from ``ImageSource.open_blob``).
        compression: ``"gzip"``, ``"zstd"`` or ``None`` (passed through).
        digest: ``sha256:<hex>`` the stored bytes must have.
        size: the length the stored bytes must have.
        where: names the blob in error messages.
        detect: let the bytes' magic numbers decide the compression (for tar
            layers, whose media types are not always right).

    Yields:
        An async iterator of decompressed pieces (at most :data:`OUTPUT_PIECE`
        bytes each). It ends only once the whole blob has been read and found
        to match; otherwise reading it raises.

    Raises:
        DigestMismatchError: wrong size or digest.
        FormatError: corrupt compressed data or trailing bytes after it.

    **Cancellation:** leaving the block early cancels the worker thread and wakes it
    if it waits on either queue (:meth:`Handoff.abort`); it owns no resources (a
    layout's fd, which it reads directly, stays the source's to close).
    """
    out = Handoff[bytes | _Finished](_CHANNEL_SLOTS)
    stream = VerifiedStream(out, where)
    fileno = getattr(pieces, "fileno", None)
    pending: Handoff[bytes] | None = None
    if fileno is not None:
        next_piece = _fd_reader(fileno())
    else:
        pending = Handoff[bytes](_CHANNEL_SLOTS)
        next_piece = pending.get_blocking

    async def pump(queue: Handoff[bytes]) -> None:
        try:
            async for piece in pieces:
                await queue.put(piece)
        except Exception as e:  # the worker raises it where it reads
            queue.close(e)
        else:
            queue.close()

    async def produce() -> None:
        # On failure the queue stays open, so the consumer keeps waiting until the
        # nursery cancels it (instead of seeing an early end); on success the worker's
        # last item, _FINISHED, tells it the blob matched.
        with contextlib.suppress(HandoffClosed):  # we are being cancelled
            await trio.to_thread.run_sync(
                _worker,
                next_piece,
                stream,
                out,
                compression,
                digest,
                size,
                where,
                detect,
                limiter=trio.CapacityLimiter(1),
            )

    async with trio.open_nursery() as nursery:
        try:
            if pending is not None:
                nursery.start_soon(pump, pending)
            nursery.start_soon(produce)
            yield stream
        finally:
            nursery.cancel_scope.cancel()
            out.abort()
            if pending is not None:
                pending.abort()
