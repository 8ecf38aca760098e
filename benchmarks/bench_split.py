"""Main-thread cost per tar entry: the tar splitter and the splitstream encoder alone.

Runs, in a child process per source tree, `TarSplitter` (as the importer uses it) and a
reader-like consumer feeding `SplitStreamEncoder` over the decompressed layers of an OCI
layout, fed in 1 MiB pieces, and prints CPU µs per entry (the best of ``--reps`` passes).
Trees alternate (A B A B ...) so that a loaded machine affects both alike; the sha256 of
the splitstreams must agree between trees (fake object ids: the encoder, not hashing, is
measured).

    python benchmarks/bench_split.py LAYOUT [--baseline /path/to/old/src] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent / "src"
PIECE = 1 << 20


def _layers(layout: Path) -> list[bytes]:
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    out = []
    for layer in manifest["layers"]:
        raw = (blobs / layer["digest"][7:]).read_bytes()
        out.append(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    return out


def _child(layout: Path, mode: str, reps: int) -> None:
    import trio_composefs
    from trio_composefs.formats._fsverity import Algorithm, Digest
    from trio_composefs.formats._splitstream import ContentType, SplitStreamEncoder
    from trio_composefs.formats._tarsplit import (
        END,
        NEED_DATA,
        FileData,
        FileEnd,
        FileStart,
        Inline,
        TarSplitter,
    )

    print(f"using {trio_composefs.__file__}", file=sys.stderr)
    params = inspect.signature(TarSplitter).parameters
    kwargs: dict[str, Any] = {k: True for k in ("coalesce", "zero_copy") if k in params}
    layers = [[t[i : i + PIECE] for i in range(0, len(t), PIECE)] for t in _layers(layout)]

    def one(pieces: list[bytes]) -> tuple[int, bytes]:
        splitter = TarSplitter(**kwargs)
        encoder = SplitStreamEncoder(Algorithm.SHA256, ContentType.OCI_LAYER)
        out = bytearray()
        inline = bytearray()
        size = objects = 0

        def handle(event: object) -> None:
            nonlocal size, objects
            if isinstance(event, Inline):
                inline.extend(event.data)
            elif isinstance(event, FileData):
                size += len(event.data)
            elif isinstance(event, FileStart):
                if inline:
                    out.extend(encoder.begin_inline(len(inline)))
                    out.extend(encoder.inline_data(bytes(inline)))
                    inline.clear()
                size = 0
            elif isinstance(event, FileEnd):
                objects += 1
                digest = Digest(Algorithm.SHA256, objects.to_bytes(32, "little"))
                out.extend(encoder.external(digest, size))

        for piece in [*pieces, b""]:
            splitter.receive_data(piece)
            while (event := splitter.next_event()) is not NEED_DATA and event is not END:
                if mode == "full":
                    handle(event)
        if mode == "full":
            if inline:
                out.extend(encoder.begin_inline(len(inline)))
                out.extend(encoder.inline_data(bytes(inline)))
            out.extend(encoder.finish())
            out[:0] = encoder.header(len(out))
        return splitter.entries, bytes(out)

    best = float("inf")
    entries = 0
    digest = ""
    for _ in range(reps):
        h = hashlib.sha256()
        entries = 0
        start = time.process_time()
        for pieces in layers:
            n, stream = one(pieces)
            entries += n
            h.update(hashlib.sha256(stream).digest())
        best = min(best, time.process_time() - start)
        digest = h.hexdigest()[:16]
    print(json.dumps({"us_per_entry": best / entries * 1e6, "entries": entries, "sha": digest}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("layout", type=Path)
    parser.add_argument("--baseline", type=Path, help="another src tree to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", choices=["split", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.layout, args.child, args.reps)
        return
    trees = {"ours": SRC} | ({"base": args.baseline} if args.baseline else {})
    for round_ in range(1, args.rounds + 1):
        for mode in ("split", "full"):
            for name, src in trees.items():
                child = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
                env = dict(os.environ, PYTHONPATH=str(src))
                result = json.loads(
                    subprocess.run(
                        child, check=True, capture_output=True, text=True, env=env
                    ).stdout
                )
                print(
                    f"round {round_} {mode:5s} {name}: {result['us_per_entry']:.1f} µs/entry"
                    f" ({result['entries']} entries, streams {result['sha']})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
