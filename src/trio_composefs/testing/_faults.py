"""Fault injection for tests: ours, and those of applications that embed trio-composefs.

Wrap a :class:`~trio_composefs.repository.Repository` in a
:class:`FaultyRepository` and hand the wrapper to the import API in its place.
It behaves exactly like the repository, except where you ask it to fail, slow
down or stop:

>>> faulty = FaultyRepository(repo)
>>> faulty.fail("write", nth=3, errno=errno.ENOSPC)  # the 3rd object written hits a full disk
>>> gate = faulty.pause("sync")                        # stop just before syncfs

Points, in the order an import meets them:

``begin``
    an object's temporary file is created (:meth:`Repository.begin_object`).
``write``
    data is written into an object (``after_bytes`` selects how far in).
``finish``
    an object is digested and linked into ``objects/`` (link time).
``sync``
    the ``syncfs`` that precedes publication of a stream.
``publish``
    after the sync, just before a stream name is linked.

``nth`` counts the occurrences of a point from 1, across every thread (the
N-th object to be begun, written or finished; the N-th sync). The object
holding the splitstream counts as an object too: it is the last one of a
layer.

Two more points are not calls on the repository but stages of the pipeline;
they are armed for the imports started afterwards from the task that arms
them (a context variable, which trio hands to the tasks and threads it
starts, and pytest-trio from a fixture to its test):

``hash`` (:meth:`FaultyRepository.kill_hash_worker`)
    a job sent to a hash worker process: ``nth`` counts jobs (one per file of
    32 KiB to 1 MiB hashed whole by a worker; a larger file is split into one
    job per worker). The chosen worker reads half its range and dies by
    SIGKILL. Files hashed in the calling thread (under 32 KiB, or under 1 MiB
    when nothing else is hashing) are not jobs. Where the hash processes store
    small objects themselves (an insecure repository without kernel fs-verity, and
    no fault at ``begin``, ``write`` or ``finish``), a batch of them is one job:
    the worker dies after writing half of it, before naming any. Arming it makes the wrapper
    report ``verity_supported = False``, so digests are computed by the pool
    (the kernel still checks them where it can).
``decompress`` (:meth:`FaultyRepository.fail_decompression`)
    a compressed (gzip or zstd) layer being decompressed: ``nth`` counts those
    blobs as their decompression starts (``compression=`` counts only that
    kind); the decompressor raises its own error (``zlib.error``,
    ``zstandard.ZstdError``) after ``after_bytes`` decompressed bytes.

A paused thread blocks until the test calls :meth:`Gate.release`; meanwhile
the test can cancel the import at that exact point. Release every gate you
paused at, or the worker thread (and the import waiting for it) stays blocked.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
import time
import zlib
from typing import Any, Literal

import attrs
import trio
import zstandard

from ..formats._fsverity import Algorithm, Digest
from ..hashing import _pool
from ..importer import _decompress

__all__ = ["FaultPoint", "FaultyRepository", "Gate", "open_fds"]

FaultPoint = Literal["begin", "write", "finish", "sync", "publish", "hash", "decompress"]
_POINTS = ("begin", "write", "finish", "sync", "publish")
_STAGES = ("hash", "decompress")
_OBJECT_POINTS = ("begin", "write", "finish")
"""Points met only on the per-object path (see :meth:`FaultyRepository.helper_store_target`)."""


@attrs.define(eq=False)
class Gate:
    """A point where one worker thread (or task) stops until the test lets it go."""

    point: str
    nth: int | None
    after_bytes: int = 0
    _reached: threading.Event = attrs.field(factory=threading.Event, init=False)
    _proceed: threading.Event = attrs.field(factory=threading.Event, init=False)
    _claimed: bool = attrs.field(default=False, init=False)

    @property
    def is_reached(self) -> bool:
        return self._reached.is_set()

    async def wait_reached(self) -> None:
        """Return once a worker thread is stopped at this gate (polls every 5 ms)."""
        # A worker thread sets a threading.Event; polling it is the portable way to wait.
        while not self._reached.is_set():  # noqa: ASYNC110
            await trio.sleep(0.005)

    def release(self) -> None:
        """Let the stopped worker (and any later one) continue."""
        self._proceed.set()

    def _stop_here(self) -> None:
        self._reached.set()
        self._proceed.wait()

    async def stop_here_async(self) -> None:
        """Stop the calling task here until released (cancellable: it then raises Cancelled)."""
        self._reached.set()
        while not self._proceed.is_set():  # noqa: ASYNC110 - released from any thread
            await trio.sleep(0.005)


@attrs.define(eq=False)
class _Fault:
    point: FaultPoint
    nth: int | None
    errno: int
    after_bytes: int = 0
    fired: bool = False


@attrs.define(eq=False)
class FaultyRepository:
    """A repository that fails, slows down or pauses where a test asks it to.

    Args:
        repo: the real repository; everything not listed above passes through.
        write_delay: seconds to sleep in every object write (a slow disk).
    """

    repo: Any
    write_delay: float = 0.0
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _counts: dict[str, int] = attrs.field(
        factory=lambda: dict.fromkeys(_POINTS + _STAGES, 0), init=False
    )
    _faults: list[_Fault] = attrs.field(factory=list, init=False)
    _gates: list[Gate] = attrs.field(factory=list, init=False)
    _hash_armed: bool = attrs.field(default=False, init=False)
    _decompress_faults: list[_DecompressFault] = attrs.field(factory=list, init=False)

    # --- arranging faults ---------------------------------------------------
    def fail(
        self,
        point: FaultPoint,
        *,
        nth: int | None = 1,
        errno: int = errno_mod.EIO,
        after_bytes: int = 0,
    ) -> FaultyRepository:
        """Raise ``OSError(errno)`` at the ``nth`` occurrence of ``point``.

        ``nth=None`` means the first occurrence that qualifies; with
        ``after_bytes`` (``write`` only) a write qualifies once its object has
        received that many bytes.
        """
        if point not in _POINTS:
            raise ValueError(f"unknown fault point {point!r}; expected one of {_POINTS}")
        self._faults.append(_Fault(point, nth, errno, after_bytes))
        return self

    def pause(self, point: FaultPoint, *, nth: int | None = 1, after_bytes: int = 0) -> Gate:
        """Stop the worker thread at the ``nth`` occurrence of ``point`` (see :meth:`fail`)."""
        if point not in _POINTS:
            raise ValueError(f"unknown fault point {point!r}; expected one of {_POINTS}")
        gate = Gate(point, nth, after_bytes)
        self._gates.append(gate)
        return gate

    def kill_hash_worker(self, *, nth: int | None = 1) -> FaultyRepository:
        """Make the hash worker given the ``nth`` job die mid-file (SIGKILL).

        The import then fails with a :class:`~trio_composefs.ComposefsError`
        naming the worker; the pool never hangs on it, replaces the worker,
        and the next import works. Arms the ``hash`` point for imports started
        afterwards from this task (see the module's documentation).
        """
        self._faults.append(_Fault("hash", nth, 0))
        self._hash_armed = True
        _pool.JOB_FAULT.set(self._hash_job)
        return self

    def fail_decompression(
        self,
        *,
        nth: int | None = 1,
        after_bytes: int = 0,
        compression: Literal["gzip", "zstd"] | None = None,
    ) -> FaultyRepository:
        """Make the decompressor of the ``nth`` compressed layer fail after ``after_bytes``.

        It raises the library's own error, which the import reports as a
        :class:`~trio_composefs.FormatError` ("cannot decompress") naming the
        layer, after checking that the blob's bytes match their digest; nothing
        is published. Arms the ``decompress`` point for imports started
        afterwards from this task.
        """
        self._decompress_faults.append(_DecompressFault(nth, after_bytes, compression))
        _decompress.DECOMPRESS_FAULT.set(self._wrap_decompressor)
        return self

    def _hash_job(self) -> bool:
        with self._lock:
            self._counts["hash"] += 1
            nth = self._counts["hash"]
            due = [
                f
                for f in self._faults
                if f.point == "hash" and f.nth in (None, nth) and not f.fired
            ]
            for f in due:
                f.fired = True
        return bool(due)

    def _wrap_decompressor(self, reader: Any, compression: str, where: str) -> Any:
        with self._lock:
            self._counts["decompress"] += 1
            nth = self._counts["decompress"]
            if not any(f.compression in (None, compression) for f in self._decompress_faults):
                return reader
            due = [
                f
                for f in self._decompress_faults
                if not f.fired
                and f.compression in (None, compression)
                and f.nth in (None, nth if f.compression is None else f.seen + 1)
            ]
            for f in self._decompress_faults:
                if f.compression == compression:
                    f.seen += 1
            if not due:
                return reader
            fault = due[0]
            fault.fired = True
        return _FailingDecompressor(reader, compression, fault.after_bytes, nth)

    def count(self, point: FaultPoint) -> int:
        """How many times ``point`` was reached so far."""
        with self._lock:
            return self._counts[point]

    # --- what the pipeline sees ---------------------------------------------
    def _arrive(self, point: FaultPoint, *, nth: int | None = None, offset: int = 0) -> None:
        """Count an arrival (unless ``nth`` is given) and fire what is due."""
        with self._lock:
            if nth is None:
                self._counts[point] += 1
                nth = self._counts[point]
            due = [
                f
                for f in self._faults
                if f.point == point
                and f.nth in (None, nth)
                and not f.fired
                and offset >= f.after_bytes
            ]
            for f in due:
                f.fired = True
            gates = [
                g
                for g in self._gates
                if g.point == point
                and g.nth in (None, nth)
                and not g._claimed
                and offset >= g.after_bytes
            ]
            for g in gates:
                g._claimed = True
        for g in gates:
            g._stop_here()
        for f in due:
            raise OSError(f.errno, f"{os.strerror(f.errno)} (injected at {point} #{nth})")

    @property
    def path(self) -> str:
        return str(self.repo.path)

    @property
    def algorithm(self) -> Algorithm:
        alg: Algorithm = self.repo.algorithm
        return alg

    @property
    def verity_supported(self) -> bool:
        if self._hash_armed:
            return False  # digests go through the hash pool, where the fault is
        return bool(self.repo.verity_supported)

    def ensure_writable(self) -> None:
        self.repo.ensure_writable()

    def has_stream(self, content_id: str) -> Digest | None:
        found: Digest | None = self.repo.has_stream(content_id)
        return found

    def begin_object(self) -> _FaultyTmpfile:
        self._arrive("begin")
        with self._lock:
            self._counts["write"] += 1
            index = self._counts["write"]
        return _FaultyTmpfile(self, self.repo.begin_object(), index)

    def helper_store_target(self) -> tuple[int, bool] | None:
        """The repository's, unless a fault, gate or delay is armed at an object point.

        Batches of small objects may be stored by the hash processes
        (:meth:`Repository.helper_store_target`), where the ``begin``, ``write`` and
        ``finish`` points are not met: with any of those armed (or a
        ``write_delay``), objects take the per-object path, through this wrapper.
        """
        with self._lock:
            points = [f.point for f in self._faults] + [g.point for g in self._gates]
            per_object = self.write_delay > 0 or any(p in _OBJECT_POINTS for p in points)
        if per_object:
            return None
        target: tuple[int, bool] | None = self.repo.helper_store_target()
        return target

    def sync(self) -> None:
        self._arrive("sync")
        self.repo.sync()

    def publish_stream(
        self, content_id: str, digest: Digest, ref: str | None = None, *, sync: bool = True
    ) -> None:
        if sync:
            self.sync()
        self._arrive("publish")
        self.repo.publish_stream(content_id, digest, ref, sync=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.repo, name)


@attrs.define(eq=False)
class _DecompressFault:
    nth: int | None
    after_bytes: int
    compression: str | None
    seen: int = 0  # blobs of this compression seen so far (when compression is given)
    fired: bool = False


@attrs.define(eq=False)
class _FailingDecompressor:
    """A decompressing reader that raises its library's error after ``after_bytes``."""

    inner: Any
    compression: str
    after_bytes: int
    nth: int
    out: int = 0

    def read(self, size: int = -1, /) -> bytes:
        if self.out >= self.after_bytes:
            message = (
                f"injected fault in the decompressor of compressed blob #{self.nth},"
                f" after {self.out} decompressed bytes"
            )
            if self.compression == "zstd":
                raise zstandard.ZstdError(message)
            raise zlib.error(message)
        want = self.after_bytes - self.out
        data: bytes = self.inner.read(want if size < 0 else min(size, want))
        self.out += len(data)
        return data


@attrs.define(eq=False)
class _FaultyTmpfile:
    owner: FaultyRepository
    inner: Any
    index: int  # this object's number at the "write" point

    @property
    def fd(self) -> int:
        return int(self.inner.fd)

    @property
    def size(self) -> int:
        return int(self.inner.size)

    def write(self, data: bytes | memoryview) -> None:
        self.owner._arrive("write", nth=self.index, offset=self.inner.size + len(data))
        if self.owner.write_delay:
            time.sleep(self.owner.write_delay)
        self.inner.write(data)

    def finish(self, digest: Digest | None = None) -> tuple[Digest, bool]:
        self.owner._arrive("finish")
        result: tuple[Digest, bool] = self.inner.finish(digest)
        return result

    def abort(self) -> None:
        self.inner.abort()

    def __enter__(self) -> _FaultyTmpfile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)


def open_fds() -> set[int]:
    """The file descriptors open in this process (to assert that none leaked)."""
    return {int(n) for n in os.listdir("/proc/self/fd")}
