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

A paused thread blocks until the test calls :meth:`Gate.release`; meanwhile
the test can cancel the import at that exact point. Release every gate you
paused at, or the worker thread (and the import waiting for it) stays blocked.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
import time
from typing import Any, Literal

import attrs
import trio

from ..formats._fsverity import Algorithm, Digest

__all__ = ["FaultPoint", "FaultyRepository", "Gate", "open_fds"]

FaultPoint = Literal["begin", "write", "finish", "sync", "publish"]
_POINTS = ("begin", "write", "finish", "sync", "publish")


@attrs.define(eq=False)
class Gate:
    """A point where one worker thread stops until the test lets it go."""

    point: FaultPoint
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
    _counts: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(_POINTS, 0), init=False)
    _faults: list[_Fault] = attrs.field(factory=list, init=False)
    _gates: list[Gate] = attrs.field(factory=list, init=False)

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
