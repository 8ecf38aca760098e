"""Read a layer's tar entries back from its splitstream chunks.

The chunk sequence is the tar stream with each large regular file replaced by an
:class:`~trio_composefs.formats.ExternalChunk`. :func:`iter_entries` runs the same
splitter that produced the chunks over the inline bytes and checks that every external
chunk sits exactly where a large file's content was. Metadata is resolved as
composefs-rs does (``composefs-rs-notes.md`` §4.3).
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Iterable, Iterator

import attrs

from .._errors import TarError
from ._chunks import Chunk, ExternalChunk, InlineChunk
from ._tarheader import TarHeader
from ._tarsplit import END, INLINE_MAX, NEED_DATA, FileData, FileEnd, FileStart, TarSplitter

__all__ = ["EntryType", "TarEntry", "iter_entries", "makedev", "normalize_path"]


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


def _entry_from_header(header: TarHeader, content: bytes | ExternalChunk) -> TarEntry:
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


def iter_entries(chunks: Iterable[Chunk]) -> Iterator[TarEntry]:
    """The entries of a layer, from its splitstream chunks, in archive order.

    Inline chunks may be split anywhere (headers may straddle chunks). Each external
    chunk must stand for the whole content of a regular file larger than 64 bytes,
    and nothing else.

    Raises:
        TarError: the reconstructed tar stream is malformed, or the chunks do not fit
            it (an external chunk where inline bytes belong, a size mismatch, ...).
    """
    splitter = TarSplitter(inline_max=INLINE_MAX)
    seen = 0  # entries handed out by the splitter so far
    header: TarHeader | None = None  # an inline entry whose content is being collected
    content = bytearray()
    awaiting: FileStart | None = None  # a large file whose external chunk is due
    for chunk in _with_end(chunks):
        if isinstance(chunk, ExternalChunk):
            if awaiting is None:
                raise TarError(
                    f"unexpected external chunk of {chunk.size} bytes",
                    entry=header.path if header else None,
                    offset=splitter.offset,
                )
            if chunk.size != awaiting.size:
                raise TarError(
                    f"external chunk of {chunk.size} bytes for a file of {awaiting.size}",
                    entry=awaiting.path,
                    offset=awaiting.offset,
                )
            splitter._skip_file_content()
            assert splitter.header is not None
            yield _entry_from_header(splitter.header, chunk)
            awaiting = None
            continue
        if chunk is None:
            if awaiting is not None:
                raise TarError(
                    "missing external chunk at the end of the stream",
                    entry=awaiting.path,
                    offset=awaiting.offset,
                )
            splitter.receive_data(b"")
        elif isinstance(chunk, InlineChunk):
            if not chunk.data:
                continue
            splitter.receive_data(chunk.data)
        while True:
            event = splitter.next_event()
            if event is NEED_DATA or event is END:
                break
            if isinstance(event, FileStart):
                awaiting = event
                if splitter.buffered:
                    raise TarError(
                        "inline bytes where an external chunk belongs",
                        entry=event.path,
                        offset=event.offset,
                    )
                # The next event would be its content: wait for the external chunk.
                break
            if isinstance(event, FileData | FileEnd):
                raise TarError(
                    "inline bytes where an external chunk belongs",
                    entry=awaiting.path if awaiting else None,
                    offset=awaiting.offset if awaiting else splitter.offset,
                )
            if splitter.entries != seen:
                seen = splitter.entries
                current = splitter.header
                assert current is not None
                if current.is_regular and current.size > INLINE_MAX:
                    continue  # FileStart comes next
                header, content = current, bytearray()
                if current.size == 0:
                    header = None
                    yield _entry_from_header(current, b"")
                continue
            if header is not None:
                want = header.size - len(content)
                content += event.data[:want]
                if len(content) == header.size:
                    done, header = header, None
                    yield _entry_from_header(done, bytes(content))


def _with_end(chunks: Iterable[Chunk]) -> Iterator[Chunk | None]:
    yield from chunks
    yield None
