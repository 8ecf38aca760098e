"""The trio shell that imports one tar layer: a reader, object writers and the builder.

Data flows one way. The reader task pulls bytes from the source, hashes them
(sha256, for the diff_id check) and feeds the sans-IO :class:`TarSplitter`.
Inline bytes go to the :class:`SplitStreamBuilder` in stream order. Each file
over 64 bytes becomes an object job:

* files of at most :data:`SMALL_OBJECT_MAX` bytes are gathered in memory and
  stored in batches (up to 32 files or 4 MiB), one thread hop per batch;
* a bigger one streams through a :class:`~trio_composefs.importer._handoff.Handoff` of a
  few :data:`~trio_composefs.importer._bytesource.READ_SIZE` pieces to one thread that
  writes it, taking the pieces without a trip through the event loop and checking for
  cancellation between them.

Every job first takes a token, on its own behalf, from the import's shared
:class:`trio.CapacityLimiter`; the reader waits for that token before it reads
on, which is the backpressure that bounds memory. A job gives its token back as
soon as its bytes are in temporary files; its digests (in the hash processes) and
links follow while the next job writes, at most
:data:`~trio_composefs.importer._reader.FINISHING_JOBS` such jobs per layer.
Readers and the builder use their own limiters, so writers holding every token can
never starve the reader that feeds them.

A gzip or zstd layer of an image arrives through
:func:`~trio_composefs.importer._decompress.open_verified_stream`, whose worker thread
reads the blob, decompresses it (ISA-L for gzip) and computes the tar's sha256 ahead
of the reader; the reader then does not hash the tar again.

After the tar ends, the sha256 is compared with the diff_id, the builder stores
the splitstream, one ``syncfs`` makes everything durable and only then is
``streams/oci-layer-<diff_id>`` published.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import attrs
import trio

from .._errors import (
    DigestMismatchError,
    FormatError,
    InternalError,
    InvalidDiffIdError,
    InvalidDigestError,
)
from ..formats._fsverity import Digest
from ..formats._sha256id import Sha256Id
from ..formats._splitstream import ContentType, SplitStreamEncoder
from ..hashing._pool import HashPool
from ..repository._repository import check_ref_name
from ._builder import Item, SplitStreamBuilder
from ._bytesource import ByteSource
from ._entries import EntryRun, EntrySink, EntryTap
from ._reader import (
    BATCH_OBJECTS,
    SMALL_OBJECT_MAX,
    STORE_BATCH_OBJECTS,
    Counters,
    LayerReader,
    new_splitter,
)
from ._writers import (
    RepositoryLike,
    digester_for,
    many_digester_for,
    many_storer_for,
    store_splitstream_with,
    sync_then_publish,
)

__all__ = [
    "SMALL_OBJECT_MAX",
    "EntryRun",
    "EntrySink",
    "Importer",
    "LayerProgress",
    "LayerStats",
    "default_jobs",
    "import_layer",
    "layer_content_id",
    "open_importer",
    "RepositoryLike",
]


_BUILDER_CHANNEL_ITEMS = 8
"""Messages queued for the builder; each is a list of at most 64 items, about 1 MiB inline."""


def default_jobs() -> int:
    """The default number of concurrent object writers (or batches): one per CPU but one.

    The writers' Python work shares one GIL with the reader: on the 2-core
    machine of benchmarks/README.md, two writers imported 40,000 small files in
    9.7 s where one took 6.7 s, and four were slower still. The fs-verity
    hashing, where the parallelism pays, runs in worker processes whatever
    this number is.
    """
    return max(1, (os.cpu_count() or 2) - 1)


def layer_content_id(diff_id: str) -> str:
    """The stream name of a layer: ``oci-layer-<diff_id>``."""
    return f"oci-layer-{diff_id}"


def _parse_diff_id(diff_id: str) -> bytes:
    try:
        return Sha256Id.parse(diff_id).digest_bytes()
    except InvalidDigestError:
        raise InvalidDiffIdError(
            f"not a layer diff_id: {diff_id!r} (expected sha256: and 64 lowercase hex digits)"
        ) from None


@attrs.frozen
class LayerStats:
    """What importing one layer did."""

    diff_id: str
    splitstream: Digest
    skipped: bool = False
    """The layer's stream already existed; nothing was read."""
    tar_bytes: int = 0
    objects: int = 0
    """External objects referenced by the layer (files over 64 bytes)."""
    objects_written: int = 0
    objects_deduplicated: int = 0
    object_bytes: int = 0
    inline_bytes: int = 0


@attrs.frozen
class LayerProgress:
    """A snapshot of one layer import, handed to the ``progress`` callback."""

    diff_id: str
    bytes_read: int
    objects_written: int
    objects_deduplicated: int
    objects_in_flight: int
    done: bool = False


@attrs.define(eq=False)
class Importer:
    """Imports layers into one repository, sharing a limiter and a hash pool.

    Make one with :func:`open_importer`. Every layer imported through it, from
    as many tasks as you like, shares :attr:`limiter` (the object writers) and
    :attr:`hash_pool` (the processes that compute fs-verity digests in
    userspace when the kernel cannot).

    It also owns what concurrent pulls through it share: :attr:`metadata_limiter`
    (the worker threads for small blocking repository calls: stream lookups,
    config and manifest streams, image builds), and the layers being imported now,
    so that a layer two pulls need is imported once (see :meth:`claim_layer`).
    Nothing of it is process-global: two ``trio.run`` calls, or two importers, on
    one repository are independent (content addressing keeps them correct).
    """

    repo: RepositoryLike
    limiter: trio.CapacityLimiter
    hash_pool: HashPool | None = None
    metadata_limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(8), kw_only=True
    )
    _in_flight: dict[str, trio.Event] = attrs.field(factory=dict, init=False, repr=False)

    def in_flight(self, content_id: str) -> trio.Event | None:
        """The event set when the import of stream ``content_id`` through this importer ends."""
        return self._in_flight.get(content_id)

    @contextmanager
    def claim_layer(self, content_id: str) -> Iterator[None]:
        """Mark ``content_id`` as being imported for the duration of the block.

        Other tasks see it through :meth:`in_flight` and wait for the event, then
        look for the stream again (it is absent if this import failed).
        """
        if content_id in self._in_flight:
            raise RuntimeError(f"{content_id} is already being imported")
        event = self._in_flight[content_id] = trio.Event()
        try:
            yield
        finally:
            del self._in_flight[content_id]
            event.set()

    async def import_layer(
        self,
        source: ByteSource,
        diff_id: str,
        *,
        name: str | None = None,
        progress: Callable[[LayerProgress], object] | None = None,
        force: bool = False,
        entries: EntrySink | None = None,
    ) -> LayerStats:
        """Split a tar layer into the repository and publish ``streams/oci-layer-<diff_id>``.

        Args:
            source: the uncompressed tar (see :data:`ByteSource`).
            diff_id: ``sha256:<hex>`` of the tar; checked against the bytes
                read before anything is published.
            name: also publish ``streams/refs/<name>``.
            progress: called on the trio thread with a :class:`LayerProgress`
                about every 64 MiB read and once at the end.
            force: import even when the stream's name exists (a pull passes it for a
                stream it found damaged: the import repairs it).
            entries: also hand the layer's entries to this sink while importing, in
                archive order, equal to ``iter_entries`` over the stored splitstream
                (see :class:`~trio_composefs.importer.EntrySink`; a pull builds the
                image's tree from them instead of reading the layer back). Nothing is
                sent for a skipped layer.

        Returns:
            The splitstream's digest and what was stored. A layer whose stream
            already exists is not read again (``skipped=True``).

        Raises:
            ExceptionGroup: errors from the reader, the writers or the builder
                (:class:`TarError`, :class:`DigestMismatchError`, ``OSError``
                such as ENOSPC, ...), all of them, as raised in the layer's
                nursery; nothing is published then.

        **Cancellation:** safe at any point. Objects already linked stay (they
        are complete and correctly named; gc removes them if unused); no
        stream name is published unless the import completes.
        """
        expected = _parse_diff_id(diff_id)
        if name is not None:
            check_ref_name(name)  # before any work, not after it
        content_id = layer_content_id(diff_id)
        repo = self.repo
        own = trio.CapacityLimiter(1)  # the reader's and builder's hops
        existing = None
        if not force:
            existing = await trio.to_thread.run_sync(repo.has_stream, content_id, limiter=own)
        if existing is not None:
            if name is not None:
                await trio.to_thread.run_sync(
                    repo.publish_stream, content_id, existing, name, limiter=own
                )
            return LayerStats(diff_id=diff_id, splitstream=existing, skipped=True)
        await trio.to_thread.run_sync(repo.ensure_writable, limiter=own)

        digester = digester_for(repo, self.hash_pool)
        store_many = await trio.to_thread.run_sync(
            many_storer_for, repo, self.hash_pool, limiter=own
        )
        encoder = SplitStreamEncoder(repo.algorithm, ContentType.OCI_LAYER)
        splitter = new_splitter()
        tap = EntryTap.watching(entries, splitter) if entries is not None else None
        builder = SplitStreamBuilder(
            encoder=encoder,
            store=store_splitstream_with(repo, digester),
            spool_dir=repo.path,
            limiter=trio.CapacityLimiter(1),
            tap=tap,
        )
        counters = Counters()
        sha = hashlib.sha256()

        def report(done: bool = False) -> None:
            if progress is not None:
                progress(
                    LayerProgress(
                        diff_id=diff_id,
                        bytes_read=counters.bytes_read,
                        objects_written=counters.written,
                        objects_deduplicated=counters.deduplicated,
                        objects_in_flight=counters.in_flight,
                        done=done,
                    )
                )

        try:
            send_item, receive_item = trio.open_memory_channel[list[Item]](_BUILDER_CHANNEL_ITEMS)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(builder.run, receive_item)
                async with send_item:
                    reader = LayerReader(
                        repo,
                        self.limiter,
                        nursery,
                        send_item,
                        digester,
                        counters,
                        report,
                        many_digester=many_digester_for(repo, self.hash_pool),
                        tap=tap,
                        splitter=splitter,
                        store_many=store_many,
                        batch_objects=BATCH_OBJECTS if store_many is None else STORE_BATCH_OBJECTS,
                    )
                    # A decompressing stream hashes its output in its own thread.
                    own_sha = getattr(source, "sha256_of_output", None)
                    await reader.run(source, sha.update if own_sha is None else None, own)
                    actual = sha.digest() if own_sha is None else own_sha()
                    if actual != expected:
                        raise DigestMismatchError(
                            f"layer {diff_id}: the tar's sha256 is sha256:{actual.hex()},"
                            f" not the diff_id; nothing was published"
                        )
            digest = builder.digest
            if digest is None:  # pragma: no cover - run() returned normally
                raise InternalError("splitstream builder finished without a digest")
            await trio.to_thread.run_sync(
                sync_then_publish, repo, content_id, digest, name, limiter=own
            )
        except BaseException as exc:
            _name_the_layer(exc, diff_id, getattr(repo, "path", None))
            raise
        report(done=True)
        return LayerStats(
            diff_id=diff_id,
            splitstream=digest,
            tar_bytes=counters.bytes_read,
            objects=counters.objects,
            objects_written=counters.written,
            objects_deduplicated=counters.deduplicated,
            object_bytes=counters.object_bytes,
            inline_bytes=builder.inline_bytes,
        )


def _name_the_layer(exc: BaseException, diff_id: str, repo_path: str | None) -> None:
    """Add a note naming the layer and repository to the I/O and format errors in ``exc``.

    ``OSError`` (a full disk: ``ENOSPC``) and :class:`FormatError` (a bad tar) do not
    otherwise say which import failed; the CLI prints notes after the message. The
    exception types are kept, so callers still catch what they caught.
    """
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            _name_the_layer(inner, diff_id, repo_path)
        return
    if not isinstance(exc, OSError | FormatError):
        return
    note = f"layer {diff_id}" + (f", repository {repo_path}" if repo_path else "")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        note += "; nothing was published, and `gc` removes the objects already written"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


@asynccontextmanager
async def open_importer(
    repo: RepositoryLike,
    *,
    jobs: int | None = None,
    limiter: trio.CapacityLimiter | None = None,
    hash_processes: int | None = None,
) -> AsyncIterator[Importer]:
    """An :class:`Importer` for ``repo``, with its limiter and hash pool.

    Args:
        jobs: object writers running at once (default :func:`default_jobs`).
        limiter: share an existing limiter instead (``jobs`` is then ignored).
        hash_processes: worker processes computing digests in userspace
            (default: one per CPU; 0 hashes in the writer threads). Not
            started when the kernel measures fs-verity itself.
    """
    if limiter is None:
        limiter = trio.CapacityLimiter(jobs if jobs is not None else default_jobs())
    if repo.verity_supported or hash_processes == 0:
        yield Importer(repo, limiter, None)
        return
    pool = HashPool(workers=hash_processes)
    try:
        yield Importer(repo, limiter, pool)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pool.close)


async def import_layer(
    repo: RepositoryLike,
    source: ByteSource,
    diff_id: str,
    *,
    name: str | None = None,
    limiter: trio.CapacityLimiter | None = None,
    progress: Callable[[LayerProgress], object] | None = None,
    entries: EntrySink | None = None,
) -> LayerStats:
    """Import one tar layer; see :meth:`Importer.import_layer`.

    Starts and stops its own hash pool; to import many layers, use one
    :func:`open_importer` for all of them instead.
    """
    async with open_importer(repo, limiter=limiter) as importer:
        return await importer.import_layer(
            source, diff_id, name=name, progress=progress, entries=entries
        )
