"""Read a layer's tar entries back from its splitstream chunks.

The chunk sequence is the tar stream with each large regular file replaced by an
:class:`~trio_composefs.formats.ExternalChunk`. :class:`EntryReader` (sans-IO, fed chunk
by chunk) runs the same splitter that produced the chunks over the inline bytes and
checks that every external chunk sits exactly where a large file's content was;
:func:`iter_entries` drives it over an iterable of chunks. Metadata is resolved as
composefs-rs does (``composefs-rs-notes.md`` §4.3).
"""

from __future__ import annotations

import collections
import enum
import stat
from collections.abc import Iterable, Iterator

import attrs

from .._errors import DataAfterEndError, InternalError, TarError
from ._chunks import Chunk, ExternalChunk
from ._sentinels import END, NEED_DATA, Sentinel
from ._tarheader import BLOCK, TarHeader
from ._tarsplit import INLINE_MAX, FileData, FileEnd, FileStart, Inline, TarSplitter

__all__ = [
    "END",
    "NEED_DATA",
    "EntryReader",
    "EntryType",
    "SplitterEntries",
    "TarEntry",
    "entry_from_header",
    "iter_entries",
    "makedev",
    "normalize_path",
]


def makedev(major: int, minor: int) -> int:
    """glibc's ``dev_t`` encoding of a device number, exactly as :func:`os.makedev` computes it.

    Written out so that this module needs no ``os``: bits 0-7 of the minor, then 12 bits of
    the major, then the minor's bits 8-31 at bit 20 and the major's bits 12-31 at bit 44.
    The arguments are C ints (:class:`OverflowError` outside ``[-2**31, 2**31)``, as
    ``os.makedev`` raises); the result is a signed 64-bit value, as ``os.makedev`` returns.
    """
    if not (-(1 << 31) <= major < 1 << 31 and -(1 << 31) <= minor < 1 << 31):
        raise OverflowError(f"device number {major},{minor} does not fit a C int")
    major &= 0xFFFFFFFF
    minor &= 0xFFFFFFFF
    dev = (
        ((major & 0xFFF) << 8)
        | ((major & 0xFFFFF000) << 32)
        | (minor & 0xFF)
        | ((minor & 0xFFFFFF00) << 12)
    )
    return dev - (1 << 64) if dev >= 1 << 63 else dev


class EntryType(enum.Enum):
    """The kinds of tar entry a composefs image can hold."""

    REGULAR = "regular"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    DIRECTORY = "directory"
    FIFO = "fifo"

    @property
    def format_bits(self) -> int:
        """The ``S_IFMT`` bits for this type (hard links count as regular files)."""
        return _FORMAT_BITS[self]


_FORMAT_BITS = {
    EntryType.REGULAR: stat.S_IFREG,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.DIRECTORY: stat.S_IFDIR,
    EntryType.FIFO: stat.S_IFIFO,
}

_TYPES = {
    ord("0"): EntryType.REGULAR,
    0: EntryType.REGULAR,
    ord("7"): EntryType.REGULAR,
    ord("1"): EntryType.HARDLINK,
    ord("2"): EntryType.SYMLINK,
    ord("3"): EntryType.CHAR,
    ord("4"): EntryType.BLOCK,
    ord("5"): EntryType.DIRECTORY,
    ord("6"): EntryType.FIFO,
}


@attrs.frozen
class TarEntry:
    """One entry of a layer, with its metadata resolved.

    Attributes:
        path: normalised absolute path (``"/"`` for the root).
        type: the entry's kind.
        mode: the header's raw mode field (permission bits; not masked).
        uid: owner (PAX ``uid`` wins, cast to 32 bits).
        gid: group (PAX ``gid`` wins, cast to 32 bits).
        mtime: modification time, integer seconds.
        mtime_nsec: nanoseconds from a PAX ``mtime`` fraction, else 0.
        link_target: hard link target (normalised absolute) or symlink target (raw);
            ``None`` for other types.
        rdev: ``os.makedev(major, minor)`` for devices, else 0.
        xattrs: extended attributes from PAX ``SCHILY.xattr.*`` records.
        content: a regular file's content when inline (at most 64 bytes; ``b""`` for
            other types), or the external chunk holding it.
    """

    path: str
    type: EntryType
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    link_target: str | None
    rdev: int
    xattrs: dict[str, bytes] = attrs.field(hash=False)
    content: bytes | ExternalChunk

    @property
    def size(self) -> int:
        """The content size in bytes."""
        return self.content.size if isinstance(self.content, ExternalChunk) else len(self.content)


def normalize_path(raw: str, *, entry: str | None = None, offset: int | None = None) -> str:
    """Make an archive path absolute: ``"./a//b/"`` -> ``"/a/b"``, ``"./"`` -> ``"/"``.

    Raises:
        TarError: the path has a ``..`` component.
    """
    parts = [part for part in raw.split("/") if part and part != "."]
    if ".." in parts:
        raise TarError("path with a '..' component", entry=entry or raw, offset=offset)
    return "/" + "/".join(parts)


def entry_from_header(header: TarHeader, content: bytes | ExternalChunk) -> TarEntry:
    """The entry of a resolved tar header (:attr:`TarSplitter.header`) and its content.

    ``content`` is a regular file's bytes (at most 64, :data:`INLINE_MAX`), ``b""`` for
    every other type, or the :class:`ExternalChunk` of a larger regular file.

    Raises:
        TarError: an entry type composefs cannot hold, a path with ``..``, a hard link
            without a target, a device number out of range.
    """
    typeflag = header.block[156]
    kind = _TYPES.get(typeflag)
    if kind is None:
        raise TarError(
            f"unsupported entry type {chr(typeflag)!r}", entry=header.path, offset=header.offset
        )
    # Old (V7-style) archives mark directories as type NUL with a name ending in "/"
    # (Python's tarfile and GNU tar read them so too).
    if typeflag == 0 and header.path.endswith("/") and header.size == 0:
        kind = EntryType.DIRECTORY
    path = normalize_path(header.path, offset=header.offset)
    link_target: str | None = None
    if kind is EntryType.HARDLINK:
        target = header.linkname()
        if not target:
            raise TarError("hard link without a target", entry=header.path, offset=header.offset)
        link_target = normalize_path(target, entry=header.path, offset=header.offset)
    elif kind is EntryType.SYMLINK:
        link_target = header.linkname()
    rdev = 0
    if kind in (EntryType.CHAR, EntryType.BLOCK):
        major, minor = header.device()
        try:
            rdev = makedev(major, minor)
        except (OverflowError, ValueError):
            raise TarError(
                f"device number {major},{minor} out of range",
                entry=header.path,
                offset=header.offset,
            ) from None
    seconds, nsec = header.mtime()
    return TarEntry(
        path=path,
        type=kind,
        mode=header.mode(),
        uid=header.uid(),
        gid=header.gid(),
        mtime=seconds,
        mtime_nsec=nsec,
        link_target=link_target,
        rdev=rdev,
        xattrs=header.xattrs(),
        content=content,
    )


class SplitterEntries:
    """Which of a :class:`TarSplitter`'s events complete an entry (sans-IO).

    Shared by :class:`EntryReader` (re-reading a splitstream) and the importer (which
    taps the entries of a layer while it splits it): both watch the splitter that made
    the events. Call :meth:`inline` with every :class:`Inline` event, right after
    :meth:`TarSplitter.next_event` handed it out; it returns the entries that event
    completes, in stream order: a non-regular entry or an empty file at its header
    block, a regular file of at most :data:`INLINE_MAX` bytes once its content has come
    (it may straddle events). A larger regular file is never returned here: its header
    is :attr:`TarSplitter.header` when its :class:`FileStart` comes, and its entry is
    ``entry_from_header(header, ExternalChunk(digest, size))`` once its object is stored.

    Works with every splitter mode: an event lists the entries whose main header block
    it carries (:attr:`Inline.headers`), the splitter's :attr:`~TarSplitter.offset`
    after the event is the stream offset of the event's end, and a header's content
    starts right after its main header block. A coalesced event may complete many
    entries; a plain one completes at most one.

    The splitter must keep files of at most :data:`INLINE_MAX` bytes inline (its
    default), as every splitstream does.

    Memory: one small file's content (at most 64 bytes) carried between events.

    Raises (from :meth:`inline`):
        TarError: see :func:`entry_from_header`.
    """

    __slots__ = ("_content", "_header", "_splitter")

    def __init__(self, splitter: TarSplitter) -> None:
        if splitter.inline_max != INLINE_MAX:
            raise ValueError(f"the splitter keeps {splitter.inline_max} bytes inline, not 64")
        self._splitter = splitter
        self._header: TarHeader | None = None  # an inline entry whose content is being collected
        self._content = bytearray()

    @property
    def collecting(self) -> TarHeader | None:
        """The header of the small file whose content is being collected, if any."""
        return self._header

    def inline(self, event: Inline) -> list[TarEntry]:
        """The entries the :class:`Inline` ``event`` completes (often none)."""
        return [entry_from_header(*done) for done in self.inline_parts(event)]

    def inline_parts(self, event: Inline) -> list[tuple[TarHeader, bytes]]:
        """As :meth:`inline`, but each entry's header and content, not yet resolved.

        ``entry_from_header(header, content)`` makes the entry (and raises its errors)
        later, or in another thread; this call parses nothing and raises nothing.
        """
        data = event.data
        out: list[tuple[TarHeader, bytes]] = []
        header = self._header
        if header is not None:  # a small file's content continues here
            collected = self._content
            collected += data[: header.size - len(collected)]
            if len(collected) < header.size:
                return out
            out.append((header, bytes(collected)))
            self._header = None
        if not event.headers:
            return out
        start = self._splitter.offset - len(data)  # stream offset of data[0]
        for header in event.headers:
            size = header.size
            if size == 0:
                out.append((header, b""))
            elif size <= INLINE_MAX or not header.is_regular:
                at = header.offset + BLOCK - start
                content = data[at : at + size]
                if len(content) == size:
                    out.append((header, content))
                else:  # the rest comes with the next events
                    self._header, self._content = header, bytearray(content)
            # else: a large file, whose FileStart comes next
        return out


class EntryReader:
    """Sans-IO reader of a layer's tar entries from its splitstream chunks (h11 style).

    Feed chunks in stream order with :meth:`receive_chunk`, signal the end of input with
    :meth:`receive_eof`, and call :meth:`next_entry` until it returns :data:`NEED_DATA`
    (feed more) or :data:`END` (done; asked again, it returns :data:`END` again).

    The chunks are the tar stream with each regular file larger than 64 bytes
    (:data:`INLINE_MAX`) replaced by one :class:`ExternalChunk` of the file's size; inline
    chunks may be cut anywhere (headers may straddle chunks, empty chunks are ignored).
    The same :class:`TarSplitter` that produced the chunks runs over the inline bytes, and
    each external chunk must stand exactly where the splitter announces a large file's
    content (:meth:`TarSplitter.skip_external_content`). Bytes after the end-of-archive
    marker are accepted and ignored, as the splitter keeps them inline.

    Errors are sticky: once any method raised a :class:`TarError`, every later call
    raises the same error.

    Memory: the chunks received but not yet read, the splitter's bound (one header plus
    its extension data, 1 MiB), and one small file's content (at most 64 bytes).
    """

    def __init__(self) -> None:
        self._splitter = TarSplitter(inline_max=INLINE_MAX, coalesce=True)
        self._pending: collections.deque[Chunk] = collections.deque()
        self._ready: collections.deque[TarEntry] = collections.deque()  # made, not handed out
        self._eof = False  # receive_eof() was called
        self._splitter_eof = False  # ... and the splitter was told
        self._entries = SplitterEntries(self._splitter)
        self._awaiting: FileStart | None = None  # a large file whose external chunk is due
        self._error: TarError | None = None

    @property
    def offset(self) -> int:
        """Bytes of the tar stream read so far (external chunks count with their size)."""
        return self._splitter.offset

    def receive_chunk(self, chunk: Chunk) -> None:
        """Add the next chunk of the stream (nothing is parsed until :meth:`next_entry`).

        Raises:
            DataAfterEndError: :meth:`receive_eof` was called already.
            TarError: an earlier call raised it (sticky).
        """
        if self._error is not None:
            raise self._error
        if self._eof:
            raise DataAfterEndError("EntryReader.receive_chunk() after the end of input")
        if isinstance(chunk, ExternalChunk):
            self._pending.append(chunk)
        elif chunk.data:
            if self._pending or self._awaiting is not None:
                self._pending.append(chunk)  # in order, after what is queued
            else:
                # Nothing is queued ahead of it: the splitter may buffer it now.
                self._splitter.receive_data(chunk.data)

    def receive_eof(self) -> None:
        """Signal that no more chunks will come.

        Raises:
            DataAfterEndError: it was called already.
            TarError: an earlier call raised it (sticky).
        """
        if self._error is not None:
            raise self._error
        if self._eof:
            raise DataAfterEndError("EntryReader.receive_eof() after the end of input")
        self._eof = True

    def next_entry(self) -> TarEntry | Sentinel:
        """The next entry, :data:`NEED_DATA` or :data:`END`.

        Raises:
            TarError: the reconstructed tar stream is malformed or truncated, or the
                chunks do not fit it (an external chunk where inline bytes belong, a size
                mismatch, a missing external chunk at the end). Once raised, every later
                call raises the same error.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except TarError as error:
            self._error = error
            raise

    def _next(self) -> TarEntry | Sentinel:
        if self._ready:
            return self._ready.popleft()
        splitter = self._splitter
        while True:
            if self._awaiting is None:
                result = self._drain()
                if result is not NEED_DATA:
                    return result
            if self._pending:
                chunk = self._pending.popleft()
                if isinstance(chunk, ExternalChunk):
                    return self._external(chunk)
                if self._awaiting is not None:
                    raise TarError(
                        "inline bytes where an external chunk belongs",
                        entry=self._awaiting.path,
                        offset=self._awaiting.offset,
                    )
                splitter.receive_data(chunk.data)
            elif not self._eof:
                return NEED_DATA
            elif self._awaiting is not None:
                raise TarError(
                    "missing external chunk at the end of the stream",
                    entry=self._awaiting.path,
                    offset=self._awaiting.offset,
                )
            elif self._splitter_eof:  # pragma: no cover - the splitter ends or raises first
                raise InternalError("EntryReader: the tar splitter wants data after its end")
            else:
                splitter.receive_data(b"")
                self._splitter_eof = True

    def _external(self, chunk: ExternalChunk) -> TarEntry:
        """The large file whose content ``chunk`` is, checked against the stream."""
        splitter = self._splitter
        awaiting = self._awaiting
        if awaiting is None:
            raise TarError(
                f"unexpected external chunk of {chunk.size} bytes",
                entry=self._entries.collecting.path if self._entries.collecting else None,
                offset=splitter.offset,
            )
        if chunk.size != awaiting.size:
            raise TarError(
                f"external chunk of {chunk.size} bytes for a file of {awaiting.size}",
                entry=awaiting.path,
                offset=awaiting.offset,
            )
        splitter.skip_external_content()
        self._awaiting = None
        assert splitter.header is not None
        return entry_from_header(splitter.header, chunk)

    def _drain(self) -> TarEntry | Sentinel:
        """Splitter events up to the next entry; :data:`NEED_DATA` also when a large
        file's external chunk is due."""
        splitter = self._splitter
        while True:
            event = splitter.next_event()
            if event is NEED_DATA or event is END:
                return event
            if isinstance(event, FileStart):
                if splitter.buffered:
                    raise TarError(
                        "inline bytes where an external chunk belongs",
                        entry=event.path,
                        offset=event.offset,
                    )
                # Its content comes as the next chunk, external.
                self._awaiting = event
                return NEED_DATA
            if isinstance(event, FileData | FileEnd):  # pragma: no cover - we stop at FileStart
                raise InternalError("EntryReader: file content events after FileStart")
            entries = self._entries.inline(event)
            if entries:
                if len(entries) == 1:
                    return entries[0]
                self._ready.extend(entries[1:])
                return entries[0]


def iter_entries(chunks: Iterable[Chunk]) -> Iterator[TarEntry]:
    """The entries of a layer, from its splitstream chunks, in archive order.

    A driver over :class:`EntryReader`: inline chunks may be split anywhere (headers
    may straddle chunks); each external chunk must stand for the whole content of a
    regular file larger than 64 bytes, and nothing else.

    Raises:
        TarError: the reconstructed tar stream is malformed, or the chunks do not fit
            it (an external chunk where inline bytes belong, a size mismatch, ...).
    """
    reader = EntryReader()
    for chunk in chunks:
        reader.receive_chunk(chunk)
        while isinstance(entry := reader.next_entry(), TarEntry):
            yield entry
    reader.receive_eof()
    while isinstance(entry := reader.next_entry(), TarEntry):
        yield entry
