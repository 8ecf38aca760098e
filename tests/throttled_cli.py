"""Run ``trio-cfsctl`` with every OCI layout blob delivered slowly (for the progress tests).

Usage: ``python throttled_cli.py BYTES_PER_SECOND CLI-ARGS...``. The layout source's
``open_blob`` is wrapped so that its pieces arrive in 64 KiB slices at the given rate:
a slow registry, seen through the real command line in a real terminal.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import trio

from trio_composefs.cli import run
from trio_composefs.oci.sources._layout import OciLayoutSource

SLICE = 64 << 10


def throttle(rate: float) -> None:
    original = OciLayoutSource.open_blob

    @contextlib.asynccontextmanager
    async def slow_open_blob(self: Any, descriptor: Any) -> AsyncIterator[AsyncIterator[bytes]]:
        async with original(self, descriptor) as pieces:

            async def slow() -> AsyncIterator[bytes]:
                async for piece in pieces:
                    for i in range(0, len(piece), SLICE):
                        part = piece[i : i + SLICE]
                        await trio.sleep(len(part) / rate)
                        yield part

            yield slow()

    OciLayoutSource.open_blob = slow_open_blob  # type: ignore[method-assign]


if __name__ == "__main__":
    throttle(float(sys.argv[1]))
    sys.exit(run(sys.argv[2:]))
