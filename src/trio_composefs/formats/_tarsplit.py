"""Sans-IO tar splitter: which bytes of a tar stream stay inline, which become objects.

Modelled on h11: feed bytes with :meth:`TarSplitter.receive_data` (``b""`` means end
of input), then call :meth:`TarSplitter.next_event` until it returns :data:`NEED_DATA`
(feed more) or :data:`END` (done). No I/O happens here. The sentinels are the shared
ones of :mod:`trio_composefs.formats._sentinels` (also importable from here).

Concatenating the ``data`` of every :class:`Inline` and :class:`FileData` event, in
order, gives back the input byte for byte: headers, extension headers and their data,
small files, padding, the end-of-archive blocks and everything after them. Regular
files (types ``0``, NUL, ``7``) larger than ``inline_max`` (64, as composefs-rs) are
announced with :class:`FileStart`, streamed as :class:`FileData` and closed with
:class:`FileEnd`; their padding follows inline. Rules: ``composefs-rs-notes.md`` §4.1-4.2.

By default every header block, extension header (with its data) and stretch of
inline content is an :class:`Inline` event of its own. With ``coalesce=True`` the
splitter hands out one :class:`Inline` per run of inline bytes (everything between
two large files' contents that is buffered), which is what an importer wants: far
fewer events. Either way each :class:`Inline` lists, in :attr:`Inline.headers`, the
entries whose main header block it carries. With ``zero_copy=True`` a large file's
:class:`FileData` may be a read-only :class:`memoryview` of the bytes received rather
than a copy (it keeps that received piece alive while it lives).
"""

from __future__ import annotations

import collections
import enum
from typing import Final

import attrs

from .._errors import DataAfterEndError, TarError
from ._sentinels import END, NEED_DATA, Sentinel
from ._tarheader import (
    BLOCK,
    EXTENSION_TYPES,
    GNU_MAGIC,
    MAX_EXTENSION_BYTES,
    PLAIN_OCTAL,
    REGULAR_TYPES,
    USTAR_MAGIC,
    ZERO_BLOCK,
    TarHeader,
    decode_name,
    header_sum,
    parse_number,
    parse_pax_records,
    verify_checksum,
)

__all__ = [
    "END",
    "INLINE_MAX",
    "NEED_DATA",
    "Event",
    "FileData",
    "FileEnd",
    "FileStart",
    "Inline",
    "Sentinel",
    "TarEvent",
    "TarSplitter",
]

#: composefs-rs ``INLINE_CONTENT_MAX_V0``: regular files up to this size stay inline.
INLINE_MAX: Final = 64


@attrs.frozen
class Inline:
    """Bytes that stay inline in the splitstream, in stream order.

    Attributes:
        data: the bytes (never empty).
        headers: the resolved headers of the entries whose main header block is in
            ``data``, in stream order (not compared by ``==``).
    """

    data: bytes
    headers: tuple[TarHeader, ...] = attrs.field(default=(), eq=False, repr=False)


@attrs.frozen
class FileStart:
    """A regular file larger than ``inline_max`` begins.

    Attributes:
        path: the entry's path as stored in the archive (not normalised).
        size: its content size in bytes.
        offset: stream offset of the first content byte.
    """

    path: str
    size: int
    offset: int


@attrs.frozen
class FileData:
    """Part of the current external file's content.

    ``data`` is ``bytes``, or with ``TarSplitter(zero_copy=True)`` possibly a read-only
    ``memoryview`` of a piece given to :meth:`TarSplitter.receive_data`.
    """

    data: bytes | memoryview


@attrs.frozen
class FileEnd:
    """The current external file's content is complete (its padding follows inline)."""


#: The events of :meth:`TarSplitter.next_event` (events only; see ``formats._sentinels``).
Event = Inline | FileStart | FileData | FileEnd
#: :data:`Event` under the name :mod:`trio_composefs.formats` exports it by.
TarEvent = Event


class _State(enum.Enum):
    HEADER = enum.auto()  # expecting a header block (or the end-of-archive marker)
    CONTENT = enum.auto()  # passing `_remaining` bytes through inline
    FILE_START = enum.auto()  # a FileStart event is due
    FILE = enum.auto()  # streaming `_remaining` bytes of an external file
    TRAILER = enum.auto()  # after the end-of-archive marker: everything inline
    DONE = enum.auto()
    ERROR = enum.auto()


class _Buffer:
    """A queue of received chunks; hands out whole chunks without copying when it can."""

    __slots__ = ("_chunks", "_pos", "size")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._pos = 0  # read position in the first chunk
        self.size = 0  # bytes available

    def append(self, data: bytes) -> None:
        chunks = self._chunks
        # Merge tiny pieces (a peer sending a byte at a time) so that the queue's
        # overhead stays proportional to the bytes it holds.
        if chunks and len(data) < 256 and len(chunks[-1]) < 4096:
            chunks[-1] += data
        else:
            chunks.append(data)
        self.size += len(data)

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes (the caller checked ``size >= n``), not consumed."""
        first = self._chunks[0]
        pos = self._pos
        if len(first) - pos >= n:
            return first[pos : pos + n]
        # Join just enough leading chunks into one so that later peeks are cheap.
        parts = [first[pos:]]
        have = len(parts[0])
        self._chunks.popleft()
        while have < n:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            have += len(chunk)
        joined = b"".join(parts)
        self._chunks.appendleft(joined)
        self._pos = 0
        return joined[:n]

    def consume(self, n: int) -> None:
        """Drop ``n`` bytes (the caller checked ``size >= n``)."""
        self.size -= n
        chunks = self._chunks
        while n:
            left = len(chunks[0]) - self._pos
            if n < left:
                self._pos += n
                return
            n -= left
            chunks.popleft()
            self._pos = 0

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes from the first chunk (the caller checked ``size > 0``)."""
        first = self._chunks[0]
        pos = self._pos
        left = len(first) - pos
        if left <= limit:
            self._chunks.popleft()
            self._pos = 0
            self.size -= left
            return first if pos == 0 else first[pos:]
        self._pos = pos + limit
        self.size -= limit
        return first[pos : pos + limit]

    def take_view(self, limit: int) -> bytes | memoryview:
        """As :meth:`take`, but a part of a chunk comes as a view of it, not a copy."""
        first = self._chunks[0]
        pos = self._pos
        left = len(first) - pos
        if left <= limit:
            self._chunks.popleft()
            self._pos = 0
            self.size -= left
            return first if pos == 0 else memoryview(first)[pos:]
        self._pos = pos + limit
        self.size -= limit
        return memoryview(first)[pos : pos + limit]

    def take_all(self) -> bytes:
        """Everything buffered, consumed."""
        if self._pos:
            self._chunks[0] = self._chunks[0][self._pos :]
            self._pos = 0
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self.size = 0
        return data


class TarSplitter:
    """Split a tar stream into inline bytes and external file contents.

    Args:
        inline_max: regular files of at most this many bytes stay inline. Changing
            it from 64 makes splitstreams incompatible with composefs-rs.
        coalesce: hand out each run of inline bytes (headers, small files, padding,
            up to the next large file's content or to the end of what is buffered) as
            one :class:`Inline` event instead of one per header or content piece. The
            bytes, and the other events, are the same either way.
        zero_copy: hand out a large file's content that is part of a received piece
            as a read-only ``memoryview`` of it instead of a copy.

    Attributes:
        offset: bytes of the stream handed out in events so far.
        header: the resolved header of the latest entry (set when its header
            block is handed out), or ``None`` before the first entry.
        entries: how many entries (main headers) have been handed out.

    Memory: at most one header plus its extension data (1 MiB) is held beyond
    what the latest :meth:`receive_data` call gave. File data is handed out as soon
    as it is buffered.
    """

    def __init__(
        self, *, inline_max: int = INLINE_MAX, coalesce: bool = False, zero_copy: bool = False
    ) -> None:
        self._inline_max = inline_max
        self._coalesce = coalesce
        self._zero_copy = zero_copy
        self._buf = _Buffer()
        self._eof = False
        self._state = _State.HEADER
        self._remaining = 0
        self._pad = 0
        self._error: TarError | None = None
        self._headers: list[TarHeader] = []  # entries resolved since the last Inline event
        self.offset = 0
        self.header: TarHeader | None = None
        self.entries = 0
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._pax: dict[bytes, bytes] | None = None
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None
        self._ext_bytes = 0
        self._ext_offset: int | None = None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the stream; ``b""`` signals the end of the input.

        Raises:
            DataAfterEndError: data after the end of input was signalled (a
                :class:`RuntimeError`).
        """
        if self._eof:
            raise DataAfterEndError("TarSplitter.receive_data() after the end of input")
        if data:
            self._buf.append(bytes(data))
        else:
            self._eof = True

    def next_event(self) -> Event | Sentinel:
        """The next event, :data:`NEED_DATA` or :data:`END`.

        Raises:
            TarError: the stream is malformed or truncated. Once raised, every later
                call raises the same error. (With ``coalesce``, the inline bytes before
                the fault are handed out first; the error comes with the next call.)
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except TarError as error:
            self._state = _State.ERROR
            self._error = error
            raise

    @property
    def inline_max(self) -> int:
        """Regular files of at most this many bytes stay inline."""
        return self._inline_max

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out in events."""
        return self._buf.size

    def skip_external_content(self) -> None:
        """Treat the current large file's content as supplied elsewhere, and skip it.

        For readers of a splitstream, where each large file's content is an external
        object rather than bytes of the stream (:class:`~trio_composefs.formats.EntryReader`).
        Call it right after :meth:`next_event` returned the file's :class:`FileStart`,
        with nothing buffered (:attr:`buffered` is 0): the splitter then behaves as
        though the :class:`FileData` and :class:`FileEnd` events had been handed out.
        :attr:`offset` advances by the file's size; its padding is expected next, inline.

        Raises:
            TarError: no large file's content is due (no :class:`FileStart` was just
                handed out, or some of its content already was), or bytes are buffered
                where the content belongs. The error is sticky, as in :meth:`next_event`.
        """
        if self._error is not None:
            raise self._error
        header = self.header
        if self._state is not _State.FILE or header is None or self._remaining != header.size:
            error = TarError("external content where none is due", offset=self.offset)
        elif self._buf.size:
            error = TarError(
                "inline bytes where an external file's content belongs",
                entry=header.path,
                offset=self.offset,
            )
        else:
            self.offset += header.size
            self._remaining = 0
            self._enter_content(self._pad)
            return
        self._state = _State.ERROR
        self._error = error
        raise error

    def _truncated(self, what: str, *, in_entry: bool = True) -> TarError:
        if in_entry:
            entry = self.header.path if self.header is not None else None
        else:
            entry = self._pending_name()
        return TarError(
            f"truncated archive: end of input {what}",
            entry=entry,
            offset=self.offset + self._buf.size,
        )

    def _next(self) -> Event | Sentinel:
        state = self._state
        buf = self._buf
        if state is _State.HEADER or state is _State.CONTENT:
            piece = self._run() if self._coalesce else self._step()
            if piece is NEED_DATA or piece is END:
                return piece
            headers = self._headers
            if not headers:
                return Inline(piece)
            event = Inline(piece, tuple(headers))
            headers.clear()
            return event
        if state is _State.FILE:
            if self._remaining == 0:
                self._enter_content(self._pad)
                return FileEnd()
            if buf.size:
                data = (
                    buf.take_view(self._remaining) if self._zero_copy else buf.take(self._remaining)
                )
                self._remaining -= len(data)
                self.offset += len(data)
                return FileData(data)
            if self._eof:
                raise self._truncated("inside a file's content")
            return NEED_DATA
        if state is _State.FILE_START:
            header = self.header
            assert header is not None
            self._state = _State.FILE
            self._remaining = size = header.size
            self._pad = -size % BLOCK
            return FileStart(header.path, size, self.offset)
        if state is _State.TRAILER:
            if buf.size:
                data = buf.take_all()
                self.offset += len(data)
                return Inline(data)
            if self._eof:
                self._state = _State.DONE
                return END
            return NEED_DATA
        return END  # DONE

    def _run(self) -> bytes | Sentinel:
        """Inline pieces up to the next large file's content, :data:`NEED_DATA` or
        :data:`END`, joined (``coalesce``). An error after some pieces is kept for the
        next call, so that the good bytes before it are handed out first."""
        parts: list[bytes] = []
        piece: bytes | Sentinel = NEED_DATA
        try:
            while True:
                state = self._state
                if state is _State.HEADER or state is _State.CONTENT:
                    # Whole entries inside the first buffered chunk, in one slice; the
                    # general path for a header that straddles chunks, the end, errors.
                    if self._scan(parts):
                        continue
                    piece = self._step()
                else:
                    break
                if piece is NEED_DATA or piece is END:
                    break
                assert isinstance(piece, bytes)
                parts.append(piece)
        except TarError as error:
            if not parts:
                raise
            self._state = _State.ERROR
            self._error = error
        if not parts:
            return piece
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _scan(self, parts: list[bytes]) -> bool:
        """Pass over the content due (state ``CONTENT``) and the entries that lie whole
        in the first buffered chunk, appending their bytes to ``parts`` as one slice.

        Returns whether it made progress (then the caller looks at the state again);
        if not, the content or next header is not whole in the chunk, or the header is
        a zero block or an extension with too little data, and :meth:`_step` takes over.
        A :class:`TarError` is raised after the bytes before the faulty header are
        appended and consumed.
        """
        buf = self._buf
        if not buf.size:
            return False
        cur = buf._chunks[0]
        start = p = buf._pos
        end = len(cur)
        base = self.offset - start  # stream offset of cur[0]
        if self._state is _State.CONTENT:
            if end - p < self._remaining:
                return False
            p += self._remaining
            self._state = _State.HEADER
        try:
            while end - p >= BLOCK:
                block = cur[p : p + BLOCK]
                if block == ZERO_BLOCK:
                    break
                offset = base + p
                stored = PLAIN_OCTAL(block, 148, 156)
                if stored is None or int(stored[1] or b"0", 8) != header_sum(block):
                    verify_checksum(block, offset=offset)  # the general rules: passes or raises
                typeflag = block[156]
                if typeflag in EXTENSION_TYPES and block[257:263] in _EXTENSION_MAGICS:
                    size = self._extension_size(block, typeflag, offset)
                    total = BLOCK + ((size + BLOCK - 1) & -BLOCK)
                    if end - p < total:
                        break
                    self._apply_extension(typeflag, cur[p + BLOCK : p + BLOCK + size], offset)
                    p += total
                    continue
                self._entry(block, offset)
                p += BLOCK
                if self._state is not _State.CONTENT:
                    if self._state is _State.HEADER:
                        continue
                    break  # a large file's content is due
                padded = self._remaining
                if end - p < padded:
                    break  # the content goes on past the chunk: the caller takes it
                p += padded
                self._state = _State.HEADER
        finally:
            if p > start:
                parts.append(cur if start == 0 and p == end else cur[start:p])
                buf.consume(p - start)
                self.offset = base + p
        return p > start

    def _step(self) -> bytes | Sentinel:
        """One inline piece (a header with its extensions' data, or content), or a sentinel."""
        if self._state is _State.HEADER:
            return self._header()
        buf = self._buf
        if buf.size:
            data = buf.take(self._remaining)
            n = len(data)
            self.offset += n
            self._remaining -= n
            if not self._remaining:
                self._state = _State.HEADER
            return data
        if self._eof:
            raise self._truncated("inside an entry's content or padding")
        return NEED_DATA

    def _enter_content(self, size: int) -> None:
        if size:
            self._state = _State.CONTENT
            self._remaining = size
        else:
            self._state = _State.HEADER

    def _pending_name(self) -> str | None:
        if self._pax is not None and self._pax.get(b"path"):
            return decode_name(self._pax[b"path"])
        if self._long_name:
            return decode_name(self._long_name)
        return None

    def _header(self) -> bytes | Sentinel:
        """The next header block, or extension header with its data, as one piece."""
        buf = self._buf
        offset = self.offset
        if buf.size < BLOCK:
            if not self._eof:
                return NEED_DATA
            if buf.size == 0 and self._ext_offset is None:
                self._state = _State.DONE
                return END
            raise self._truncated(
                "after an extension header" if buf.size == 0 else "inside a header block",
                in_entry=False,
            )
        block = buf.peek(BLOCK)
        if block == ZERO_BLOCK:
            if self._ext_offset is not None:
                raise TarError(
                    "end-of-archive marker after an extension header",
                    entry=self._pending_name(),
                    offset=offset,
                )
            if buf.size < 2 * BLOCK:
                if not self._eof:
                    return NEED_DATA
                raise TarError("truncated archive: a single zero block at the end", offset=offset)
            if buf.peek(2 * BLOCK)[BLOCK:] != ZERO_BLOCK:
                raise TarError("stray zero block before a header", offset=offset)
            self._state = _State.TRAILER
            data = buf.take_all()
            self.offset += len(data)
            return data
        stored = PLAIN_OCTAL(block, 148, 156)
        if stored is None or int(stored[1] or b"0", 8) != header_sum(block):
            verify_checksum(block, offset=offset)  # the general rules: passes or raises
        typeflag = block[156]
        if typeflag in EXTENSION_TYPES and block[257:263] in _EXTENSION_MAGICS:
            size = self._extension_size(block, typeflag, offset)
            total = BLOCK + ((size + BLOCK - 1) & -BLOCK)
            if buf.size < total:
                if self._eof:
                    raise self._truncated(
                        f"inside extension header {chr(typeflag)!r}", in_entry=False
                    )
                return NEED_DATA
            data = buf.peek(total)
            self._apply_extension(typeflag, data[BLOCK : BLOCK + size], offset)
            buf.consume(total)
            self.offset = offset + total
            return data
        self._entry(block, offset)
        buf.consume(BLOCK)
        self.offset = offset + BLOCK
        return block

    def _entry(self, block: bytes, offset: int) -> None:
        """Resolve a main header block (checksum verified) with the pending extensions,
        and enter the state for its content (the caller then hands the block out)."""
        if self._ext_offset is None:
            header = TarHeader.from_block(
                block, offset=offset, pax={}, long_name=None, long_link=None
            )
        else:
            header = TarHeader.from_block(
                block,
                offset=offset,
                pax=self._pax or {},
                long_name=self._long_name,
                long_link=self._long_link,
            )
            self._reset_pending()
        self.header = header
        self.entries += 1
        self._headers.append(header)
        size = header.size
        if size > self._inline_max and block[156] in REGULAR_TYPES:
            self._state = _State.FILE_START
        elif size:
            self._state = _State.CONTENT
            self._remaining = (size + BLOCK - 1) & -BLOCK

    def _extension_size(self, block: bytes, typeflag: int, offset: int) -> int:
        """The data size of an extension header, checked against the per-entry limit."""
        plain = PLAIN_OCTAL(block, 124, 136)
        if plain is not None:
            size = int(plain[1] or b"0", 8)
        else:
            size = parse_number(block[124:136], "size", entry=self._pending_name(), offset=offset)
        already = 0 if typeflag == 0x67 else self._ext_bytes  # "g"
        if size > MAX_EXTENSION_BYTES - already:
            raise TarError(
                f"extension header {chr(typeflag)!r} too large ({size} bytes; limit is"
                f" {MAX_EXTENSION_BYTES} per entry)",
                entry=self._pending_name(),
                offset=offset,
            )
        return size

    def _apply_extension(self, typeflag: int, content: bytes, offset: int) -> None:
        """Record an extension header's data (``content``, without padding) for the entry."""
        if typeflag == 0x4C:  # "L"
            if self._long_name is not None:
                raise TarError(
                    "duplicate GNU long name header", entry=self._pending_name(), offset=offset
                )
            self._long_name = content.split(b"\x00", 1)[0]
        elif typeflag == 0x4B:  # "K"
            if self._long_link is not None:
                raise TarError(
                    "duplicate GNU long link header", entry=self._pending_name(), offset=offset
                )
            self._long_link = content.split(b"\x00", 1)[0]
        else:
            entry = self._pending_name()
            records = parse_pax_records(content, entry=entry, offset=offset)
            if b"GNU.sparse." in content and any(key.startswith(b"GNU.sparse.") for key in records):
                raise TarError("sparse entries are not supported", entry=entry, offset=offset)
            if typeflag == 0x78:  # "x"
                if self._pax is not None:
                    raise TarError("duplicate PAX extended header", entry=entry, offset=offset)
                self._pax = records
        if typeflag != 0x67:  # "g"
            self._ext_bytes += len(content)
            if self._ext_offset is None:
                self._ext_offset = offset


_EXTENSION_MAGICS: Final = (USTAR_MAGIC, GNU_MAGIC)
