"""A bounded queue between one trio task and one worker thread, without round trips.

``trio.from_thread.run(channel.send, item)`` costs a full round trip per item: the
thread waits until the event loop has run a task for it, so a worker that produces
faster than the loop gets round to it spends its time waiting on the loop (a profile
of a pull showed 70 % of the decompression thread's samples in that wait). A
:class:`Handoff` lets either side go on as long as the queue has room or items:

* the thread side blocks on a :class:`threading.Condition` only when the queue is full
  (putting) or empty (getting), and the trio side wakes it with ``notify`` (no trip
  through the loop);
* the trio side waits on a :class:`trio.Event` only when it must, and the thread wakes it
  with ``TrioToken.run_sync_soon`` (fire and forget: the thread does not wait for it).

Either side may put and the other get; one queue carries items one way.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

import trio

__all__ = ["Handoff", "HandoffClosed"]

T = TypeVar("T")


class HandoffClosed(Exception):
    """The trio side of a :class:`Handoff` went away (it was cancelled or failed).

    Raised in the worker thread, which should return: its caller is being cancelled.
    """


class Handoff(Generic[T]):
    """A FIFO of at most ``slots`` items between a trio task and a worker thread.

    Create it in trio (it records the current trio token). The producer ends the stream
    with :meth:`close` (trio side) or :meth:`close_blocking` (thread side), optionally with
    an error that the consumer raises after the last item. :meth:`abort` (trio side, in a
    ``finally``) wakes a blocked thread with :class:`HandoffClosed`.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a handoff needs at least one slot, not {slots}")
        self._slots = slots
        self._items: deque[T] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._token = trio.lowlevel.current_trio_token()
        self._waiter: trio.Event | None = None  # the trio side, waiting for a change
        self._ended = False
        self._error: BaseException | None = None
        self._aborted = False

    # ------------------------------------------------------------ shared, under the lock
    def _wake_trio(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._token.run_sync_soon(waiter.set)

    # ------------------------------------------------------------ thread side
    def put_blocking(self, item: T) -> None:
        """Append ``item``, waiting while the queue is full. Blocking; thread side."""
        with self._cond:
            while len(self._items) >= self._slots and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise HandoffClosed
            self._items.append(item)
            self._wake_trio()

    def get_blocking(self) -> T | None:
        """The next item, or ``None`` once the stream has ended. Blocking; thread side.

        Raises:
            HandoffClosed: the trio side aborted.
            BaseException: the error the producer closed the stream with.
        """
        with self._cond:
            while not self._items and not self._ended and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise HandoffClosed
            if self._items:
                item = self._items.popleft()
                self._wake_trio()
                return item
            if self._error is not None:
                raise self._error
            return None

    def close_blocking(self, error: BaseException | None = None) -> None:
        """End the stream (after the items queued so far). Thread side; never blocks."""
        with self._cond:
            self._ended = True
            self._error = error
            self._wake_trio()

    # ------------------------------------------------------------ trio side
    async def put(self, item: T) -> None:
        """Append ``item``, waiting while the queue is full. A checkpoint."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            with self._cond:
                if len(self._items) < self._slots:
                    self._items.append(item)
                    self._cond.notify()
                    break
                waiter = self._waiter = trio.Event()
            await waiter.wait()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def get(self) -> T | None:
        """The next item, or ``None`` once the stream has ended. A checkpoint.

        Raises:
            BaseException: the error the producer closed the stream with.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify()
                    break
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    return None
                waiter = self._waiter = trio.Event()
            await waiter.wait()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return item

    def close(self, error: BaseException | None = None) -> None:
        """End the stream (after the items queued so far). Trio side."""
        with self._cond:
            self._ended = True
            self._error = error
            self._cond.notify_all()

    def abort(self) -> None:
        """Drop what is queued and wake a blocked thread with :class:`HandoffClosed`.

        Synchronous, so it works in a cancelled ``finally``.
        """
        with self._cond:
            self._aborted = True
            self._items.clear()
            self._cond.notify_all()
