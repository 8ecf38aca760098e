"""Faults in the source: a wrapper for any byte stream, and for any ``ImageSource``.

:class:`FaultyStream` wraps an async iterable of ``bytes`` (what
``ImageSource.open_blob`` yields, or a :data:`~trio_composefs.importer.ByteSource`
for ``import_layer``); :class:`FaultySource` wraps an ``ImageSource`` and puts a
:class:`FaultyStream` around the blobs it opens:

>>> source = FaultySource(OciLayoutSource(path, tag="latest"))
>>> source.fail(nth=1, after_bytes=100_000, errno=errno.ECONNRESET)  # the network drops
>>> gate = source.stall(digest=layer_digest, after_bytes=0)             # hangs until released

Faults, each firing once:

``fail``
    after ``after_bytes`` bytes were delivered, raise ``OSError(errno)``
    (``ConnectionResetError`` by default): a connection that breaks.
``stall``
    after ``after_bytes`` bytes, wait until the returned :class:`Gate` is
    released (or the reading task is cancelled): a connection that hangs.
``truncate``
    end the stream quietly after ``after_bytes`` bytes: a peer that closes early.
``flip``
    XOR the byte at offset ``at_byte`` with ``mask``: a bit flipped on the way.

Offsets count the bytes *as the source stores them* (compressed, for a
compressed layer). Pieces are cut at the offset, so exactly ``after_bytes``
bytes arrive before the fault. A fault whose offset lies beyond the end of the
stream never fires (:attr:`StreamFault.fired` stays false).

How ``nth`` counts at :class:`FaultySource`: the blobs opened with ``open_blob``
(every layer; not the config, which ``read_blob`` fetches whole), from 1, in the
order the pull opens them, across every task using this source. A pull opens
layers largest first, several at once (``layer_jobs``); pass ``layer_jobs=1``
for a fixed order, or select a blob by ``digest=`` instead.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import trio

from ..oci._model import Descriptor, ImageSource, Platform, ResolvedImage
from ._faults import Gate

__all__ = ["FaultySource", "FaultyStream", "StreamFault"]

StreamFaultKind = Literal["fail", "stall", "truncate", "flip"]


@attrs.define(eq=False)
class StreamFault:
    """One arranged fault of a byte stream (see the module's documentation)."""

    kind: StreamFaultKind
    offset: int
    errno: int = errno_mod.ECONNRESET
    mask: int = 0x01
    gate: Gate | None = None
    fired: bool = False
    where: str = ""


@attrs.define(eq=False)
class FaultyStream:
    """An async iterator over ``pieces`` that fails, stalls, ends early or flips a byte.

    Args:
        pieces: any async iterable of ``bytes``.
        where: names the stream in the injected error's message.
    """

    pieces: AsyncIterable[bytes]
    where: str = "stream"
    position: int = attrs.field(default=0, init=False)
    """Bytes delivered so far."""
    _faults: list[StreamFault] = attrs.field(factory=list, init=False)
    _iter: AsyncIterator[bytes] | None = attrs.field(default=None, init=False)
    _pending: bytes = attrs.field(default=b"", init=False)
    _ended: bool = attrs.field(default=False, init=False)

    # --- arranging faults ---------------------------------------------------
    def fail(self, *, after_bytes: int = 0, errno: int = errno_mod.ECONNRESET) -> StreamFault:
        """Raise ``OSError(errno)`` once ``after_bytes`` bytes were delivered."""
        return self.add(StreamFault("fail", after_bytes, errno=errno))

    def stall(self, *, after_bytes: int = 0) -> Gate:
        """Wait at ``after_bytes`` until the returned gate is released."""
        gate = Gate("stall", None, after_bytes)
        self.add(StreamFault("stall", after_bytes, gate=gate))
        return gate

    def truncate(self, *, after_bytes: int) -> StreamFault:
        """End the stream (no error) after ``after_bytes`` bytes."""
        return self.add(StreamFault("truncate", after_bytes))

    def flip(self, *, at_byte: int, mask: int = 0x01) -> StreamFault:
        """XOR the byte at offset ``at_byte`` with ``mask`` (1 to 255)."""
        if not 0 < mask < 256:
            raise ValueError(f"mask must be 1..255, not {mask}")
        return self.add(StreamFault("flip", at_byte, mask=mask))

    def add(self, fault: StreamFault) -> StreamFault:
        """Arrange ``fault`` (made by :class:`FaultySource` for the blobs it opens)."""
        if fault.offset < 0:
            raise ValueError(f"negative offset {fault.offset}")
        self._faults.append(fault)
        return fault

    # --- streaming ----------------------------------------------------------
    def __aiter__(self) -> FaultyStream:
        return self

    async def __anext__(self) -> bytes:
        await self._fire_due()
        if self._ended:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        if self._pending:
            piece, self._pending = self._pending, b""
        else:
            if self._iter is None:
                self._iter = aiter(self.pieces)
            piece = await anext(self._iter)  # StopAsyncIteration ends us too
        # cut the piece where the next offset-triggered fault is due
        end = self.position + len(piece)
        cuts = [
            f.offset
            for f in self._faults
            if not f.fired and f.kind != "flip" and self.position < f.offset < end
        ]
        if cuts:
            cut = min(cuts) - self.position
            piece, self._pending = piece[:cut], piece[cut:] + self._pending
            end = self.position + len(piece)
        flips = [f for f in self._faults if not f.fired and f.kind == "flip"]
        if any(self.position <= f.offset < end for f in flips):
            data = bytearray(piece)
            for f in flips:
                if self.position <= f.offset < end:
                    data[f.offset - self.position] ^= f.mask
                    f.fired = True
            piece = bytes(data)
        self.position = end
        return piece

    async def _fire_due(self) -> None:
        for f in self._faults:
            if f.fired or f.kind == "flip" or f.offset != self.position:
                continue
            f.fired = True
            if f.kind == "fail":
                raise OSError(
                    f.errno,
                    f"{os.strerror(f.errno)} (injected after {self.position} bytes"
                    f" of {self.where})",
                )
            if f.kind == "truncate":
                self._ended = True
            elif f.kind == "stall" and f.gate is not None:
                await f.gate.stop_here_async()

    async def aclose(self) -> None:
        """Close the wrapped iterator, if it has an ``aclose``."""
        close = getattr(self._iter, "aclose", None)
        if close is not None:
            await close()


@attrs.define(eq=False)
class _BlobFault:
    fault: StreamFault
    nth: int | None
    digest: str | None
    claimed: bool = False


@attrs.define(eq=False)
class FaultySource:
    """An :class:`~trio_composefs.oci.ImageSource` whose blobs fail where a test asks.

    Enter it (``async with``) in place of the source it wraps; everything but
    ``open_blob`` passes through. Each fault selects a blob by ``nth`` (see the
    module's documentation for how it counts) or by ``digest``, and fires once.
    """

    source: Any
    description: str = attrs.field(init=False)
    """The wrapped source's description."""
    _faults: list[_BlobFault] = attrs.field(factory=list, init=False)
    _opened: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.description = str(self.source.description)

    @property
    def blobs_opened(self) -> int:
        """How many blobs ``open_blob`` has opened so far."""
        return self._opened

    def _add(self, fault: StreamFault, nth: int | None, digest: str | None) -> StreamFault:
        if nth is None and digest is None:
            raise ValueError("select the blob with nth= or digest=")
        if fault.offset < 0:
            raise ValueError(f"negative offset {fault.offset}")
        self._faults.append(_BlobFault(fault, nth, digest))
        return fault

    def fail(
        self,
        *,
        nth: int | None = None,
        digest: str | None = None,
        after_bytes: int = 0,
        errno: int = errno_mod.ECONNRESET,
    ) -> StreamFault:
        """Raise ``OSError(errno)`` after ``after_bytes`` bytes of the selected blob."""
        return self._add(StreamFault("fail", after_bytes, errno=errno), nth, digest)

    def stall(
        self, *, nth: int | None = None, digest: str | None = None, after_bytes: int = 0
    ) -> Gate:
        """Stop the selected blob after ``after_bytes`` bytes until the gate is released."""
        gate = Gate("stall", nth, after_bytes)
        self._add(StreamFault("stall", after_bytes, gate=gate), nth, digest)
        return gate

    def truncate(
        self, *, nth: int | None = None, digest: str | None = None, after_bytes: int
    ) -> StreamFault:
        """End the selected blob quietly after ``after_bytes`` bytes."""
        return self._add(StreamFault("truncate", after_bytes), nth, digest)

    def flip(
        self, *, nth: int | None = None, digest: str | None = None, at_byte: int, mask: int = 1
    ) -> StreamFault:
        """XOR byte ``at_byte`` of the selected blob with ``mask``."""
        if not 0 < mask < 256:
            raise ValueError(f"mask must be 1..255, not {mask}")
        return self._add(StreamFault("flip", at_byte, mask=mask), nth, digest)

    # --- the ImageSource protocol ---------------------------------------------
    async def __aenter__(self) -> FaultySource:
        await self.source.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.source.__aexit__(*exc)

    async def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        resolved: ResolvedImage = await self.source.resolve(platform)
        return resolved

    async def read_blob(self, descriptor: Descriptor, *, max_size: int = 64 << 20) -> bytes:
        data: bytes = await self.source.read_blob(descriptor, max_size=max_size)
        return data

    @asynccontextmanager
    async def open_blob(self, descriptor: Descriptor) -> AsyncIterator[AsyncIterator[bytes]]:
        self._opened += 1
        nth = self._opened
        mine = [
            f
            for f in self._faults
            if not f.claimed
            and (f.nth is None or f.nth == nth)
            and (f.digest is None or f.digest == descriptor.digest)
        ]
        for f in mine:
            f.claimed = True
        async with self.source.open_blob(descriptor) as pieces:
            stream = FaultyStream(pieces, where=f"blob {descriptor.digest} (#{nth})")
            for f in mine:
                f.fault.where = stream.where
                stream.add(f.fault)
            yield stream


def _check_source(source: FaultySource) -> ImageSource:
    return source  # FaultySource is an ImageSource (mypy checks it here)
