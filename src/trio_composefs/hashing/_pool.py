"""fs-verity digests of open files, on every core.

CPython's hashlib gives the GIL back for each 4096-byte block, but the Python
loop around it keeps two threads well below two cores. :class:`HashPool`
therefore hashes large files in worker *processes*. A worker is never sent the
file's bytes: it receives the file descriptor itself over a Unix socket
(``SCM_RIGHTS``), reads its byte range with :func:`os.preadv` and returns only
the level-1 digests of that range (one per 128 data blocks for SHA-256, per
64 for SHA-512). The calling thread finishes the small top of the tree and the
descriptor.

Where each file is hashed (thresholds measured on 2 cores, see
benchmarks/README.md):

- below ``inline_below`` (32 KiB): in the calling thread, always; a round trip
  to a worker costs about as much as the hashing;
- below ``threshold`` (1 MiB, two level-1 groups): in the calling thread when
  it is the only caller, else whole in one worker (several threads hashing in
  one process contend for the GIL and together run *slower* than one);
- from ``threshold`` up: split into group-aligned ranges over all idle workers.

:meth:`HashPool.store_objects` goes further for small objects held in memory:
one worker writes a whole batch of them into a repository's ``objects/``,
hashes them and links them (:mod:`._objstore`), so the calling process makes a
handful of syscalls per batch instead of four or more per object, and its GIL is
free for the tar parser meanwhile. The batch travels in a memfd, its sizes in
the job message, the ``objects/`` fd with them (``SCM_RIGHTS``).

Workers are fresh interpreters running ``python -P -m trio_composefs.hashing._worker``,
started with :class:`subprocess.Popen` on first use: never by
forking the caller, which may be running trio and many threads, and never
through :mod:`multiprocessing`, which would re-import the user's ``__main__``
in them and keep helper processes alive. A worker inherits only its socket,
ignores SIGINT (the parent handles Ctrl-C and closes the pool) and exits when
the socket reaches EOF or, on Linux, when the parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import pickle
import queue
import select
import socket
import subprocess
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextvars import ContextVar

import attrs

from .._errors import ComposefsError
from ..formats._fsverity import (
    BLOCK_SIZE,
    Algorithm,
    Digest,
    digest_from_level1,
    level1_digests,
    level1_group_size,
)
from . import _worker
from ._fd import digest_fd
from ._worker import (
    DIE_MID_JOB,
    JOB,
    NAMED_TMPFILES,
    OK,
    REPLY_MAX,
    STORE_MAX_OBJECTS,
    STORE_OBJECTS,
    STORE_SIZE,
    WHOLE_FILE,
    pread_exactly,
)

__all__ = [
    "STORE_MAX_OBJECTS",
    "DEFAULT_INLINE_BELOW",
    "DEFAULT_THRESHOLD",
    "HashPool",
    "HashPoolStatistics",
    "digest_fd",
]

#: Files smaller than this are always hashed in the calling thread.
DEFAULT_INLINE_BELOW = 32 << 10
#: Files from this size up are split over several workers.
DEFAULT_THRESHOLD = 1 << 20

# Upper bound for one worker job; smaller jobs balance better between workers.
_MAX_JOB = 16 << 20

#: Fault-injection hook for tests (set by :mod:`trio_composefs.testing`): called in the
#: sending thread before each job goes to a worker; when it returns true, that worker
#: reads half its range and dies (SIGKILL). A context variable, so it reaches only the
#: calls made from the task that set it and the threads that task starts.
JOB_FAULT: ContextVar[Callable[[], bool] | None] = ContextVar(
    "trio_composefs_hash_job_fault", default=None
)


def _default_workers(workers: int | None) -> int:
    n = (os.cpu_count() or 1) if workers is None else workers
    if n < 1:
        raise ValueError(f"HashPool needs at least one worker, not {n}")
    return n


@attrs.frozen
class HashPoolStatistics:
    """A snapshot of what a :class:`HashPool` has done so far.

    Attributes:
        files_inline: files hashed in the calling thread.
        files_whole: files hashed whole by one worker.
        files_split: files split over workers.
        jobs: byte ranges sent to workers.
        bytes_hashed: bytes of every file digested, wherever.
        workers_replaced: workers that died or failed (each is replaced on next use).
        objects_stored: objects stored by the workers (:meth:`HashPool.store_objects`).
        workers: live worker processes now (started on first use).
        idle_workers: of those, the ones waiting for a job now.
        callers: calls of :meth:`HashPool.digest_fd`/:meth:`HashPool.digest_fds`
            in progress now (running or waiting for a worker).
        stopped_exit_codes: the exit codes of the workers :meth:`HashPool.close`
            stopped, in order (``0``: the worker read EOF and exited by itself;
            negative: killed by that signal).

    The last four are the state at the time of the snapshot, not counters: they
    take no part in ``==``.
    """

    files_inline: int
    files_whole: int
    files_split: int
    jobs: int
    bytes_hashed: int
    workers_replaced: int
    objects_stored: int = 0
    workers: int = attrs.field(default=0, eq=False)
    idle_workers: int = attrs.field(default=0, eq=False)
    callers: int = attrs.field(default=0, eq=False)
    stopped_exit_codes: tuple[int | None, ...] = attrs.field(default=(), eq=False)


@attrs.define(eq=False)
class _Worker:
    process: subprocess.Popen[bytes]
    sock: socket.socket
    pid: int
    exitcode: int | None = None  # set once stopped


def _split(size: int, algorithm: Algorithm, workers: int) -> list[tuple[int, int]]:
    """Cut ``size`` bytes into group-aligned ranges, about equal, a multiple of ``workers``."""
    group = level1_group_size(algorithm)
    groups = -(-size // group)
    jobs = max(workers, -(-size // _MAX_JOB))
    jobs = min(groups, -(-jobs // workers) * workers)
    per_job = -(-groups // jobs) * group
    return [(off, min(per_job, size - off)) for off in range(0, size, per_job)]


@attrs.define(eq=False)
class HashPool:
    """Worker processes that compute fs-verity digests of open files.

    Use as a context manager, or call :meth:`close`. :meth:`digest_fd` is
    blocking and thread-safe: call it from many threads at once (for example
    through ``trio.to_thread.run_sync``); each call borrows idle workers and
    returns them when its file is done. Workers start on first use.

    Args:
        workers: number of worker processes; default :func:`os.cpu_count`.
        threshold: files of at least this many bytes are split over several
            workers; smaller ones go whole to one worker, or are hashed in
            the calling thread when no other call is in progress.
        inline_below: files smaller than this are always hashed in the
            calling thread.
    """

    workers: int = attrs.field(default=None, converter=_default_workers)
    threshold: int = attrs.field(default=DEFAULT_THRESHOLD, kw_only=True)
    inline_below: int = attrs.field(default=DEFAULT_INLINE_BELOW, kw_only=True)
    _launcher: _Launcher = attrs.field(init=False, factory=lambda: _Launcher())
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    # Signalled when a worker becomes idle (wakes one caller), and when every
    # worker is idle (wakes close()).
    _free: threading.Condition = attrs.field(init=False)
    _drained: threading.Condition = attrs.field(init=False)
    _all: list[_Worker] = attrs.field(init=False, factory=list)
    _idle: list[_Worker] = attrs.field(init=False, factory=list)
    _active: int = attrs.field(init=False, default=0)
    _counts: dict[str, int] = attrs.field(init=False, factory=dict)
    _stopped: list[int | None] = attrs.field(init=False, factory=list)
    _closed: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        # A worker returns level-1 digests, which a one-block file does not have.
        self.inline_below = max(self.inline_below, BLOCK_SIZE + 1)
        self._free = threading.Condition(self._lock)
        self._drained = threading.Condition(self._lock)

    def __enter__(self) -> HashPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def has_workers(self) -> bool:
        """Whether worker processes are running (they start on first use). Lock-free."""
        return bool(self._all)

    def statistics(self) -> HashPoolStatistics:
        """Counters since the pool was made (see :class:`HashPoolStatistics`)."""
        with self._lock:
            counts = dict(self._counts)
            gauges = (len(self._all), len(self._idle), self._active, tuple(self._stopped))
        return HashPoolStatistics(
            files_inline=counts.get("files_inline", 0),
            files_whole=counts.get("files_whole", 0),
            files_split=counts.get("files_split", 0),
            jobs=counts.get("jobs", 0),
            bytes_hashed=counts.get("bytes_hashed", 0),
            workers_replaced=counts.get("workers_replaced", 0),
            objects_stored=counts.get("objects_stored", 0),
            workers=gauges[0],
            idle_workers=gauges[1],
            callers=gauges[2],
            stopped_exit_codes=gauges[3],
        )

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                self._counts[name] = self._counts.get(name, 0) + n

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (empty before first use and after close)."""
        with self._lock:
            return [w.pid for w in self._all]

    def digest_fd(self, fd: int, size: int, algorithm: Algorithm = Algorithm.SHA256) -> Digest:
        """fs-verity digest of the first ``size`` bytes of the readable ``fd``.

        Blocking and thread-safe. ``fd`` must stay open until this returns; its
        offset is not used or moved.

        Raises:
            RuntimeError: the pool is closed (also when it closes while this
                call waits for a worker).
            ComposefsError: the file has fewer than ``size`` bytes, or a worker died.
            OSError: ``fd`` cannot be read.
            ValueError: ``size`` is negative.

        Cancellation: none; from trio, run it with ``trio.to_thread.run_sync``
        and the default ``abandon_on_cancel=False``, so that ``fd`` stays open
        until the workers are done with it.
        """
        if self._closed:
            raise RuntimeError("HashPool is closed")
        if size < 0:
            raise ValueError(f"negative file size {size}")
        if size < self.inline_below:
            result = digest_fd(fd, size, algorithm)
            self._count(files_inline=1, bytes_hashed=size)
            return result
        with self._lock:
            self._active += 1
            alone = self._active == 1
        try:
            if size < self.threshold:
                if alone:
                    result = digest_fd(fd, size, algorithm)
                    self._count(files_inline=1, bytes_hashed=size)
                    return result
                (raw,) = self._run_jobs(algorithm, [(fd, 0, size)], WHOLE_FILE)
                result = Digest(algorithm, raw)
                self._count(files_whole=1, jobs=1, bytes_hashed=size)
            else:
                ranges = _split(size, algorithm, self.workers)
                level1 = b"".join(self._run_jobs(algorithm, [(fd, off, n) for off, n in ranges], 0))
                result = digest_from_level1(algorithm, size, level1)
                self._count(files_split=1, jobs=len(ranges), bytes_hashed=size)
            return result
        finally:
            with self._lock:
                self._active -= 1

    def level1_fd(self, fd: int, size: int, algorithm: Algorithm = Algorithm.SHA256) -> bytes:
        """The level-1 digests of the first ``size`` bytes of ``fd``, concatenated.

        One digest per :func:`~trio_composefs.formats._fsverity.level1_group_size`
        bytes (512 KiB for SHA-256): what a reader needs to check any group of the
        file later by hashing that group alone; ``digest_from_level1`` turns them
        into the file's fs-verity digest. Split over the workers as
        :meth:`digest_fd` does (below ``threshold``, hashed in the calling thread).
        Blocking and thread-safe.

        Raises:
            ValueError: ``size`` is at most one block (such a file has no level 1).
            RuntimeError, ComposefsError, OSError: as :meth:`digest_fd`.
        """
        if self._closed:
            raise RuntimeError("HashPool is closed")
        if size <= BLOCK_SIZE:
            raise ValueError(f"a file of {size} bytes has no level-1 digests")
        if size < self.threshold:
            buf = memoryview(bytearray(size))
            pread_exactly(fd, buf, 0)
            self._count(files_inline=1, bytes_hashed=size)
            return level1_digests(buf, algorithm)
        with self._lock:
            self._active += 1
        try:
            ranges = _split(size, algorithm, self.workers)
            level1 = b"".join(self._run_jobs(algorithm, [(fd, off, n) for off, n in ranges], 0))
            self._count(files_split=1, jobs=len(ranges), bytes_hashed=size)
            return level1
        finally:
            with self._lock:
                self._active -= 1

    def digest_fds(
        self, files: Sequence[tuple[int, int]], algorithm: Algorithm = Algorithm.SHA256
    ) -> list[Digest]:
        """fs-verity digests of several open files ``(fd, size)`` at once, in order.

        Files of ``inline_below`` bytes and more go whole to every idle worker
        concurrently (big ones are split as by :meth:`digest_fd`), while the
        calling thread waits without the GIL: a batch of small objects is
        hashed on the other cores while this process's reader runs on its own.
        Blocking and thread-safe, like :meth:`digest_fd`.
        """
        if self._closed:
            raise RuntimeError("HashPool is closed")
        results: list[Digest | None] = [None] * len(files)
        whole: list[tuple[int, int, int]] = []
        where: list[int] = []
        for i, (fd, size) in enumerate(files):
            if size < 0:
                raise ValueError(f"negative file size {size}")
            if size < self.inline_below:
                results[i] = digest_fd(fd, size, algorithm)
                self._count(files_inline=1, bytes_hashed=size)
            elif size >= self.threshold:
                results[i] = self.digest_fd(fd, size, algorithm)
            else:
                whole.append((fd, 0, size))
                where.append(i)
        if whole:
            with self._lock:
                self._active += 1
            try:
                raws = self._run_jobs(algorithm, whole, WHOLE_FILE)
            finally:
                with self._lock:
                    self._active -= 1
            for i, raw, (_fd, _off, size) in zip(where, raws, whole, strict=True):
                results[i] = Digest(algorithm, raw)
                self._count(files_whole=1, jobs=1, bytes_hashed=size)
        return [r for r in results if r is not None]

    def store_objects(
        self,
        objects_fd: int,
        objects: Sequence[Sequence[bytes | memoryview]],
        algorithm: Algorithm = Algorithm.SHA256,
        *,
        named_tmpfiles: bool = False,
    ) -> list[tuple[Digest, bool]]:
        """Store small objects (each given as its pieces) in a repository's ``objects/``.

        One worker writes, hashes and links them all
        (:func:`~trio_composefs.hashing._objstore.store_objects`: every object is
        written before any is named; a name is always complete), so the calling
        thread makes a handful of syscalls for the whole batch: the bytes go to the
        worker in one memfd, the fd of ``objects_fd`` with them. At most
        :data:`STORE_MAX_OBJECTS` objects. Blocking and thread-safe.

        For repositories whose digests are computed in userspace (no kernel
        fs-verity): the worker links each object under the digest it computes.

        Returns:
            ``(digest, already_present)`` for each object, in order.

        Raises:
            RuntimeError: the pool is closed.
            ComposefsError: the worker died (the objects it had not named are
                discarded; those named are complete).
            OSError: the worker could not write or link an object (re-raised here).
            ValueError: too many objects.
        """
        if self._closed:
            raise RuntimeError("HashPool is closed")
        if len(objects) > STORE_MAX_OBJECTS:
            raise ValueError(f"{len(objects)} objects in one batch, at most {STORE_MAX_OBJECTS}")
        sizes = [sum(len(part) for part in parts) for parts in objects]
        total = sum(sizes)
        flags = STORE_OBJECTS | (NAMED_TMPFILES if named_tmpfiles else 0)
        fault = JOB_FAULT.get()
        if fault is not None and fault():
            flags |= DIE_MID_JOB
        msg = JOB.pack(len(objects), total, algorithm.kernel_id, flags) + b"".join(
            STORE_SIZE.pack(size) for size in sizes
        )
        memfd = os.memfd_create("trio-composefs-objects", os.MFD_CLOEXEC)
        try:
            _write_parts(memfd, [part for parts in objects for part in parts if len(part)])
            with self._lock:
                self._active += 1
            try:
                reply = self._run_one(msg, [objects_fd, memfd])
            finally:
                with self._lock:
                    self._active -= 1
        finally:
            os.close(memfd)
        width = algorithm.digest_size + 1
        if len(reply) != width * len(objects):
            raise ComposefsError(
                f"hash worker: {len(reply)} bytes of store results for {len(objects)} objects"
            )
        self._count(objects_stored=len(objects), bytes_hashed=total)
        return [
            (Digest(algorithm, reply[i : i + width - 1]), reply[i + width - 1] != 0)
            for i in range(0, len(reply), width)
        ]

    def _run_one(self, msg: bytes, fds: list[int]) -> bytes:
        """Send one job message with ``fds`` to an idle worker; the payload of its reply."""
        worker = self._acquire(block=True)
        assert worker is not None
        try:
            socket.send_fds(worker.sock, [msg], fds)
            reply = worker.sock.recv(REPLY_MAX)
        except OSError as exc:
            self._discard(worker)
            raise ComposefsError(
                f"hash worker {worker.pid} is gone ({exc}; exit code {worker.exitcode})"
            ) from None
        except BaseException:
            self._discard(worker)  # a reply may be in flight: it cannot be reused
            raise
        if not reply:
            self._discard(worker)
            raise ComposefsError(f"hash worker {worker.pid} died (exit code {worker.exitcode})")
        self._release(worker)
        if reply[:1] != OK:
            error = pickle.loads(reply[1:])
            assert isinstance(error, BaseException)
            raise error
        return reply[1:]

    def _run_jobs(
        self, algorithm: Algorithm, job_ranges: list[tuple[int, int, int]], flags: int
    ) -> list[bytes]:
        """Send each (fd, offset, length) range to a worker; their replies in order."""
        ranges = deque(enumerate(job_ranges))
        results: list[bytes] = [b""] * len(ranges)
        held: set[_Worker] = set()  # borrowed from the pool by this call
        busy: dict[socket.socket, tuple[_Worker, int]] = {}  # job in flight
        error: BaseException | None = None
        fault = JOB_FAULT.get()

        def dispatch(worker: _Worker) -> None:
            nonlocal error
            index, (fd, offset, length) = ranges.popleft()
            job_flags = flags | (DIE_MID_JOB if fault is not None and fault() else 0)
            try:
                socket.send_fds(
                    worker.sock, [JOB.pack(offset, length, algorithm.kernel_id, job_flags)], [fd]
                )
            except OSError as exc:
                held.discard(worker)
                self._discard(worker)
                error = ComposefsError(
                    f"hash worker {worker.pid} is gone ({exc}; exit code {worker.exitcode})"
                )
                return
            busy[worker.sock] = (worker, index)

        def give_back(worker: _Worker) -> None:
            held.discard(worker)
            self._release(worker)

        try:
            first = self._acquire(block=True)
            assert first is not None
            held.add(first)
            dispatch(first)
            while busy:
                while ranges and error is None:
                    extra = self._acquire(block=False)
                    if extra is None:
                        break
                    held.add(extra)
                    dispatch(extra)
                waiting = list(busy)
                if len(waiting) > 1:
                    waiting = _wait_readable(waiting)
                for ready in waiting:
                    worker, index = busy.pop(ready)
                    try:
                        reply = ready.recv(REPLY_MAX)
                    except OSError:
                        reply = b""
                    if not reply:
                        held.discard(worker)
                        self._discard(worker)
                        error = error or ComposefsError(
                            f"hash worker {worker.pid} died (exit code {worker.exitcode})"
                        )
                        continue
                    if reply[:1] == OK:
                        results[index] = reply[1:]
                    elif error is None:
                        error = pickle.loads(reply[1:])
                    if ranges and error is None:
                        dispatch(worker)
                    else:
                        give_back(worker)
        finally:
            # Only after an unexpected exception (say KeyboardInterrupt): a worker
            # may have a reply in flight, so none of them can be reused.
            for worker in held:
                self._discard(worker)
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        """Wait for calls in progress, then stop and join every worker. Idempotent."""
        with self._lock:
            self._closed = True
            self._free.notify_all()
            while len(self._idle) < len(self._all):
                self._drained.wait()
            workers = self._all[:]
            self._all.clear()
            self._idle.clear()
        for worker in workers:
            worker.sock.close()  # the worker reads EOF and exits
        for worker in workers:
            self._stop(worker)
            with self._lock:
                self._stopped.append(worker.exitcode)
        self._launcher.stop()

    # -- worker bookkeeping (all under self._lock) --

    def _acquire(self, *, block: bool) -> _Worker | None:
        with self._lock:
            while True:
                if self._closed:
                    if block:
                        raise RuntimeError("HashPool is closed")
                    return None
                # Start the workers on first use, and replace any that died. A
                # failure to start one reaches the caller instead of a hang.
                while len(self._all) < self.workers:
                    self._spawn()
                if self._idle:
                    return self._idle.pop()
                if not block:
                    return None
                self._free.wait()

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)
            self._free.notify()
            if len(self._idle) == len(self._all):
                self._drained.notify_all()

    def _spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = self._launcher.call(lambda: _start_worker(child.fileno()))
        except BaseException:
            parent.close()  # a worker started all the same reads EOF and exits
            raise
        finally:
            child.close()
        worker = _Worker(process, parent, process.pid)
        self._all.append(worker)
        self._idle.append(worker)

    def _discard(self, worker: _Worker) -> None:
        """Drop a worker that cannot be trusted any more (the next acquire replaces it)."""
        worker.sock.close()
        with self._lock:
            self._all.remove(worker)
            if not self._closed:
                self._counts["workers_replaced"] = self._counts.get("workers_replaced", 0) + 1
                self._free.notify()  # a waiting caller starts the replacement
            if len(self._idle) == len(self._all):
                self._drained.notify_all()
        self._stop(worker, timeout=0)

    @staticmethod
    def _stop(worker: _Worker, timeout: float = 5) -> None:
        """Reap ``worker``, whose socket is closed; kill it after ``timeout`` seconds."""
        try:
            worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        worker.exitcode = worker.process.returncode


_IOV_MAX = 1024


def _write_parts(fd: int, parts: list[bytes | memoryview]) -> None:
    """Write every part to ``fd`` in order, with as few ``writev`` calls as it takes."""
    while parts:
        head, parts = parts[:_IOV_MAX], parts[_IOV_MAX:]
        want = sum(len(p) for p in head)
        done = os.writev(fd, head)
        if done < want:  # a short write: finish this group part by part
            view = memoryview(b"".join(head))[done:]
            while view:
                view = view[os.write(fd, view) :]


def _wait_readable(socks: list[socket.socket]) -> list[socket.socket]:
    """Those of ``socks`` that can be read (or are closed), waiting for at least one."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    while True:
        ready = poller.poll()
        if ready:
            return [by_fd[fd] for fd, _events in ready]


class _Launcher:
    """The one thread that starts every worker of a pool.

    Linux sends a worker its parent-death signal when the *thread* that
    started it exits, and callers of :meth:`HashPool.digest_fd` are often
    short-lived threads (trio's thread cache retires idle ones), so no caller
    starts a worker itself. The thread starts on first use and is joined by
    :meth:`stop`.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None]
        self._requests = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        """``fn()``, run in the launcher thread. Not thread-safe (the pool's lock is held)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=_launcher_main,
                args=(self._requests,),
                name="trio-composefs-hash-launcher",
                daemon=True,  # a pool that is never closed must not block exit
            )
            self._thread.start()
            # Also end the thread if the pool is dropped without close().
            weakref.finalize(self, self._requests.put, None)
        future: Future[object] = Future()
        self._requests.put((fn, future))
        try:
            result = future.result()
        except BaseException:
            # Interrupted (or failed): reap whatever was started, in the background.
            future.add_done_callback(_kill_started)
            raise
        assert isinstance(result, subprocess.Popen)
        return result

    def stop(self) -> None:
        """End and join the thread, if it was started. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._requests.put(None)
            thread.join()


def _launcher_main(
    requests: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None],
) -> None:
    while (request := requests.get()) is not None:
        fn, future = request
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


def _kill_started(future: Future[object]) -> None:
    if not future.cancelled() and future.exception() is None:
        process = future.result()
        assert isinstance(process, subprocess.Popen)
        process.kill()
        process.wait()


#: The directory holding the ``trio_composefs`` package this pool was imported from.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start_worker(sock_fd: int) -> subprocess.Popen[bytes]:
    """Start one worker process serving the socket ``sock_fd`` (its only inherited fd)."""
    if not sys.executable:
        raise ComposefsError("cannot start hash workers: sys.executable is unknown")
    # The worker runs as a plain module: the package roots are lazy, so this imports the
    # worker, _errors and formats, but neither trio nor the pool (about 40 ms and 18 MB
    # instead of 150 ms and 30 MB). PYTHONPATH names the parent's very copy of the package.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [
            sys.executable,
            "-P",  # not the current directory on the worker's sys.path
            "-m",
            _worker.__name__,
            str(sock_fd),
            str(os.getpid()),
        ],
        env=env,
        pass_fds=(sock_fd,),
        close_fds=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # stderr stays: a crashing worker says why
    )
