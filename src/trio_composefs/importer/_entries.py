"""The entries of a layer, handed out while the layer is imported (the entry tap).

A pull builds the image's tree from every layer's entries. Rather than read each layer's
splitstream back once it is stored, it can ask :meth:`Importer.import_layer` for the
entries as the import makes them: the reader sees every tar header once already (the
:class:`~trio_composefs.formats.TarSplitter`'s :attr:`header`), and
:class:`~trio_composefs.formats.SplitterEntries` says which splitter events complete an
entry, exactly as :class:`~trio_composefs.formats.EntryReader` does over the finished
splitstream. A regular file over 64 bytes becomes an entry when its object is stored
(the builder resolves objects in stream order), with
``ExternalChunk(digest, size)`` as its content: so the entries handed out are equal,
one for one and in order, to ``iter_entries`` over the layer's splitstream.

The tap never fails an import: an entry it cannot make (an entry type composefs does
not hold, a ``..`` path: what the image build would reject) ends the tap with
:meth:`EntrySink.entries_failed`, and the layer imports as without a tap.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from .._errors import TarError
from ..formats._chunks import ExternalChunk
from ..formats._fsverity import Digest
from ..formats._tarentries import SplitterEntries, TarEntry, entry_from_header
from ..formats._tarheader import TarHeader
from ..formats._tarsplit import TarSplitter

__all__ = ["EntrySink"]


class EntrySink(Protocol):
    """Receives a layer's entries while :meth:`Importer.import_layer` imports it.

    Both methods are called on the trio thread, from the import's tasks, and must
    return quickly without raising (an exception fails the import).
    """

    def add_entries(self, entries: list[TarEntry]) -> None:
        """The next entries of the layer, in archive order (the list is the sink's to keep).

        The entries are complete only once ``import_layer`` returns normally; if it
        raises or is cancelled, the layer is not stored and what came is worth nothing.
        A layer that is skipped (its stream exists) sends no entries.
        """

    def entries_failed(self, error: Exception) -> None:
        """No more entries will come for this layer (the import goes on).

        ``error`` is why (a :class:`~trio_composefs.TarError`: an entry that a tree
        cannot be built from); read the stored layer back to get the same error there.
        """


@attrs.define(eq=False)
class EntryTap:
    """The importer's side of one layer's tap: entries made in stream order, sent in runs."""

    sink: EntrySink
    _splitter: TarSplitter
    _entries: SplitterEntries
    broken: bool = False
    _run: list[TarEntry] = attrs.field(factory=list)

    @classmethod
    def watching(cls, sink: EntrySink, splitter: TarSplitter) -> EntryTap:
        return cls(sink, splitter, SplitterEntries(splitter))

    def inline(self, data: bytes) -> TarEntry | None:
        """The entry an :class:`Inline` event of the splitter completes (reader side)."""
        if self.broken:
            return None
        try:
            return self._entries.inline(data)
        except TarError as error:
            self.fail(error)
            return None

    def large_header(self) -> TarHeader | None:
        """At a :class:`FileStart`: the header of the large file, kept with its object."""
        return None if self.broken else self._splitter.header

    # --- builder side: in stream order ------------------------------------------------
    def add(self, entry: TarEntry) -> None:
        if not self.broken:
            self._run.append(entry)

    def add_external(self, header: TarHeader, digest: Digest, size: int) -> None:
        if self.broken:
            return
        try:
            self._run.append(entry_from_header(header, ExternalChunk(digest, size)))
        except TarError as error:
            self.fail(error)

    def flush(self) -> None:
        """Hand the entries made so far to the sink."""
        if self._run and not self.broken:
            run, self._run = self._run, []
            self.sink.add_entries(run)

    def fail(self, error: Exception) -> None:
        if not self.broken:
            self.broken = True
            self._run = []
            self.sink.entries_failed(error)
