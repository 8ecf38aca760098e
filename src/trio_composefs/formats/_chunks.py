"""The two kinds of chunk a splitstream is made of, shared by its readers and writers."""

from __future__ import annotations

import attrs

from ._fsverity import Digest


@attrs.frozen
class InlineChunk:
    """Bytes kept inside the splitstream (tar headers, small files, padding)."""

    data: bytes


@attrs.frozen
class ExternalChunk:
    """A reference to an object in the repository, ``size`` bytes long."""

    digest: Digest
    size: int


Chunk = InlineChunk | ExternalChunk
