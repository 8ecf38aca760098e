"""The entries of a layer, handed out while the layer is imported (the entry tap).

A pull builds the image's tree from every layer's entries. Rather than read each layer's
splitstream back once it is stored, it can ask :meth:`Importer.import_layer` for the
entries as the import makes them: the reader sees every tar header once already (the
:class:`~trio_composefs.formats.TarSplitter`'s :attr:`header`), and
:class:`~trio_composefs.formats.SplitterEntries` says which splitter events complete an
entry, exactly as :class:`~trio_composefs.formats.EntryReader` does over the finished
splitstream. A regular file over 64 bytes completes its entry when its object is stored
(the builder resolves objects in stream order), with ``ExternalChunk(digest, size)`` as
its content. So the entries, one for one and in order, equal ``iter_entries`` over the
layer's splitstream.

The import hands them out in :class:`EntryRun` s: each entry's header and content, the
entry resolved (:func:`~trio_composefs.formats.entry_from_header`: ~25 µs of Python each)
only when the sink asks, on whichever thread it likes. The import's trio thread, the
busiest of a pull, then spends only the bookkeeping; the tap can never fail an import.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from ..formats._chunks import ExternalChunk
from ..formats._fsverity import Digest
from ..formats._tarentries import SplitterEntries, TarEntry, entry_from_header
from ..formats._tarheader import TarHeader
from ..formats._tarsplit import Inline, TarSplitter

__all__ = ["EntryRun", "EntrySink"]

EntryParts = tuple[TarHeader, bytes | ExternalChunk]
"""An entry's resolved tar header and its content (inline bytes or its external chunk)."""


@attrs.frozen
class EntryRun:
    """Consecutive entries of one layer, in archive order, resolved on demand.

    ``len(run)`` is the number of entries; :meth:`entries` makes them (pure Python, no
    I/O: call it in any thread).
    """

    parts: list[EntryParts]

    def __len__(self) -> int:
        return len(self.parts)

    def entries(self) -> list[TarEntry]:
        """The entries, equal to those ``iter_entries`` gives for this stretch of the layer.

        Raises:
            TarError: an entry no tree can be built from (an entry type composefs does not
                hold, a ``..`` path, ...): the same error reading the stored layer back
                raises.
        """
        return [entry_from_header(header, content) for header, content in self.parts]


class EntrySink(Protocol):
    """Receives a layer's entries while :meth:`Importer.import_layer` imports it."""

    async def add_entries(self, run: EntryRun) -> None:
        """The next entries of the layer (called from the import's builder task, in
        archive order).

        Awaiting here holds up the layer's import (backpressure: the splitstream builder
        waits, then the reader); an exception fails the import. The entries are
        complete once ``import_layer`` returns normally; if it raises or is cancelled,
        the layer is not stored and what came is worth nothing. A layer that is skipped
        (its stream exists) sends nothing.
        """


@attrs.define(eq=False)
class EntryTap:
    """The importer's side of one layer's tap: entry parts in stream order, sent in runs."""

    sink: EntrySink
    _splitter: TarSplitter
    _entries: SplitterEntries
    _run: list[EntryParts] = attrs.field(factory=list)

    @classmethod
    def watching(cls, sink: EntrySink, splitter: TarSplitter) -> EntryTap:
        return cls(sink, splitter, SplitterEntries(splitter))

    def inline(self, event: Inline) -> list[tuple[TarHeader, bytes]]:
        """The entries an :class:`Inline` event of the splitter completes (reader side)."""
        return self._entries.inline_parts(event)

    def large_header(self) -> TarHeader | None:
        """At a :class:`FileStart`: the header of the large file, kept with its object."""
        return self._splitter.header

    # --- builder side: in stream order ------------------------------------------------
    def add(self, parts: EntryParts) -> None:
        self._run.append(parts)

    def add_external(self, header: TarHeader, digest: Digest, size: int) -> None:
        self._run.append((header, ExternalChunk(digest, size)))

    async def flush(self) -> None:
        """Hand the entries completed so far to the sink."""
        if self._run:
            run, self._run = self._run, []
            await self.sink.add_entries(EntryRun(run))
