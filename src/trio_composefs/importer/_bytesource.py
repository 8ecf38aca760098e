"""Turn what callers hand us (streams, async iterables, files) into bounded byte chunks."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Iterator
from typing import BinaryIO, Protocol, TypeAlias, cast

import trio

__all__ = ["READ_SIZE", "ByteSource", "iter_source"]

#: The largest piece of data read from a source at once; every buffer in the
#: pipeline is a small multiple of this.
READ_SIZE = 1 << 20


class _AsyncReadable(Protocol):
    async def read(self, size: int = ..., /) -> bytes: ...


ByteSource: TypeAlias = (
    trio.abc.ReceiveStream
    | AsyncIterable[bytes]
    | Iterable[bytes]
    | bytes
    | BinaryIO
    | _AsyncReadable
    | int
)
"""What a layer can be read from.

* a :class:`trio.abc.ReceiveStream` (``receive_some`` is called);
* an async iterable of ``bytes`` (pieces of any size; large ones are cut up);
* ``bytes``, or a plain iterable of ``bytes`` (a list of pieces, a generator);
* a binary file object opened for reading (read in a worker thread), or an
  async file from :func:`trio.wrap_file` / :func:`trio.open_file`;
* a file descriptor (read in a worker thread, never closed by us).
"""


async def iter_source(
    source: ByteSource,
    *,
    limiter: trio.CapacityLimiter,
    on_data: Callable[[bytes], object] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Yield the source's bytes in pieces of at most :data:`READ_SIZE`.

    **Cancellation:** a read blocked in a worker thread (a pipe, a terminal) is
    abandoned, not waited for: the thread owns nothing, and whatever it reads
    afterwards is dropped with the cancelled import.

    ``on_data`` is called with each piece; for sources read in a thread it is
    called in that thread, in the same hop as the read (used to hash the
    stream off the trio thread). ``limiter`` bounds those threads: give it one
    of its own, never the writers' limiter, or a reader could wait for a token
    that the writers it feeds are holding.
    """

    read = _blocking_read(source)
    if read is not None:
        while data := await trio.to_thread.run_sync(
            _read_piece, read, on_data, limiter=limiter, abandon_on_cancel=True
        ):
            yield data
        return
    async with contextlib.aclosing(_async_pieces(source)) as pieces:
        async for data in pieces:
            if on_data is not None:
                await _hash_maybe_in_thread(on_data, data, limiter)
            yield data


def _blocking_read(source: ByteSource) -> Callable[[int], bytes] | None:
    """The blocking ``read(n)`` of a file descriptor or a binary file, else ``None``."""
    if isinstance(source, int):
        return functools.partial(os.read, source)
    if isinstance(source, trio.abc.ReceiveStream):
        return None
    read = getattr(source, "read", None)
    if read is None or inspect.iscoroutinefunction(read):
        return None
    return cast(Callable[[int], bytes], read)


def _read_piece(read: Callable[[int], bytes], on_data: Callable[[bytes], object] | None) -> bytes:
    """One blocking read (in a worker thread), handed to ``on_data`` in the same hop."""
    data = read(READ_SIZE)
    if data and on_data is not None:
        on_data(data)
    return data


async def _async_pieces(source: ByteSource) -> AsyncGenerator[bytes, None]:
    """The pieces of a source read on the trio thread (at most :data:`READ_SIZE` each)."""
    if isinstance(source, trio.abc.ReceiveStream):
        while received := await source.receive_some(READ_SIZE):
            yield bytes(received)
        return
    read = getattr(source, "read", None)
    if read is not None:  # an async file: read() is a coroutine function
        while data := await read(READ_SIZE):
            yield data
        return
    if isinstance(source, bytes | bytearray | memoryview):
        source = [bytes(source)]
    if isinstance(source, AsyncIterable):
        async for piece in source:
            for data in _cut(piece):
                yield data
        return
    if isinstance(source, Iterable):
        for piece in source:
            for data in _cut(piece):
                yield data
        return
    raise TypeError(f"cannot read a layer from {type(source).__name__}")


def _cut(piece: bytes) -> Iterator[bytes]:
    """Pieces of at most READ_SIZE bytes; an empty piece yields nothing (it is not EOF)."""
    if len(piece) <= READ_SIZE:
        if piece:
            yield bytes(piece)
        return
    view = memoryview(piece)
    for start in range(0, len(view), READ_SIZE):
        yield bytes(view[start : start + READ_SIZE])


async def _hash_maybe_in_thread(
    on_data: Callable[[bytes], object], data: bytes, limiter: trio.CapacityLimiter
) -> None:
    # hashlib releases the GIL on large buffers, so big pieces are worth a hop.
    if len(data) >= 256 * 1024:
        await trio.to_thread.run_sync(on_data, data, limiter=limiter)
    else:
        on_data(data)
        await trio.lowlevel.checkpoint()
