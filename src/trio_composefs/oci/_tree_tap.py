"""A pull's image tree, built from the entries its layer imports hand out (the tree tap).

Without it, the pull imports every layer, then reads every layer's splitstream back
(zstd, the tar splitter again) to build the tree: on the real Debian image that was a
quarter of the pull, after the layers and alone. With it, each imported layer's entries
(:class:`~trio_composefs.importer.EntrySink`, equal to ``iter_entries`` over the stored
stream) are applied to one :class:`~trio_composefs.fs.TreeBuilder` while the layers
import, and the image build only transforms and writes.

Layers import concurrently, largest first, but apply in config order. The layer whose
turn it is (every earlier one applied) applies its entries as they come, in batches, in
a worker thread (:data:`APPLY_ON_TRIO_THREAD`); a later layer's entries wait in memory,
all such layers together at most :data:`BUFFER_ENTRIES` entries. A layer that would
pass that bound drops what it holds and is read back from the repository once stored
(today's path), as is a layer the pull found stored (skipped), a raw blob, and any layer
whose tap failed; the layer being applied cannot drop what it holds, and past that bound
its import waits for the applier instead. The tap never fails a pull: if anything goes
wrong in it (an entry the tree refuses, a layer that cannot be read back), it gives up
and the image build reads every layer back, raising there what it raised before.

Memory: the tree (as before), plus at most :data:`BUFFER_ENTRIES` waiting entries
(~1 KB each), plus the entries of the layer being applied that arrived while a worker
thread applied its earlier ones (at most as many again).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from ..formats._fsverity import Digest
from ..fs import TreeBuilder
from ..importer._entries import EntryRun
from ..importer._importer import LayerStats
from ..repository._repository import Repository
from ._image_tree import PartialTree, layer_entries

__all__ = ["BUFFER_ENTRIES", "ImageTreeTap"]

BUFFER_ENTRIES = 65_536
"""Entries of layers whose turn has not come, held in memory at most (all layers together).

A waiting entry (an :class:`~trio_composefs.importer.EntryRun`'s header, with its 512-byte
block, and content) costs ~980 bytes, measured with tracemalloc on 20,000 small files, so
this is ~62 MiB at worst; a layer beyond it is read back instead."""

APPLY_ON_TRIO_THREAD = False
"""Apply the entries of the layer whose turn it is on the trio thread as they come
(``True``), or hand them to a worker thread in batches (``False``, the default).

Measured (CPU of the trio thread, the pull's busiest; a 2-layer image of 20,000 small
files, medians of 6 interleaved runs on a loaded 2-core VM): 0.88 s without the tap,
1.33 s applying on the trio thread, 1.15 s in a worker thread. Making an entry costs
~25 µs of Python and applying it ~5 µs (6,753 entries of the Debian image); reading a
layer back cost 74 µs per entry. Under the GIL the worker's Python still competes, but
it runs while the trio thread waits on writers and the decompressor."""

APPLY_BATCH = 512
"""Entries the layer whose turn it is gathers before a worker thread applies them
(one thread hop per batch, not per run of ~64 entries)."""


@attrs.define(eq=False)
class _Layer:
    """One layer's sink (:class:`~trio_composefs.importer.EntrySink`) and its state."""

    tap: ImageTreeTap
    index: int
    diff_id: str
    buffer: list[EntryRun] = attrs.Factory(list)
    waiting: int = 0
    """Entries in :attr:`buffer`."""
    streaming: bool = False
    """Its turn has come: entries apply as they arrive, on the trio thread
    (:data:`APPLY_ON_TRIO_THREAD`)."""
    reread: bool = False
    """Its entries were dropped (or none came): read it back once stored."""
    finished: trio.Event = attrs.Factory(trio.Event)
    more: trio.Event = attrs.Factory(trio.Event)
    """Set when the applier has something to do for this layer."""
    taken: trio.Event = attrs.Factory(trio.Event)
    """Set when the applier took this layer's buffer (or the tap stopped)."""
    stream: Digest | None = None

    async def add_entries(self, run: EntryRun) -> None:
        tap = self.tap
        if self.reread or tap.failed:
            return
        if self.streaming:
            tap.apply_now(run, self.diff_id)
            return
        current = tap.current == self.index
        if not current and tap.buffered + len(run) > tap.cap:
            self.drop()
            return
        self.buffer.append(run)
        self.waiting += len(run)
        tap.buffered += len(run)
        if self.waiting >= APPLY_BATCH:
            self.more.set()
        # The layer being applied cannot drop what it holds (some of it is applied):
        # past the cap it waits for the applier (backpressure on its import).
        while current and self.waiting > tap.cap and not (tap.failed or self.reread):
            self.taken = trio.Event()
            self.more.set()
            await self.taken.wait()

    def take(self) -> list[EntryRun]:
        runs, self.buffer = self.buffer, []
        self.tap.buffered -= self.waiting
        self.waiting = 0
        self.taken.set()
        return runs

    def drop(self) -> None:
        self.reread = True
        self.take()


@attrs.define(eq=False)
class ImageTreeTap:
    """Builds a pull's tree from its layer imports; see the module doc.

    Usage: pass :meth:`sink` ``(i)`` to the import of layer ``i`` (config order), call
    :meth:`layer_done` when it returns, run :meth:`run` in the same nursery as the
    imports, and once they and :meth:`run` returned, take :meth:`result`.

    **Cancellation:** :meth:`run` may be cancelled anywhere; the tree is then unusable,
    which does not matter since the pull stops.
    """

    repo: Repository
    diff_ids: Sequence[str]
    cap: int = attrs.field(factory=lambda: BUFFER_ENTRIES)
    builder: TreeBuilder = attrs.Factory(TreeBuilder)
    layers: list[_Layer] = attrs.field(init=False)
    current: int = -1
    """The layer whose turn it is: every earlier one is applied (-1: :meth:`run` has not
    started)."""
    buffered: int = 0
    failed: bool = False
    applied: int = 0
    reread: int = attrs.field(default=0, init=False)
    """Layers read back from the repository (for tests and benchmarks)."""
    _limiter: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(1))

    def __attrs_post_init__(self) -> None:
        self.layers = [_Layer(self, i, d) for i, d in enumerate(self.diff_ids)]

    def sink(self, index: int) -> _Layer:
        """The entry sink of layer ``index`` (config order)."""
        return self.layers[index]

    def layer_done(self, index: int, stats: LayerStats, *, tapped: bool) -> None:
        """Layer ``index`` is stored: imported through :meth:`sink` (``tapped``: all its
        entries came), or not (skipped, a raw blob: it is read back)."""
        layer = self.layers[index]
        layer.stream = stats.splitstream
        if not tapped or stats.skipped:
            layer.drop()
        layer.finished.set()
        layer.more.set()

    def give_up(self) -> None:
        """Stop: the image build reads every layer back."""
        self.failed = True
        for layer in self.layers:
            layer.take()

    def apply_now(self, run: EntryRun, diff_id: str) -> None:
        try:
            self._apply([run], diff_id)
        except Exception:
            # An entry no tree holds (the image build reading the layer back says
            # which), or a bug here: the build reads every layer back.
            self.give_up()

    def result(self) -> PartialTree | None:
        """The tree of the layers applied, or ``None`` when the tap gave up."""
        if self.failed:
            return None
        return PartialTree(self.builder, self.applied)

    def _apply(self, runs: list[EntryRun], diff_id: str) -> None:
        add = self.builder.add_entry
        for run in runs:
            for entry in run.entries():
                add(entry, layer=diff_id)

    def _read_back(self, diff_id: str, stream: Digest) -> None:
        self.builder.add_layer(
            layer_entries(self.repo, stream, name=f"layer {diff_id}"), name=diff_id
        )

    async def run(self) -> None:
        """Apply the layers in config order as their entries come (a task of the pull)."""
        try:
            for layer in self.layers:
                self.current = layer.index
                await self._apply_layer(layer)
                if self.failed:
                    return
                self.applied = layer.index + 1
        except Exception:
            self.give_up()

    async def _apply_layer(self, layer: _Layer) -> None:
        while not self.failed:
            if layer.buffer and not layer.reread:
                await trio.to_thread.run_sync(
                    self._apply, layer.take(), layer.diff_id, limiter=self._limiter
                )
                continue
            if layer.finished.is_set():
                break
            if APPLY_ON_TRIO_THREAD and not layer.reread:
                layer.streaming = True
                await layer.finished.wait()
                layer.streaming = False
                continue
            layer.more = trio.Event()
            await layer.more.wait()
        if self.failed:
            return
        if layer.reread:
            assert layer.stream is not None
            self.reread += 1
            await trio.to_thread.run_sync(
                self._read_back, layer.diff_id, layer.stream, limiter=self._limiter
            )
