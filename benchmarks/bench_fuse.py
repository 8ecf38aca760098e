"""The FUSE server against the kernel mount of the same image: walks, reads, first byte.

Builds one repository image in a scratch directory (removed at the end): ``--small``
files of 1 to 64 KiB spread over 64 directories, ``--large`` files of ``--large-mib``
each, and one ``--big-mib`` file. Every object's content is distinct. Then, for the
kernel mount (``mount_image``: EROFS + overlayfs, as root) and for the FUSE mount
(``trio-cfsctl mount --fuse --background``, a separate server process), each freshly
mounted, it measures from this process:

* ``walk``: ``os.walk`` + ``lstat`` of every entry (what ``find -ls`` does), twice: the
  first walk fills the kernel's dentry/attribute caches, the second uses them;
* ``small files``: open and read every small file (an open is a round trip to the
  server, and through FUSE the first open of each object verifies it);
* ``large, first read``: read the large files in 1 MiB pieces; through FUSE this
  includes verifying each object (hashed by the server's pool) and every page passes
  through the server; ``again`` re-reads them (the page cache: FUSE keeps it);
* ``first byte``: open the big file and read 4096 bytes, on a fresh mount: through
  FUSE the whole object is hashed first (the kernel mount verifies nothing here: no
  fs-verity on this filesystem, an insecure repository).

FUSE is measured twice: as ``trio-cfsctl mount --fuse`` serves (every read of a large
object checked again against its level-1 digests) and with ``check_reads=False``
(only first opens checked), to show what the per-read check costs.

Object files are in the page cache for both (they were just written; caches are not
dropped: the machine is shared). Times are medians of ``--rounds`` rounds; the ratio
column is FUSE / kernel.

    .venv/bin/python benchmarks/bench_fuse.py --quick
    .venv/bin/python benchmarks/bench_fuse.py --big-mib 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from trio_composefs.formats import Algorithm, Digest
from trio_composefs.fs import Directory, ExternalFile, FileSystem, InlineFile, Leaf, Stat
from trio_composefs.mount import mount_image, unmount
from trio_composefs.repository import Repository, store_image

CLI = [sys.executable, "-m", "trio_composefs"]
PIECE = 1 << 20


def _store(repo: Repository, seed: int, size: int) -> Digest:
    block = random.Random(seed).randbytes(PIECE)
    with repo.begin_object() as tmp:
        for off in range(0, size, PIECE):
            tmp.write((off.to_bytes(8, "little") + block)[: min(PIECE, size - off)])
        digest, _ = tmp.finish()
    return digest


def build(repo: Repository, small: int, large: int, large_mib: int, big_mib: int) -> None:
    rnd = random.Random(7)
    root = Directory(Stat(0o755))
    dirs = [Directory(Stat(0o755)) for _ in range(64)]
    for i, d in enumerate(dirs):
        root.entries[f"d{i:02}".encode()] = d
    for i in range(small):
        size = rnd.randrange(1 << 10, 64 << 10)
        content = (
            InlineFile(rnd.randbytes(size))
            if size < 4096
            else ExternalFile(size, _store(repo, 1000 + i, size))
        )
        dirs[i % 64].entries[f"s{i:05}".encode()] = Leaf(Stat(0o644), content)
    bigdir = Directory(Stat(0o755))
    root.entries[b"large"] = bigdir
    for i in range(large):
        size = large_mib << 20
        bigdir.entries[f"l{i}".encode()] = Leaf(
            Stat(0o644), ExternalFile(size, _store(repo, 10 + i, size))
        )
    size = big_mib << 20
    bigdir.entries[b"big"] = Leaf(Stat(0o644), ExternalFile(size, _store(repo, 1, size)))
    repo.sync()
    repo.publish_image(store_image(repo, FileSystem(root)), "bench")


def walk(mnt: Path) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def read_files(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while piece := f.read(PIECE):
                total += len(piece)
    return total


def first_byte(path: Path) -> int:
    with open(path, "rb", buffering=0) as f:
        return len(f.read(4096))


#: The FUSE server with ``check_reads=False`` (only first opens checked), in a child.
OPEN_ONLY_SERVER = """
import sys, trio
from trio_composefs.fuse import mounted_fuse
from trio_composefs.repository import Repository
async def main():
    with Repository.open(sys.argv[1]) as repo:
        async with mounted_fuse(repo, "bench", sys.argv[2], check_reads=False) as m:
            print("ready", flush=True)
            await m.wait_unmounted()
trio.run(main)
"""


class Mount:
    def __init__(self, kind: str, repo_path: Path, mnt: Path) -> None:
        self.kind, self.repo_path, self.mnt = kind, repo_path, mnt
        self.child: subprocess.Popen[str] | None = None

    def __enter__(self) -> Path:
        if self.kind == "kernel":
            with Repository.open(self.repo_path) as repo:
                mount_image(repo, "bench", self.mnt)
        elif self.kind == "fuse, open only":
            self.child = subprocess.Popen(
                [sys.executable, "-c", OPEN_ONLY_SERVER, str(self.repo_path), str(self.mnt)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.child.stdout is not None
            assert self.child.stdout.readline().startswith("ready")
        else:
            argv = [*CLI, "--repo", str(self.repo_path), "mount", "--fuse", "--background"]
            subprocess.run([*argv, "bench", str(self.mnt)], check=True, capture_output=True)
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        if self.kind == "kernel":
            unmount(self.mnt)
        else:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=True)
            deadline = time.monotonic() + 30
            while os.path.ismount(self.mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.child is not None:
                self.child.wait(30)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_round(m: Path, r: dict[str, list[float]]) -> None:
    """Every measure once on the fresh mount ``m``, appended to ``r``."""
    r.setdefault("walk, first", []).append(timed(lambda: walk(m)))
    r.setdefault("walk, again", []).append(timed(lambda: walk(m)))
    small = sorted(m.glob("d*/s*"))
    r.setdefault("small files", []).append(timed(lambda: read_files(small)))
    large = sorted(m.glob("large/l*"))
    r.setdefault("large, first read", []).append(timed(lambda: read_files(large)))
    r.setdefault("large, again", []).append(timed(lambda: read_files(large)))
    r.setdefault("first byte", []).append(timed(lambda: first_byte(m / "large/big")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=4000)
    ap.add_argument("--large", type=int, default=4)
    ap.add_argument("--large-mib", type=int, default=64)
    ap.add_argument("--big-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1000 small, 2 x 32 MiB, 128 MiB")
    ap.add_argument("--dir", default="/var/tmp", help="where the scratch repository goes")
    args = ap.parse_args()
    if args.quick:
        args.small, args.large, args.large_mib, args.big_mib = 1000, 2, 32, 128
    if os.geteuid() != 0:
        sys.exit("bench_fuse.py needs root (the kernel mount)")
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {platform.node()}  {os.cpu_count()} CPUs")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir=args.dir))
    try:
        repo_path = scratch / "repo"
        t0 = time.perf_counter()
        with Repository.init(repo_path, algorithm=Algorithm.SHA256, insecure=True) as repo:
            build(repo, args.small, args.large, args.large_mib, args.big_mib)
        print(
            f"image: {args.small} small files, {args.large} x {args.large_mib} MiB,"
            f" 1 x {args.big_mib} MiB (built in {time.perf_counter() - t0:.1f} s)"
        )
        mnt = scratch / "mnt"
        mnt.mkdir()
        kinds = ("kernel", "fuse", "fuse, open only")
        results: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
        large_bytes = args.large * (args.large_mib << 20)
        for _ in range(args.rounds):
            for kind in kinds:
                r = results[kind]
                with Mount(kind, repo_path, mnt) as m:
                    one_round(m, r)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print()
        print(
            f"| measure (median of {args.rounds}) | kernel | FUSE | FUSE / kernel"
            " | FUSE, open only | / kernel |"
        )
        print("|---|---|---|---|---|---|")
        for key in results["kernel"]:
            k, f, o = (statistics.median(results[kind][key]) for kind in kinds)
            extra = ""
            if key.startswith("large"):
                rates = " / ".join(f"{large_bytes / t / 1e6:.0f}" for t in (k, f, o))
                extra = f" (MB/s: {rates})"
            elif key == "small files":
                extra = f" (files/s: {' / '.join(f'{args.small / t:.0f}' for t in (k, f, o))})"
            print(
                f"| {key}{extra} | {k * 1000:.1f} ms | {f * 1000:.1f} ms | {f / k:.1f}"
                f" | {o * 1000:.1f} ms | {o / k:.1f} |"
            )
    finally:
        for target in [scratch / "mnt"]:
            if os.path.ismount(target):
                subprocess.run(["umount", "-l", str(target)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
