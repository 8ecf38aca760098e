"""Random access to the members of an uncompressed tar file, without unpacking it.

:func:`index_tar` reads the headers once (skipping over contents with seeks)
and remembers where each regular member's bytes lie; :class:`TarArchive` then
serves them by ``pread`` from trio, one thread hop per chunk of at most
:data:`CHUNK` bytes, so memory stays bounded however large a member is.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import AsyncIterator, Mapping
from typing import Final

import attrs
import trio

from ..._errors import FormatError
from .._model import ImageSourceError

__all__ = ["CHUNK", "MemberStream", "TarArchive", "TarMember", "index_tar", "normalize"]

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


def index_tar(fd: int, *, where: str) -> dict[str, TarMember]:
    """Scan a tar file's headers (blocking); map each normalized member name to its place.

    Raises:
        FormatError: not a tar file, or a truncated one (``where`` names it).
    """
    members: dict[str, TarMember] = {}
    size = os.fstat(fd).st_size
    with os.fdopen(os.dup(fd), "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    name = normalize(info.name)
                    if info.isreg() and not info.issparse():
                        if info.offset_data + info.size > size:
                            raise FormatError(
                                f"{where}: member {info.name!r} is truncated"
                                f" ({info.size} bytes at offset {info.offset_data},"
                                f" file has {size})"
                            )
                        members[name] = TarMember(name, info.offset_data, info.size)
                    elif info.islnk():
                        members[name] = TarMember(name, 0, 0, normalize(info.linkname))
                    elif info.issym():
                        target = posixpath.join(posixpath.dirname(name), info.linkname)
                        members[name] = TarMember(name, 0, 0, normalize(target))
        except tarfile.TarError as exc:
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
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise ImageSourceError(f"cannot open {path}: {exc.strerror}") from None
            try:
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
