"""Random access to the members of an uncompressed tar file, without unpacking it.

:func:`index_tar` reads the headers once (skipping over contents with seeks)
and remembers where each regular member's bytes lie; :class:`TarArchive` then
serves them by ``pread`` from trio, one thread hop per chunk of at most
:data:`CHUNK` bytes, so memory stays bounded however large a member is.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import AsyncIterator, Mapping
from typing import Final

import attrs
import trio

from ..._errors import FormatError, TarError
from ...formats._tarheader import (
    BLOCK,
    MAX_EXTENSION_BYTES,
    ZERO_BLOCK,
    TarHeader,
    dialect_of,
    is_extension,
    parse_number,
    parse_pax_records,
    roundup,
    verify_checksum,
)
from .._model import ImageSourceError

__all__ = [
    "CHUNK",
    "MAX_MEMBERS",
    "MemberStream",
    "TarArchive",
    "TarMember",
    "index_tar",
    "normalize",
]

#: The most bytes one thread hop reads.
CHUNK: Final = 1 << 20

_MAX_LINKS = 16


@attrs.frozen
class TarMember:
    """Where a regular member's bytes lie in the tar file (or which member it links to)."""

    name: str
    offset: int
    size: int
    link: str | None = None
    """For hard and symbolic links: the normalized name of the target."""


def normalize(name: str) -> str:
    """A member name without ``./``, leading or trailing slashes."""
    return posixpath.normpath("/" + name).lstrip("/")


#: The most members an image archive may hold (skopeo writes a few per layer).
MAX_MEMBERS: Final = 65536


@attrs.define
class _Pending:
    """Extension data (L, K, x) read ahead of the next main header."""

    pax: dict[bytes, bytes] | None = None
    long_name: bytes | None = None
    long_link: bytes | None = None
    ext_bytes: int = 0


def _pread_exact(fd: int, n: int, offset: int, what: str, *, where: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise FormatError(f"{where}: truncated archive: end of file inside {what} at byte {offset}")
    return data


def _extension(fd: int, block: bytes, offset: int, pending: _Pending, *, where: str) -> int:
    """Read one L/K/x/g extension into ``pending``; return the offset after it.

    The same limit as layer import: at most :data:`MAX_EXTENSION_BYTES` of extension
    data per entry, checked on the header's size field before a byte of it is read.
    """
    kind = chr(block[156])
    size = parse_number(block[124:136], "size", offset=offset)
    already = 0 if kind == "g" else pending.ext_bytes
    if size > MAX_EXTENSION_BYTES - already:
        raise TarError(
            f"extension header {kind!r} too large ({size} bytes; limit is"
            f" {MAX_EXTENSION_BYTES} per entry)",
            offset=offset,
        )
    content = _pread_exact(fd, size, offset + BLOCK, f"extension header {kind!r}", where=where)
    if kind == "L":
        pending.long_name = content.split(b"\x00", 1)[0]
    elif kind == "K":
        pending.long_link = content.split(b"\x00", 1)[0]
    else:
        records = parse_pax_records(content, offset=offset)
        if any(key.startswith(b"GNU.sparse.") for key in records):
            raise TarError("sparse entries are not supported", offset=offset)
        if kind == "x":
            pending.pax = records
    if kind != "g":
        pending.ext_bytes += size
    return offset + BLOCK + roundup(size)


def index_tar(fd: int, *, where: str) -> dict[str, TarMember]:
    """Scan a tar file's headers (blocking); map each normalized member name to its place.

    Reads only the 512-byte headers and their extension data (bounded as in layer
    import by :data:`~trio_composefs.formats._tarheader.MAX_EXTENSION_BYTES`) with
    the library's own header code, seeking over contents; at most
    :data:`MAX_MEMBERS` members. Memory is bounded whatever the file holds.

    Raises:
        FormatError: not a tar file, a truncated or hostile one (``where`` names it).
    """
    members: dict[str, TarMember] = {}
    size = os.fstat(fd).st_size
    offset = 0
    pending = _Pending()
    count = 0
    try:
        while True:
            if offset >= size and pending.ext_bytes == 0 and pending.pax is None:
                break  # end of file without the zero blocks: accepted, as tar does
            block = _pread_exact(fd, BLOCK, offset, "a header block", where=where)
            if block == ZERO_BLOCK:
                break
            verify_checksum(block, offset=offset)
            if is_extension(block[156], dialect_of(block)):
                offset = _extension(fd, block, offset, pending, where=where)
                continue
            header = TarHeader.from_block(
                block,
                offset=offset,
                pax=pending.pax or {},
                long_name=pending.long_name,
                long_link=pending.long_link,
            )
            pending = _Pending()
            count += 1
            if count > MAX_MEMBERS:
                raise FormatError(f"{where}: more than {MAX_MEMBERS} members; not an image archive")
            name = normalize(header.path)
            data_offset = offset + BLOCK
            typeflag = header.typeflag
            if header.is_regular:
                if data_offset + header.size > size:
                    raise FormatError(
                        f"{where}: member {header.path!r} is truncated"
                        f" ({header.size} bytes at offset {data_offset}, file has {size})"
                    )
                members[name] = TarMember(name, data_offset, header.size)
            elif typeflag == b"1":
                members[name] = TarMember(name, 0, 0, normalize(header.linkname()))
            elif typeflag == b"2":
                target = posixpath.join(posixpath.dirname(name), header.linkname())
                members[name] = TarMember(name, 0, 0, normalize(target))
            offset = data_offset + roundup(header.size)
    except TarError as exc:
        raise FormatError(f"{where}: not a readable tar archive ({exc})") from None
    return members


@attrs.define(eq=False)
class TarArchive:
    """An open tar file and the index of its members; reads are thread hops."""

    path: str
    fd: int
    members: Mapping[str, TarMember]

    @classmethod
    async def open(cls, path: str) -> TarArchive:
        """Open and index ``path`` (one thread hop).

        Raises:
            ImageSourceError: the file cannot be opened.
            FormatError: it is not an uncompressed tar archive.
        """

        def work() -> TarArchive:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise ImageSourceError(f"cannot open {path}: {exc.strerror}") from None
            try:
                # O_NONBLOCK: a FIFO (or device) opens at once instead of blocking the
                # thread forever; only a regular file is read.
                mode = os.fstat(fd).st_mode
                if stat.S_ISDIR(mode):
                    raise ImageSourceError(f"cannot read {path}: Is a directory")
                if not stat.S_ISREG(mode):
                    raise ImageSourceError(f"{path} is not a regular file; refusing to read it")
                os.set_blocking(fd, True)
                magic = os.pread(fd, 4, 0)
                if magic[:2] == b"\x1f\x8b" or magic == b"\x28\xb5\x2f\xfd":
                    raise FormatError(f"{path}: a compressed archive; decompress it first")
                return cls(path, fd, index_tar(fd, where=path))
            except OSError as exc:
                os.close(fd)
                raise ImageSourceError(f"cannot read {path}: {exc.strerror}") from None
            except BaseException:
                os.close(fd)
                raise

        return await trio.to_thread.run_sync(work)

    def close(self) -> None:
        """Close the file (synchronous, so it works in a cancelled context)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup(self, name: str) -> TarMember | None:
        """The regular member called ``name``, following links; ``None`` if absent."""
        member = self.members.get(normalize(name))
        for _ in range(_MAX_LINKS):
            if member is None or member.link is None:
                return member
            member = self.members.get(member.link)
        raise FormatError(f"{self.path}: too many levels of links at member {name!r}")

    def get(self, name: str) -> TarMember:
        """Like :meth:`lookup`, but a missing member is an :class:`ImageSourceError`."""
        member = self.lookup(name)
        if member is None:
            raise ImageSourceError(f"{self.path}: no member {name!r} in the archive")
        return member

    def pread(self, member: TarMember, pos: int, n: int) -> bytes:
        """``n`` bytes of ``member`` from ``pos`` (blocking: call it in a thread)."""
        if self.fd < 0:
            raise ImageSourceError(f"{self.path}: read after the archive was closed")
        data = os.pread(self.fd, n, member.offset + pos)
        if len(data) != n:
            raise FormatError(f"{self.path}: member {member.name!r} is truncated")
        return data

    async def read(self, member: TarMember) -> bytes:
        """A member's bytes, whole (one thread hop)."""
        return await trio.to_thread.run_sync(self.pread, member, 0, member.size)

    async def read_head(self, member: TarMember, n: int) -> bytes:
        """The first ``n`` bytes of a member (fewer if it is shorter)."""
        return await trio.to_thread.run_sync(self.pread, member, 0, min(n, member.size))

    def stream(self, member: TarMember) -> MemberStream:
        """An async iterator over a member's bytes in chunks of at most :data:`CHUNK`."""
        return MemberStream(self, member)


@attrs.define(eq=False)
class MemberStream:
    """Async iterator over one member's bytes (a class, not an async generator,
    so an iteration abandoned half way needs no finalizer)."""

    archive: TarArchive
    member: TarMember
    pos: int = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        remaining = self.member.size - self.pos
        if remaining <= 0:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        n = min(CHUNK, remaining)
        data = await trio.to_thread.run_sync(self.archive.pread, self.member, self.pos, n)
        self.pos += n
        return data
