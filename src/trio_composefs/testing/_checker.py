"""After a fault: is anything half-written visible, and did anything leak?

:class:`ImportChecker` takes a baseline of the process (open file descriptors,
threads, child processes) and of a repository (every published name), and
later asserts that nothing was added to either:

>>> checker = ImportChecker(repo)
>>> await pull_image(repo, good_source)   # the first import opens what stays open
>>> checker.baseline()
>>> with pytest.raises(...): await pull_image(repo, faulty_source)
>>> checker.assert_no_leaks()
>>> checker.assert_nothing_published()    # the failed pull named nothing new
>>> await checker.assert_consistent()     # every published name is whole

Take the baseline after a first import: the repository opens its directory
descriptors lazily and keeps them, and they are not leaks. The hash pool's
worker processes and sockets end with the import that started them, trio's
idle cached worker threads (named ``Trio thread N``) are not counted, and the
checker waits up to ``grace`` seconds for threads and processes that are
already on their way out.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

import attrs

__all__ = ["ImportChecker", "LeakError", "ProcessSnapshot", "published_names"]

_IDLE_TRIO_THREAD = re.compile(r"Trio thread \d+\Z")


class LeakError(AssertionError):
    """Descriptors, threads or processes that outlived what opened them."""


def _children() -> set[int]:
    """Process ids of this process's children (every thread's), zombies included."""
    out: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # pragma: no cover - not Linux
        return out
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out.update(int(pid) for pid in f.read().split())
        except OSError:
            continue
    return out


def _is_open(fd: int) -> bool:
    """Still open (the listing's own directory descriptor is gone once listed)."""
    try:
        os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return True


def _describe_fd(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


def _describe_pid(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"{pid} ({cmd or 'exited, not reaped'})"


@attrs.frozen
class ProcessSnapshot:
    """What this process has open: descriptors, live threads (not idle trio ones), children."""

    fds: frozenset[int]
    threads: frozenset[int]
    children: frozenset[int]

    @classmethod
    def take(cls) -> ProcessSnapshot:
        threads = frozenset(
            t.ident
            for t in threading.enumerate()
            if t.ident is not None and t.is_alive() and not _IDLE_TRIO_THREAD.match(t.name)
        )
        fds = frozenset(fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd))
        return cls(fds, threads, frozenset(_children()))


def published_names(repo: Any) -> frozenset[str]:
    """Every name a repository publishes: ``streams/…``, ``streams/refs/…``,
    ``images/…`` and ``images/refs/…`` (with what each points at)."""
    names = {f"streams/{k} -> {v.hex()}" for k, v in repo.list_streams().items()}
    names |= {f"streams/refs/{k} -> {v}" for k, v in repo.list_stream_refs().items()}
    names |= {f"images/{k}" for k in repo.list_images()}
    names |= {f"images/refs/{k} -> {v}" for k, v in repo.list_image_refs().items()}
    return frozenset(names)


@attrs.define(eq=False)
class ImportChecker:
    """Baselines of the process and of ``repo``, and assertions against them.

    Args:
        repo: the repository to watch (a :class:`~trio_composefs.Repository`,
            or a :class:`~trio_composefs.testing.FaultyRepository` around one);
            ``None`` checks the process only.
        grace: seconds to wait for threads and processes to end before
            calling them leaked.
    """

    repo: Any = None
    grace: float = 5.0
    process: ProcessSnapshot = attrs.field(factory=ProcessSnapshot.take, init=False)
    names: frozenset[str] = attrs.field(factory=frozenset, init=False)

    def __attrs_post_init__(self) -> None:
        self.names = self._names()

    def _names(self) -> frozenset[str]:
        if self.repo is None:
            return frozenset()
        inner = getattr(self.repo, "repo", self.repo)  # see through a FaultyRepository
        return published_names(inner)

    def baseline(self) -> None:
        """Record what is open and published now (call it after a first import)."""
        self.process = ProcessSnapshot.take()
        self.names = self._names()

    def leaks(self) -> list[str]:
        """What is open now and was not at the baseline, one line each (waits ``grace``)."""
        deadline = time.monotonic() + self.grace
        while True:
            now = ProcessSnapshot.take()
            fds = sorted(now.fds - self.process.fds)
            threads = now.threads - self.process.threads
            children = sorted(now.children - self.process.children)
            if not (threads or children) or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        by_ident = {t.ident: t for t in threading.enumerate()}
        out = [f"file descriptor {_describe_fd(fd)}" for fd in fds]
        out += [
            f"thread {by_ident[t].name!r}" if t in by_ident else f"thread {t}"
            for t in sorted(threads)
        ]
        out += [f"child process {_describe_pid(pid)}" for pid in children]
        return out

    def assert_no_leaks(self) -> None:
        """Raise :class:`LeakError` listing every descriptor, thread or process leaked."""
        leaked = self.leaks()
        if leaked:
            raise LeakError("leaked since the baseline:\n  " + "\n  ".join(leaked))

    def published_since(self) -> list[str]:
        """Names published (or re-pointed) since the baseline, sorted."""
        return sorted(self._names() - self.names)

    def assert_nothing_published(self, *, except_layers: bool = True) -> None:
        """Raise ``AssertionError`` if a name was published since the baseline.

        A failed pull may leave *complete* layers published: each was verified
        against its diff_id before its name appeared, and the next pull reuses
        it. They are allowed unless ``except_layers`` is false (check them with
        :meth:`assert_consistent`); a config, manifest, tag or image never is.
        """
        new = [
            name
            for name in self.published_since()
            if not (except_layers and name.startswith("streams/oci-layer-"))
        ]
        if new:
            raise AssertionError("published since the baseline:\n  " + "\n  ".join(new))

    async def assert_consistent(self, *, reassemble: bool = True) -> None:
        """Raise ``AssertionError`` unless every published name is whole.

        Runs :func:`~trio_composefs.fsck` without re-hashing objects: every
        stream and image name resolves to an object that exists, every stream
        parses and has all its objects, every image reference is complete; with
        ``reassemble``, every layer stream's tar also matches its diff_id.
        Stray temporary files (left by an interrupted import, removed by
        ``gc``) are not visible names and do not count.
        """
        from ..maintenance._fsck import fsck

        inner = getattr(self.repo, "repo", self.repo)
        report = await fsck(inner, check_objects=False, check_layers=reassemble)
        if not report.ok:
            raise AssertionError(
                "half-written data is visible:\n  " + "\n  ".join(report.summary())
            )
