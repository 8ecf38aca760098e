"""Object jobs: what runs in a worker thread to store one object, and publication.

Each function here is one thread hop: it runs in a ``trio.to_thread`` worker
and talks to the repository through :class:`RepositoryLike`, so a test wrapper
(:mod:`trio_composefs.testing`) can stand in for the real repository.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
import trio

from .._errors import InternalError, VerityUnsupportedError
from ..formats._fsverity import Algorithm, Digest, fsverity_digest
from ..hashing._pool import DEFAULT_INLINE_BELOW, STORE_MAX_OBJECTS, HashPool, digest_fd
from ..repository._writing import StreamName, publish_after_sync
from ._builder import Digester


class ObjectTmpfileLike(Protocol):
    fd: int
    size: int

    def write(self, data: bytes | memoryview, /) -> None: ...
    def finish(self, digest: Digest | None = None) -> tuple[Digest, bool]: ...
    def abort(self) -> None: ...
    def __enter__(self) -> ObjectTmpfileLike: ...
    def __exit__(self, *exc: object) -> None: ...


class RepositoryLike(Protocol):
    """What the pipeline needs of a repository (a :class:`Repository`, or a test wrapper)."""

    @property
    def path(self) -> str: ...
    @property
    def algorithm(self) -> Algorithm: ...
    @property
    def verity_supported(self) -> bool: ...
    def ensure_writable(self) -> None: ...
    def begin_object(self) -> Any: ...
    def has_stream(self, content_id: str) -> Digest | None: ...
    def sync(self) -> None: ...
    def publish_stream(
        self, content_id: str, digest: Digest, ref: str | None = None, *, sync: bool = True
    ) -> None: ...


class NoLimit:
    """A limiter for ``to_thread`` when the job already holds a token of the real one."""

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await trio.lowlevel.checkpoint()

    def release_on_behalf_of(self, borrower: object) -> None:
        pass


NO_LIMIT: Any = NoLimit()


def digester_for(repo: RepositoryLike, hash_pool: HashPool | None) -> Digester | None:
    if repo.verity_supported:
        return None  # the kernel measures every object
    alg = repo.algorithm
    if hash_pool is not None:
        pool = hash_pool
        return lambda fd, size: pool.digest_fd(fd, size, alg)
    return lambda fd, size: digest_fd(fd, size, alg)


ManyDigester = Callable[[list[tuple[int, int]]], list[Digest]]
"""Computes several objects' digests at once from ``[(fd, size), ...]``."""


def many_digester_for(repo: RepositoryLike, hash_pool: HashPool | None) -> ManyDigester | None:
    """Hash a batch's files concurrently in the pool's processes (None: one at a time)."""
    if repo.verity_supported or hash_pool is None:
        return None
    pool, alg = hash_pool, repo.algorithm
    return lambda files: pool.digest_fds(files, alg)


STORE_ELSEWHERE_FROM = 64
"""A batch of at least this many objects is worth starting the hash processes for.

(Starting them costs ~0.1 s of CPU each; smaller batches go to the hash processes
only once they run, so that a layer of a few small files never starts them.)"""


class StoreMany(Protocol):
    """Stores several small objects (each given as its pieces) at once: ``(digest, present)``."""

    def worth_it(self, objects: int) -> bool:
        """Whether a batch of that many objects should be stored this way."""
        ...

    def __call__(self, objects: list[list[bytes | memoryview]], /) -> list[tuple[Digest, bool]]: ...


@attrs.frozen
class WorkerStore:
    """Small objects stored by the hash processes (:meth:`HashPool.store_objects`)."""

    pool: HashPool
    objects_fd: int
    named: bool
    algorithm: Algorithm

    def worth_it(self, objects: int) -> bool:
        return objects >= STORE_ELSEWHERE_FROM or self.pool.has_workers

    def __call__(self, objects: list[list[bytes | memoryview]], /) -> list[tuple[Digest, bool]]:
        return self.pool.store_objects(
            self.objects_fd, objects, self.algorithm, named_tmpfiles=self.named
        )


def many_storer_for(repo: RepositoryLike, hash_pool: HashPool | None) -> StoreMany | None:
    """Let the hash processes store whole batches of small objects themselves, or None.

    Only with a hash pool, and a repository that offers ``helper_store_target()``
    (a :class:`~trio_composefs.repository.Repository`; test wrappers that inject
    faults per object do not) and whose digests are computed in userspace.
    """
    if hash_pool is None or repo.verity_supported:
        return None
    target_of = getattr(repo, "helper_store_target", None)
    if target_of is None:
        return None
    try:
        target = target_of()
    except VerityUnsupportedError:
        return None  # the objects' own path says so, with the object at fault
    if target is None:
        return None
    objects_fd, named = target
    return WorkerStore(hash_pool, objects_fd, named, repo.algorithm)


HASH_FROM_MEMORY_BELOW = DEFAULT_INLINE_BELOW
"""Objects smaller than this are hashed from the bytes in memory, in the writer thread.

(The hash pool hashes those in the calling thread anyway: a round trip to a worker
costs as much as the hashing; reading the file back costs a syscall more.)"""


def _no_release() -> None:
    pass


def store_batch(
    repo: RepositoryLike,
    batch: list[tuple[list[bytes | memoryview], int]],
    digester: Digester | None,
    many: ManyDigester | None = None,
    release: Callable[[], None] = _no_release,
    store_many: StoreMany | None = None,
) -> list[tuple[Digest, bool]]:
    """Store several small objects, in order, in one thread hop.

    With ``store_many`` (:func:`many_storer_for`) and a batch it finds worth it
    (:data:`STORE_ELSEWHERE_FROM` objects, or hash processes already running), they store the
    objects themselves, :data:`~trio_composefs.hashing._pool.STORE_MAX_OBJECTS` at
    a time, every object of such a run written before any is named; ``release``
    is called once the sizes are checked (the bytes are then copied out by
    ``store_many``). Otherwise, in this thread:

    Every object of the batch is written to its own temporary file first; then
    ``release`` is called (the caller gives its writer token back, so that the next
    batch is written while this one waits for its digests); then the digests are
    computed (objects under :data:`HASH_FROM_MEMORY_BELOW` from their bytes in
    memory, the others with ``many`` together in the hash processes, else one at a
    time) and each object is linked. The bytes are dropped from ``batch`` once hashed.

    **Cancellation:** checked between objects (``trio.from_thread.check_cancelled``),
    so a slow disk delays a cancellation by one object's write, not a batch's.
    Every object not linked when it stops, by cancellation or error, is discarded
    (its temporary file was never visible); those linked are complete.
    """
    if store_many is not None and store_many.worth_it(len(batch)):
        return _store_batch_elsewhere(batch, release, store_many)
    tmps: list[ObjectTmpfileLike] = []
    try:
        for parts, size in batch:
            trio.from_thread.check_cancelled()
            tmp = repo.begin_object()
            tmps.append(tmp)
            for part in parts:
                tmp.write(part)
            if tmp.size != size:
                raise InternalError(f"object job got {tmp.size} bytes, expected {size}")
        release()
        digests: list[Digest | None] = [None] * len(tmps)
        if digester is not None:
            # Small objects are hashed from the bytes still in memory (no read back);
            # bigger ones from their files, together in the hash processes if there are any.
            algorithm = repo.algorithm
            big = []
            for i, (parts, size) in enumerate(batch):
                if size < HASH_FROM_MEMORY_BELOW:
                    data = parts[0] if len(parts) == 1 else b"".join(parts)
                    digests[i] = fsverity_digest(data, algorithm)
                else:
                    big.append(i)
                parts.clear()
            trio.from_thread.check_cancelled()
            if many is not None and len(big) > 1:
                for i, computed in zip(
                    big, many([(tmps[i].fd, tmps[i].size) for i in big]), strict=True
                ):
                    digests[i] = computed
            else:
                for i in big:
                    trio.from_thread.check_cancelled()
                    digests[i] = digester(tmps[i].fd, tmps[i].size)
        results: list[tuple[Digest, bool]] = []
        for tmp, digest in zip(tmps, digests, strict=True):
            trio.from_thread.check_cancelled()
            results.append(tmp.finish(digest))
        return results
    finally:
        for tmp in tmps:
            tmp.abort()  # idempotent: a no-op for those linked


def _store_batch_elsewhere(
    batch: list[tuple[list[bytes | memoryview], int]],
    release: Callable[[], None],
    store_many: StoreMany,
) -> list[tuple[Digest, bool]]:
    """:func:`store_batch` through ``store_many``: runs of at most STORE_MAX_OBJECTS."""
    for parts, size in batch:
        got = sum(len(part) for part in parts)
        if got != size:
            raise InternalError(f"object job got {got} bytes, expected {size}")
    trio.from_thread.check_cancelled()
    release()
    results: list[tuple[Digest, bool]] = []
    for start in range(0, len(batch), STORE_MAX_OBJECTS):
        trio.from_thread.check_cancelled()
        run = batch[start : start + STORE_MAX_OBJECTS]
        results += store_many([parts for parts, _size in run])
        for parts, _size in run:
            parts.clear()
    return results


def store_streamed(
    repo: RepositoryLike,
    next_piece: Callable[[], bytes | memoryview | None],
    size: int,
    digester: Digester | None,
    release: Callable[[], None] = _no_release,
) -> tuple[Digest, bool]:
    """Store one object from pieces taken with ``next_piece`` (None at the end), then digest
    and link it. ``next_piece`` is a :meth:`Handoff.get_blocking`: no trip through the
    event loop per piece.

    ``release`` is called once every byte is written, before the digest (as in
    :func:`store_batch`).
    """
    with repo.begin_object() as tmp:
        while True:
            trio.from_thread.check_cancelled()
            piece = next_piece()
            if piece is None:
                break
            tmp.write(piece)
        if tmp.size != size:
            raise InternalError(f"object job got {tmp.size} bytes, expected {size}")
        release()
        trio.from_thread.check_cancelled()
        digest = digester(tmp.fd, size) if digester is not None else None
        result: tuple[Digest, bool] = tmp.finish(digest)
        return result


def sync_then_publish(
    repo: RepositoryLike, content_id: str, digest: Digest, name: str | None
) -> None:
    """syncfs, then name the stream: a published name never points at data a crash could lose.

    A cancellation that arrives before the name is linked wins: nothing is
    published. Once linking has begun the import is complete.
    """
    publish_after_sync(
        repo,
        [StreamName(content_id, digest, name)],
        check_cancelled=trio.from_thread.check_cancelled,
    )


def store_splitstream_with(
    repo: RepositoryLike, digester: Digester | None
) -> Callable[[Callable[[Callable[[bytes], None]], None]], Digest]:
    def store(fill: Callable[[Callable[[bytes], None]], None]) -> Digest:
        with repo.begin_object() as tmp:
            fill(tmp.write)
            digest = digester(tmp.fd, tmp.size) if digester is not None else None
            stored: Digest = tmp.finish(digest)[0]
            return stored

    return store
