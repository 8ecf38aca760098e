"""The tar splitter and header parser as they were before they were tuned for speed
(commit 2c8b558), kept as a test oracle: the tuned code must hand out the same events,
headers and errors. Test-only; not maintained beyond that.
"""

from __future__ import annotations

import collections
import enum
from typing import Final

import attrs

from trio_composefs._errors import DataAfterEndError, TarError
from trio_composefs.formats._sentinels import END, NEED_DATA, Sentinel
from trio_composefs.formats._tarsplit import Event, FileData, FileEnd, FileStart, Inline

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
#: Combined size of the L, K and x extension data that may precede one entry.
MAX_EXTENSION_BYTES = 1024 * 1024
#: Largest entry size we accept; anything above is treated as a corrupt header.
MAX_SIZE = (1 << 63) - 1

REGULAR_TYPES = frozenset(b"0\x007")
#: Types whose size field must be zero.
SIZELESS_TYPES = frozenset(b"123456")

_LOW_BYTES = bytes(range(128))
_OCTAL_DIGITS = b"01234567"
_DECIMAL_DIGITS = b"0123456789"


def roundup(size: int) -> int:
    """Round ``size`` up to a multiple of the 512-byte block."""
    return (size + BLOCK - 1) & ~(BLOCK - 1)


class Dialect(enum.Enum):
    """The header flavour, told by its magic field."""

    USTAR = "ustar"  # POSIX ustar / pax: magic "ustar\0"
    GNU = "gnu"  # GNU and old GNU: magic "ustar " (version " \0")
    V7 = "v7"  # no magic


def dialect_of(block: bytes) -> Dialect:
    """The dialect of a header block, from its magic field."""
    magic = block[257:263]
    if magic == b"ustar\x00":
        return Dialect.USTAR
    if magic == b"ustar ":
        return Dialect.GNU
    return Dialect.V7


def is_extension(typeflag: int, dialect: Dialect) -> bool:
    """Whether a header is an extension (L, K, x, g) rather than an entry of its own.

    In V7 headers these type letters mean nothing special: they are ordinary entries.
    """
    return dialect is not Dialect.V7 and typeflag in b"LKxg"


def decode_name(raw: bytes) -> str:
    """Decode a name from the archive (UTF-8, undecodable bytes kept as surrogates)."""
    return raw.decode("utf-8", "surrogateescape")


def _cstring(field: bytes) -> bytes:
    end = field.find(0)
    return field if end < 0 else field[:end]


def parse_number(
    field: bytes, what: str, *, entry: str | None = None, offset: int | None = None
) -> int:
    """Parse a numeric header field: octal text or GNU base-256.

    An all-NUL or all-space field is 0. Negative base-256 values and anything that is
    not octal digits (with optional surrounding spaces, NUL-terminated) raise
    :class:`TarError`.
    """
    first = field[0] if field else 0
    if first & 0x80:
        if first & 0x40:
            raise TarError(f"negative number in header field {what}", entry=entry, offset=offset)
        return int.from_bytes(bytes([first & 0x3F]) + field[1:], "big")
    text = _cstring(field).strip(b" ")
    if not text:
        return 0
    if text.translate(None, _OCTAL_DIGITS):
        raise TarError(
            f"malformed number in header field {what} (not octal digits)",
            entry=entry,
            offset=offset,
        )
    return int(text, 8)


def verify_checksum(block: bytes, *, offset: int) -> None:
    """Check a header's checksum; unsigned and (historic BSD) signed sums are accepted."""
    stored = parse_number(block[148:156], "chksum", offset=offset)
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 0x20
    if stored == unsigned:
        return
    high = len(rest.translate(None, _LOW_BYTES))
    if stored == unsigned - 256 * high:
        return
    # No name quoted: a block that fails its checksum may not be a tar header at all
    # (a hostile blob could be any file), and its bytes must not reach a message.
    raise TarError("header checksum mismatch (not a tar header?)", offset=offset)


def parse_pax_records(
    data: bytes, *, entry: str | None = None, offset: int | None = None
) -> dict[bytes, bytes]:
    """Parse PAX extended header records (``"<len> <key>=<value>\\n"``).

    Later records override earlier ones with the same key. Trailing NUL bytes after
    the last record are tolerated; anything else malformed raises :class:`TarError`.
    """
    records: dict[bytes, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0 and not data[pos:].strip(b"\x00"):
            break
        space = data.find(b" ", pos, pos + 21)
        length_text = data[pos:space] if space > pos else b""
        if not length_text or length_text.translate(None, _DECIMAL_DIGITS):
            raise TarError("malformed PAX record length", entry=entry, offset=offset)
        record_end = pos + int(length_text)
        if record_end <= space + 1 or record_end > end or data[record_end - 1] != 0x0A:
            raise TarError("malformed PAX record", entry=entry, offset=offset)
        record = data[space + 1 : record_end - 1]
        equals = record.find(b"=")
        if equals <= 0:
            raise TarError("malformed PAX record (no key)", entry=entry, offset=offset)
        records[record[:equals]] = record[equals + 1 :]
        pos = record_end
    return records


def _pax_decimal(value: bytes, key: str, *, entry: str | None, offset: int) -> int:
    if not value or value.translate(None, _DECIMAL_DIGITS):
        raise TarError(
            f"malformed PAX {key} ({len(value)} bytes, not decimal digits)",
            entry=entry,
            offset=offset,
        )
    return int(value)


def _pax_time(value: bytes, *, entry: str | None, offset: int) -> tuple[int, int]:
    seconds, dot, fraction = value.partition(b".")
    if (
        not seconds
        or seconds.translate(None, _DECIMAL_DIGITS)
        or (dot and fraction.translate(None, _DECIMAL_DIGITS))
    ):
        raise TarError(
            f"malformed PAX mtime ({len(value)} bytes, not a decimal time)",
            entry=entry,
            offset=offset,
        )
    nsec = int(fraction[:9].ljust(9, b"0")) if fraction else 0
    return int(seconds), nsec


@attrs.frozen
class TarHeader:
    """One entry's header with its L/K/x extensions applied.

    Created by the splitter once the main header block has been read. ``path``,
    ``size`` and the type are resolved eagerly (the splitter needs them); the other
    fields are parsed on demand by the methods, which raise :class:`TarError`.

    Attributes:
        offset: byte offset of the main header block in the stream.
        block: the raw 512-byte main header.
        pax: the entry's PAX ``x`` records (raw keys and values).
        long_name: the GNU ``L`` name, NULs stripped, if there was one.
        long_link: the GNU ``K`` link target, NULs stripped, if there was one.
        path: the resolved path as stored (PAX ``path`` > GNU long name > ustar prefix/name).
        size: the resolved content size (PAX ``size`` over the header field).
    """

    offset: int
    block: bytes
    pax: dict[bytes, bytes] = attrs.field(hash=False)
    long_name: bytes | None
    long_link: bytes | None
    path: str
    size: int

    @property
    def typeflag(self) -> bytes:
        """The one-byte type flag (``b"0"``, ``b"5"``, ...)."""
        return self.block[156:157]

    @property
    def dialect(self) -> Dialect:
        """The header's dialect."""
        return dialect_of(self.block)

    @property
    def is_regular(self) -> bool:
        """Whether the entry is a regular file (types ``0``, NUL and ``7``)."""
        return self.block[156] in REGULAR_TYPES

    def _number(self, start: int, stop: int, what: str) -> int:
        return parse_number(self.block[start:stop], what, entry=self.path, offset=self.offset)

    def _pax_int(self, key: bytes) -> int | None:
        value = self.pax.get(key)
        if value is None:
            return None
        return _pax_decimal(value, key.decode(), entry=self.path, offset=self.offset)

    def mode(self) -> int:
        """The raw header mode field (not masked)."""
        return self._number(100, 108, "mode")

    def uid(self) -> int:
        """The owner's uid; a PAX ``uid`` overrides it and is cast to 32 bits."""
        value = self._pax_int(b"uid")
        return self._number(108, 116, "uid") if value is None else value & 0xFFFFFFFF

    def gid(self) -> int:
        """The group's gid; a PAX ``gid`` overrides it and is cast to 32 bits."""
        value = self._pax_int(b"gid")
        return self._number(116, 124, "gid") if value is None else value & 0xFFFFFFFF

    def mtime(self) -> tuple[int, int]:
        """``(seconds, nanoseconds)``; nanoseconds only come from a PAX ``mtime``."""
        value = self.pax.get(b"mtime")
        if value is None:
            return self._number(136, 148, "mtime"), 0
        return _pax_time(value, entry=self.path, offset=self.offset)

    def linkname(self) -> str:
        """The link target (PAX ``linkpath`` > GNU long link > header); ``""`` if none."""
        value = self.pax.get(b"linkpath")
        if value is None:
            value = self.long_link if self.long_link is not None else _cstring(self.block[157:257])
        return decode_name(value)

    def device(self) -> tuple[int, int]:
        """``(major, minor)`` from the header's device fields."""
        return self._number(329, 337, "devmajor"), self._number(337, 345, "devminor")

    def xattrs(self) -> dict[str, bytes]:
        """Extended attributes from PAX ``SCHILY.xattr.*`` records."""
        prefix = b"SCHILY.xattr."
        return {
            decode_name(key[len(prefix) :]): value
            for key, value in self.pax.items()
            if key.startswith(prefix)
        }

    @classmethod
    def from_block(
        cls,
        block: bytes,
        *,
        offset: int,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarHeader:
        """Resolve a main header block (checksum already verified) and its extensions.

        Raises:
            TarError: empty path, bad or absurd size, sparse entry, non-zero size on a
                link, device, directory or fifo.
        """
        dialect = dialect_of(block)
        raw_path = pax.get(b"path") or None
        if raw_path is None:
            raw_path = long_name or None
        if raw_path is None:
            raw_path = _cstring(block[:100])
            if dialect is Dialect.USTAR:
                prefix = _cstring(block[345:500])
                if prefix:
                    raw_path = prefix + b"/" + raw_path
        path = decode_name(raw_path)
        if not path:
            raise TarError("entry with an empty path", offset=offset)
        typeflag = block[156]
        if typeflag == ord("S"):
            raise TarError("sparse entries are not supported", entry=path, offset=offset)
        pax_size = pax.get(b"size")
        if pax_size is not None:
            size = _pax_decimal(pax_size, "size", entry=path, offset=offset)
        else:
            size = parse_number(block[124:136], "size", entry=path, offset=offset)
        for key in (b"uid", b"gid"):
            if key in pax:
                _pax_decimal(pax[key], key.decode(), entry=path, offset=offset)
        if b"mtime" in pax:
            _pax_time(pax[b"mtime"], entry=path, offset=offset)
        if size > MAX_SIZE:
            raise TarError(f"absurd entry size {size}", entry=path, offset=offset)
        if size and typeflag in SIZELESS_TYPES:
            raise TarError(
                f"non-zero size {size} on an entry of type {chr(typeflag)!r}",
                entry=path,
                offset=offset,
            )
        return cls(
            offset=offset,
            block=block,
            pax=pax,
            long_name=long_name,
            long_link=long_link,
            path=path,
            size=size,
        )


#: composefs-rs ``INLINE_CONTENT_MAX_V0``: regular files up to this size stay inline.
INLINE_MAX: Final = 64


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

    Attributes:
        offset: bytes of the stream handed out in events so far.
        header: the resolved header of the latest entry (set when its header
            block is handed out), or ``None`` before the first entry.
        entries: how many entries (main headers) have been handed out.

    Memory: at most one header plus its extension data (1 MiB) is held beyond
    what the latest :meth:`receive_data` call gave. File data is handed out as soon
    as it is buffered.
    """

    def __init__(self, *, inline_max: int = INLINE_MAX) -> None:
        self._inline_max = inline_max
        self._buf = _Buffer()
        self._eof = False
        self._state = _State.HEADER
        self._remaining = 0
        self._pad = 0
        self._error: TarError | None = None
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
                call raises the same error.
        """
        if self._error is not None:
            raise self._error
        try:
            event = self._next()
        except TarError as error:
            self._state = _State.ERROR
            self._error = error
            raise
        if isinstance(event, Inline | FileData):
            self.offset += len(event.data)
        return event

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
        if state is _State.FILE:
            if self._remaining == 0:
                self._enter_content(self._pad)
                return FileEnd()
            if buf.size:
                data = buf.take(self._remaining)
                self._remaining -= len(data)
                return FileData(data)
            if self._eof:
                raise self._truncated("inside a file's content")
            return NEED_DATA
        if state is _State.CONTENT:
            if buf.size:
                data = buf.take(self._remaining)
                self._remaining -= len(data)
                if self._remaining == 0:
                    self._state = _State.HEADER
                return Inline(data)
            if self._eof:
                raise self._truncated("inside an entry's content or padding")
            return NEED_DATA
        if state is _State.HEADER:
            return self._header()
        if state is _State.FILE_START:
            assert self.header is not None
            self._state = _State.FILE
            self._remaining = self.header.size
            self._pad = roundup(self.header.size) - self.header.size
            return FileStart(self.header.path, self.header.size, self.offset)
        if state is _State.TRAILER:
            if buf.size:
                return Inline(buf.take_all())
            if self._eof:
                self._state = _State.DONE
                return END
            return NEED_DATA
        return END  # DONE

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

    def _header(self) -> Event | Sentinel:
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
            return Inline(buf.take_all())
        verify_checksum(block, offset=offset)
        typeflag = block[156]
        dialect = dialect_of(block)
        if is_extension(typeflag, dialect):
            return self._extension(block, typeflag, offset)
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
        buf.consume(BLOCK)
        if header.is_regular and header.size > self._inline_max:
            self._state = _State.FILE_START
        else:
            self._enter_content(roundup(header.size))
        return Inline(block)

    def _extension(self, block: bytes, typeflag: int, offset: int) -> Event | Sentinel:
        kind = chr(typeflag)
        entry = self._pending_name()
        size = parse_number(block[124:136], "size", entry=entry, offset=offset)
        already = 0 if kind == "g" else self._ext_bytes
        if size > MAX_EXTENSION_BYTES - already:
            raise TarError(
                f"extension header {kind!r} too large ({size} bytes; limit is"
                f" {MAX_EXTENSION_BYTES} per entry)",
                entry=entry,
                offset=offset,
            )
        total = BLOCK + roundup(size)
        buf = self._buf
        if buf.size < total:
            if self._eof:
                raise self._truncated(f"inside extension header {kind!r}", in_entry=False)
            return NEED_DATA
        data = buf.peek(total)
        content = data[BLOCK : BLOCK + size]
        if kind == "L":
            if self._long_name is not None:
                raise TarError("duplicate GNU long name header", entry=entry, offset=offset)
            self._long_name = content.split(b"\x00", 1)[0]
        elif kind == "K":
            if self._long_link is not None:
                raise TarError("duplicate GNU long link header", entry=entry, offset=offset)
            self._long_link = content.split(b"\x00", 1)[0]
        else:
            records = parse_pax_records(content, entry=entry, offset=offset)
            if any(key.startswith(b"GNU.sparse.") for key in records):
                raise TarError("sparse entries are not supported", entry=entry, offset=offset)
            if kind == "x":
                if self._pax is not None:
                    raise TarError("duplicate PAX extended header", entry=entry, offset=offset)
                self._pax = records
        if kind != "g":
            self._ext_bytes += size
            if self._ext_offset is None:
                self._ext_offset = offset
        buf.consume(total)
        return Inline(data)
