"""The one progress renderer of the command line (pull, import-layer, fsck, gc).

On a terminal it draws with ``rich``: one live line per piece of work in flight
(a layer: compressed bytes read against the blob's size, rate, ETA), a total
line, redrawn by time (``REFRESH_PER_SECOND``), never by bytes; a finished or
skipped piece leaves one permanent line above them. When standard error is not
a terminal it writes a plain log instead: one line per finished or skipped
piece and per note, nothing redrawn. ``--no-progress`` turns both off.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

import attrs
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..importer import LayerProgress
from ..oci import ImageProgress

__all__ = ["PullProgress", "Renderer", "human_bytes"]

REFRESH_PER_SECOND = 8


def human_bytes(n: float) -> str:
    """``512B``, ``1.50 KiB``, ``120.00 MiB``: as indicatif's ``HumanBytes`` prints them
    in cfsctl's ``objects`` line (binary prefixes, two decimals, no space before a bare B)."""
    if n < 1024:
        return f"{int(n)}B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``, ``0 layers``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


class _AmountColumn(ProgressColumn):
    """``1.2 MiB/8.0 MiB`` for byte tasks, ``34/256 directories`` for counted ones."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "bytes")
        done = task.completed
        if unit == "bytes":
            total = human_bytes(task.total) if task.total is not None else "?"
            return Text(f"{human_bytes(done)}/{total}")
        total_n = "?" if task.total is None else str(int(task.total))
        return Text(f"{int(done)}/{total_n} {unit}")


class _RateColumn(ProgressColumn):
    """Bytes per second for byte tasks, items per second otherwise (rich's own estimate)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        if task.fields.get("unit", "bytes") == "bytes":
            return Text(f"{human_bytes(speed)}/s")
        return Text(f"{speed:.0f}/s")


@attrs.define(eq=False)
class Renderer:
    """Live lines on a terminal, a plain log elsewhere, or nothing.

    Use as a context manager around the work; call :meth:`add`, :meth:`update`,
    :meth:`finish` and :meth:`note` from the thread that runs the work (trio's).
    """

    enabled: bool = True
    stream: TextIO | None = None
    terminal: bool | None = None
    """Force the live display (``True``) or the log (``False``); default: ``stream.isatty()``."""
    _progress: Progress | None = attrs.field(default=None, init=False)
    _tasks: dict[str, TaskID] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.stream is None:
            self.stream = sys.stderr
        if self.terminal is None:
            self.terminal = bool(self.stream is not None and self.stream.isatty())

    @property
    def live(self) -> bool:
        """Whether lines are drawn and redrawn (a terminal)."""
        return self.enabled and bool(self.terminal)

    @property
    def log(self) -> bool:
        """Whether events are written as plain lines (not a terminal)."""
        return self.enabled and not self.terminal

    def __enter__(self) -> Renderer:
        if self.live:
            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                _AmountColumn(),
                _RateColumn(),
                TimeRemainingColumn(),
                console=console,
                refresh_per_second=REFRESH_PER_SECOND,
                transient=True,
            )
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def add(self, key: str, description: str, total: float | None, unit: str = "bytes") -> None:
        """Start a live line (nothing in the log: a line is written when it ends)."""
        if self._progress is not None and key not in self._tasks:
            self._tasks[key] = self._progress.add_task(description, total=total, unit=unit)

    def update(
        self, key: str, completed: float, total: float | None = None, description: str | None = None
    ) -> None:
        """Move a live line (the drawing itself happens on rich's timer)."""
        if self._progress is not None and key in self._tasks:
            self._progress.update(
                self._tasks[key], completed=completed, total=total, description=description
            )

    def finish(self, key: str, message: str | None) -> None:
        """End a live line, leaving ``message`` once (above the live lines, or in the log)."""
        if self._progress is not None and key in self._tasks:
            self._progress.remove_task(self._tasks.pop(key))
        if message is not None:
            self.note(message)

    def note(self, message: str) -> None:
        """One permanent line."""
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        elif self.log and self.stream is not None:
            self.stream.write(message + "\n")
            self.stream.flush()


def _short(diff_id: str) -> str:
    return diff_id.removeprefix("sha256:")[:12]


@attrs.define(eq=False)
class PullProgress:
    """Draws :class:`~trio_composefs.oci.ImageProgress` (or a lone layer's
    :class:`LayerProgress`) events on a :class:`Renderer`."""

    renderer: Renderer
    started: dict[str, float] = attrs.Factory(dict)
    finished: set[str] = attrs.Factory(set)
    total_shown: bool = False

    def __call__(self, p: ImageProgress) -> None:
        r = self.renderer
        if p.bytes_total and not self.total_shown and r.live:
            self.total_shown = True
            r.add("total", self._total_text(p), p.bytes_total)
        if self.total_shown:
            r.update("total", p.bytes_done, p.bytes_total, self._total_text(p))
        layer = p.layer
        if layer is None:
            return
        key = layer.diff_id
        if key in self.finished:
            return  # a layer's end is reported by the importer and by the pull
        if p.skipped:
            self.finished.add(key)
            r.finish(key, f"{_short(key)}  skipped: already present")
            return
        if key not in self.started:
            self.started[key] = time.monotonic()
            r.add(key, f"{_short(key)}", p.layer_size)
        if layer.done:
            self.finished.add(key)
            r.finish(key, self._done_text(layer, p.layer_read or p.layer_size or 0))
        else:
            r.update(key, p.layer_read, p.layer_size)

    def layer(self, p: LayerProgress) -> None:
        """For ``import-layer``: a layer without a manifest (uncompressed bytes, no total)."""
        r = self.renderer
        key = p.diff_id
        if key not in self.started:
            self.started[key] = time.monotonic()
            r.add(key, _short(key), None)
        r.update(key, p.bytes_read)

    def _total_text(self, p: ImageProgress) -> str:
        return f"total ({p.layers_done}/{plural(p.layers_total, 'layer')})"

    def _done_text(self, layer: LayerProgress, compressed: int) -> str:
        seconds = max(time.monotonic() - self.started.get(layer.diff_id, time.monotonic()), 1e-6)
        return (
            f"{_short(layer.diff_id)}  done: {human_bytes(compressed)} in {seconds:.1f} s"
            f" ({human_bytes(compressed / seconds)}/s), {human_bytes(layer.bytes_read)} of tar,"
            f" {plural(layer.objects_written, 'new object')},"
            f" {layer.objects_deduplicated} already present"
        )
