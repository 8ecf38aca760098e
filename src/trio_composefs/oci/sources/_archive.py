"""What the two archive sources share: an open tar archive and reading blobs out of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs

from ..._errors import FormatError
from .._index import verify_blob
from .._model import Descriptor, ImageSourceError
from ._tarindex import TarArchive, TarMember


@attrs.define(eq=False)
class ArchiveSource:
    """Base of :class:`OciArchiveSource` and :class:`DockerArchiveSource`.

    Subclasses set :attr:`description` and say where a blob lives
    (:meth:`_find_member`); reading, size checks and streaming are here.
    """

    path: str
    description: str = attrs.field(init=False, default="")
    _archive: TarArchive | None = attrs.field(default=None, init=False)

    async def _open_archive(self) -> None:
        self._archive = await TarArchive.open(self.path)

    async def __aexit__(self, *exc: object) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    @property
    def archive(self) -> TarArchive:
        """The open archive (only inside ``async with``)."""
        if self._archive is None:
            raise ImageSourceError(f"{self.description}: used outside 'async with'")
        return self._archive

    def _find_member(self, descriptor: Descriptor) -> TarMember:
        raise NotImplementedError  # pragma: no cover

    def _member(self, descriptor: Descriptor) -> TarMember:
        member = self._find_member(descriptor)
        if member.size != descriptor.size:
            raise FormatError(
                f"{self.path}: member {member.name!r} has {member.size} bytes,"
                f" the descriptor says {descriptor.size}"
            )
        return member

    async def read_blob(self, descriptor: Descriptor, *, max_size: int = 64 << 20) -> bytes:
        """A small blob (the config), whole and checked against its digest."""
        if descriptor.size > max_size:
            raise ImageSourceError(
                f"{self.path}: blob {descriptor.digest} is {descriptor.size} bytes"
                f" (more than {max_size})"
            )
        member = self._member(descriptor)
        data = await self.archive.read(member)
        return verify_blob(data, descriptor, where=f"{self.path}: member {member.name!r}")

    @asynccontextmanager
    async def open_blob(self, descriptor: Descriptor) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a blob's stored bytes in chunks of at most 1 MiB (not checked here)."""
        yield self.archive.stream(self._member(descriptor))
