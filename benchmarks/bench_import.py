"""Wall time, CPU and peak RSS of importing a tar layer, against GNU tar, fsverity and ostree.

Usage::

    python benchmarks/bench_import.py [--datasets upstream,unique,small,huge,million]
        [--modes parallel,seq,...] [--runs 3] [--scratch ext4|tmpfs] [--keep] [--quick]

Builds the input tars once in ``/var/tmp/trio-composefs-bench`` (outside the
measured time; deleted at the end unless ``--keep``, and reused when kept),
then runs every mode on every dataset, each run in a fresh subprocess
(``--one MODE DATASET --repo DIR``, which prints one JSON line) on a freshly
made filesystem: a loop-mounted ext4 image, sparse, under ``/var/tmp`` (or a
tmpfs). Runs are interleaved (run 1 of every mode, then run 2, ...) and the
median is reported, with the throughput over the tar's bytes, the CPU time of
the importing process and its hash workers, their peak RSS (the ``VmHWM`` of the
importer plus that of every descendant, read from ``/proc`` just before the hash
pool is closed; for peers, the largest process as GNU time reports it) and the
CPUs that other processes used meanwhile (from ``/proc/stat``; a high value means a disturbed run).

Modes (ours: :func:`trio_composefs.importer.open_importer` on a SHA-256 insecure
repository; the kernel here has no fs-verity, so digests are computed in
userspace):

``seq-fdatasync``  jobs=1, hash_processes=0, ``fdatasync`` of every object before
                   it is linked (the design before the single syncfs), then syncfs
``seq``            jobs=1, hash_processes=0, one syncfs at the end
``parallel``       the defaults (2 writers per CPU, one hash process per CPU)
``seq-nosync``, ``parallel-nosync``  the same with the final syncfs skipped
``tar``            GNU ``tar -xf`` (its row's "syncfs" column is a syncfs run after it)
``tar+fsverity``   ``tar -xf``, then ``fsverity digest`` over the files in two
                   processes (half of the bytes each)
``ostree``         ``ostree commit --tree=tar=FILE`` into a new bare-user repository
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio

from trio_composefs.formats import Algorithm, Digest
from trio_composefs.importer import LayerStats, open_importer
from trio_composefs.repository import Repository

WORK_DIR = Path("/var/tmp/trio-composefs-bench")
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MTIME = 1234567890
_POOL_SIZE = 64 * MiB
_POOL_STRIDE = 4099  # prime: offsets i * stride mod (pool - max size) are distinct for any i here


# --------------------------------------------------------------------------- datasets


@attrs.frozen
class Dataset:
    """One input tar: ``files`` regular files named ``file_<i>.bin``."""

    name: str
    files: int
    describe: str
    size_of: Callable[[int], int]
    """Size of file ``i``."""
    content: str
    """``upstream`` (256 distinct contents), ``unique`` (random, seeded) or ``repeat``."""
    quick: bool = False

    def tar_path(self) -> Path:
        return WORK_DIR / f"{self.name}-{'quick' if self.quick else 'full'}.tar"


def _sizes(seed: int, low: int, high: int, files: int) -> Callable[[int], int]:
    """Seeded random sizes in [low, high], drawn on first use."""
    table: list[int] = []

    def size_of(i: int) -> int:
        if not table:
            rng = random.Random(seed)
            table.extend(rng.randint(low, high) for _ in range(files))
        return table[i]

    return size_of


def _const(size: int) -> Callable[[int], int]:
    return lambda _i: size


def datasets(quick: bool) -> dict[str, Dataset]:
    """The datasets by name; ``quick`` makes each one small (seconds to import)."""
    n200 = 300 if quick else 10_000
    nsmall = 2_000 if quick else 200_000
    nmillion = 20_000 if quick else 1_000_000
    huge = 64 * MiB if quick else 4 * GiB
    return {
        "upstream": Dataset(
            "upstream",
            n200,
            f"{n200:,} x 200 KiB, upstream's pattern (256 distinct contents)",
            _const(200 * KiB),
            "upstream",
            quick,
        ),
        "unique": Dataset(
            "unique",
            n200,
            f"{n200:,} x 200 KiB, unique random contents",
            _const(200 * KiB),
            "unique",
            quick,
        ),
        "small": Dataset(
            "small",
            nsmall,
            f"{nsmall:,} files of 0-8 KiB, unique random contents",
            _sizes(1, 0, 8 * KiB, nsmall),
            "unique",
            quick,
        ),
        "huge": Dataset(
            "huge",
            1,
            f"one file of {huge / GiB:g} GiB, random contents",
            _const(huge),
            "repeat",
            quick,
        ),
        "million": Dataset(
            "million",
            nmillion,
            f"{nmillion:,} files of 0-100 bytes, unique random contents",
            _sizes(2, 0, 100, nmillion),
            "unique",
            quick,
        ),
    }


def _octal(value: int, width: int) -> bytes:
    text = b"%0*o" % (width - 1, value)
    if len(text) != width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return text + b"\0"


def gnu_header(name: str, size: int) -> bytes:
    """A GNU tar header of a regular file: mode 0644, uid/gid 1000, mtime 1234567890."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"name too long for a plain header: {name}")
    header = bytearray(512)
    header[0 : len(raw)] = raw
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(1000, 8)
    header[116:124] = _octal(1000, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(MTIME, 12)
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar  \0"  # GNU magic and version
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _upstream_content(i: int, size: int, cache: dict[int, bytes]) -> bytes:
    """Byte j of file i is ((j mod 256) + (i mod 256)) * 17 mod 256 (upstream's bench_tar_split)."""
    key = i % 256
    block = cache.get(key)
    if block is None:
        block = cache[key] = bytes(((j + key) * 17) % 256 for j in range(256))
    reps = -(-size // 256)
    return (block * reps)[:size]


def build_tar(ds: Dataset, path: Path) -> dict[str, Any]:
    """Write the dataset's tar to ``path`` (streaming) and return its metadata.

    Unique contents are slices of a 64 MiB seeded random pool at distinct
    offsets, so every file differs; the huge file repeats that pool.
    """
    pool = random.Random(42).randbytes(_POOL_SIZE)
    cache: dict[int, bytes] = {}
    sha = hashlib.sha256()
    width = max(4, len(str(ds.files - 1)))
    objects = 0
    distinct: set[int] = set()
    max_size = max(ds.size_of(i) for i in range(ds.files)) if ds.content == "unique" else 0
    span = _POOL_SIZE - max_size
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb", buffering=4 * MiB) as out:

        def put(data: bytes) -> None:
            sha.update(data)
            out.write(data)

        for i in range(ds.files):
            size = ds.size_of(i)
            put(gnu_header(f"file_{i:0{width}d}.bin", size))
            if size > 64:
                objects += 1
            if ds.content == "upstream":
                put(_upstream_content(i, size, cache))
                distinct.add(i % 256 if size > 64 else -1)
            elif ds.content == "unique":
                off = (i * _POOL_STRIDE) % span
                put(pool[off : off + size])
            else:
                view, left = memoryview(pool), size
                while left:
                    piece = view[: min(left, _POOL_SIZE)]
                    sha.update(piece)
                    out.write(piece)
                    left -= len(piece)
            if size % 512:
                put(bytes(512 - size % 512))
        put(bytes(1024))
    os.replace(tmp, path)
    distinct.discard(-1)
    meta = {
        "diff_id": f"sha256:{sha.hexdigest()}",
        "tar_bytes": path.stat().st_size,
        "files": ds.files,
        "objects": objects,
        "distinct_objects": len(distinct) if ds.content == "upstream" else objects,
        "file_bytes": sum(ds.size_of(i) for i in range(ds.files)),
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    return meta


def ensure_tar(ds: Dataset) -> dict[str, Any]:
    """The dataset's tar metadata, building the tar unless a complete one is there."""
    path = ds.tar_path()
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        if meta.get("tar_bytes") == path.stat().st_size:
            return meta
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    meta = build_tar(ds, path)
    print(
        f"built {path} ({meta['tar_bytes'] / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return meta


# --------------------------------------------------------------------------- modes


@attrs.frozen
class Mode:
    """How one run imports (ours) or unpacks (a peer) the tar."""

    name: str
    describe: str
    jobs: int | None = None
    hash_processes: int | None = None
    fdatasync: bool = False
    final_sync: bool = True
    peer: str | None = None


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("seq-fdatasync", "jobs=1, no hash process, fdatasync per object", 1, 0, True),
        Mode("seq", "jobs=1, no hash process, one syncfs", 1, 0),
        Mode("parallel", "defaults, one syncfs"),
        Mode("seq-nosync", "jobs=1, no hash process, no syncfs", 1, 0, final_sync=False),
        Mode("parallel-nosync", "defaults, no syncfs", final_sync=False),
        Mode("tar", "GNU tar -x", peer="tar"),
        Mode("tar+fsverity", "tar -x, then fsverity digest in 2 processes", peer="tar+fsverity"),
        Mode("ostree", "ostree commit --tree=tar= (bare-user)", peer="ostree"),
    )
}
DEFAULT_MODES = list(MODES)
# The many-files datasets run fewer modes by default: an fdatasync per object
# costs about 1 ms here (200 s for the small dataset), and the time budget of a
# full run is about 30 minutes.
DEFAULT_MODES_FOR = {
    "huge": ["seq", "parallel", "parallel-nosync", "tar", "tar+fsverity"],
    "million": ["seq", "parallel", "tar"],
    "small": [m for m in DEFAULT_MODES if m != "seq-fdatasync"],
}
RUN_ONCE = {"small", "huge", "million"}
"""Datasets measured once (they are RSS checks), whatever ``--runs`` says."""


@attrs.define(eq=False)
class _BenchTmpfile:
    inner: Any

    @property
    def fd(self) -> int:
        return int(self.inner.fd)

    @property
    def size(self) -> int:
        return int(self.inner.size)

    def write(self, data: bytes | memoryview) -> None:
        self.inner.write(data)

    def finish(self, digest: Digest | None = None) -> tuple[Digest, bool]:
        os.fdatasync(self.inner.fd)
        result: tuple[Digest, bool] = self.inner.finish(digest)
        return result

    def abort(self) -> None:
        self.inner.abort()

    def __enter__(self) -> _BenchTmpfile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)


@attrs.define(eq=False)
class BenchRepository:
    """A repository wrapper: optional fdatasync per object, optional (timed) final syncfs."""

    repo: Repository
    fdatasync: bool = False
    final_sync: bool = True
    sync_seconds: float = 0.0

    @property
    def path(self) -> str:
        return self.repo.path

    @property
    def algorithm(self) -> Algorithm:
        return self.repo.algorithm

    @property
    def verity_supported(self) -> bool:
        return self.repo.verity_supported

    def ensure_writable(self) -> None:
        self.repo.ensure_writable()

    def begin_object(self) -> Any:
        tmp = self.repo.begin_object()
        return _BenchTmpfile(tmp) if self.fdatasync else tmp

    def has_stream(self, content_id: str) -> Digest | None:
        return self.repo.has_stream(content_id)

    def helper_store_target(self) -> tuple[int, bool] | None:
        """The hash processes may store small objects, except where each is fdatasync'ed."""
        return None if self.fdatasync else self.repo.helper_store_target()

    def sync(self) -> None:
        if self.final_sync:
            t0 = time.perf_counter()
            self.repo.sync()
            self.sync_seconds += time.perf_counter() - t0

    def publish_stream(
        self, content_id: str, digest: Digest, ref: str | None = None, *, sync: bool = True
    ) -> None:
        if sync:
            self.sync()
        self.repo.publish_stream(content_id, digest, ref, sync=False)


# --------------------------------------------------------------------------- one run (child)

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children_of(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (hash workers, a forkserver, ...)."""
    found: list[int] = []
    todo = _children_of(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(_children_of(child))
    return found


def _proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds incl. reaped children, VmHWM bytes) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            hwm = next((line for line in f if line.startswith("VmHWM:")), "VmHWM: 0 kB")
    except OSError:
        return None
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / _CLK_TCK, int(hwm.split()[1]) * KiB


def _own_hwm() -> int:
    """This process's peak RSS (``VmHWM``; unlike ``ru_maxrss``, not inherited at exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * KiB


def _rusage_cpu(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _CLK_TCK


async def _import(mode: Mode, tar: Path, diff_id: str, repo_dir: Path) -> dict[str, Any]:
    repo = Repository.init(repo_dir, algorithm=Algorithm.SHA256, insecure=True)
    bench = BenchRepository(repo, fdatasync=mode.fdatasync, final_sync=mode.final_sync)
    fd = os.open(tar, os.O_RDONLY | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter()
        async with open_importer(
            bench, jobs=mode.jobs, hash_processes=mode.hash_processes
        ) as importer:
            stats: LayerStats = await importer.import_layer(fd, diff_id)
            wall = time.perf_counter() - t0
            # Before the pool closes: the workers are idle and their counters final.
            workers = [u for p in descendants(os.getpid()) if (u := _proc_usage(p)) is not None]
            cpu = _rusage_cpu(resource.RUSAGE_SELF) + _rusage_cpu(resource.RUSAGE_CHILDREN)
    finally:
        os.close(fd)
        repo.close()
    return {
        "wall": wall,
        "sync": bench.sync_seconds if mode.final_sync else None,
        "cpu": cpu + sum(c for c, _ in workers),
        "rss_main": _own_hwm(),
        "rss_workers": sum(h for _, h in workers),
        "workers": len(workers),
        "objects": stats.objects,
        "written": stats.objects_written,
        "deduplicated": stats.objects_deduplicated,
        "splitstream": str(stats.splitstream),
    }


def _run_measured(cmd: list[str], peaks: list[int]) -> None:
    """Run ``cmd`` under GNU time and append its peak RSS in bytes to ``peaks``.

    (``ru_maxrss`` of a child of ours would include our own RSS: a vfork'ed
    child's high-water mark counts the parent's pages until it execs.)
    """
    with tempfile.NamedTemporaryFile("r", prefix="bench-time-") as out:
        subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", out.name, *cmd],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        peaks.append(int(out.read().split()[-1]) * KiB)


def _fsverity_halves(root: Path, peaks: list[int]) -> float:
    """``fsverity digest`` over every file under ``root``, in two processes at a time."""
    files = sorted(
        ((e.stat().st_size, e.path) for e in os.scandir(root) if e.is_file()), reverse=True
    )
    halves: list[list[str]] = [[p for _, p in files[0::2]], [p for _, p in files[1::2]]]
    errors: list[BaseException] = []

    def digest(paths: list[str]) -> None:
        try:
            for start in range(0, len(paths), 2000):
                _run_measured(["fsverity", "digest", *paths[start : start + 2000]], peaks)
        except BaseException as exc:
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=digest, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def _syncfs(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.perf_counter()
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


# Our tars, like upstream's, have no directory entries: ostree needs to be told.
_OSTREE_TAR = ["--tar-autocreate-parents"]
# ``--tree=tar=FILE``: the tree is read from the tar with libarchive.


def _peer(mode: Mode, tar: Path, dest: Path) -> dict[str, Any]:
    dest.mkdir()
    result: dict[str, Any] = {}
    peaks: list[int] = []
    if mode.peer == "ostree":
        subprocess.run(["ostree", "init", f"--repo={dest}", "--mode=bare-user"], check=True)
        t0 = time.perf_counter()
        _run_measured(
            [
                "ostree",
                "commit",
                f"--repo={dest}",
                "--branch=bench",
                *_OSTREE_TAR,
                f"--tree=tar={tar}",
            ],
            peaks,
        )
        result["wall"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        _run_measured(["tar", "-xf", str(tar), "-C", str(dest)], peaks)
        result["wall"] = time.perf_counter() - t0
        if mode.peer == "tar+fsverity":
            result["fsverity"] = _fsverity_halves(dest, peaks)
            result["wall"] += result["fsverity"]
    result["cpu"] = _rusage_cpu(resource.RUSAGE_CHILDREN)
    result["rss_main"] = max(peaks)
    result["rss_workers"] = 0
    # Not part of the wall time: what making it all durable would add.
    result["sync"] = _syncfs(dest)
    return result


def run_one(mode: Mode, tar: Path, diff_id: str, repo_dir: Path) -> dict[str, Any]:
    """Measure one run in this process (called in a fresh subprocess by the driver)."""
    busy0, t0 = _busy_seconds(), time.perf_counter()
    if mode.peer is None:
        result = trio.run(_import, mode, tar, diff_id, repo_dir)
    else:
        result = _peer(mode, tar, repo_dir)
    elapsed = time.perf_counter() - t0
    own = _rusage_cpu(resource.RUSAGE_SELF) + _rusage_cpu(resource.RUSAGE_CHILDREN)
    result["others"] = max(0.0, (_busy_seconds() - busy0) - own) / elapsed
    return result


# --------------------------------------------------------------------------- driver


@contextlib.contextmanager
def fresh_fs(kind: str, size: int, inodes: int) -> Iterator[Path]:
    """A new, empty filesystem for one run: loop-mounted ext4 image or tmpfs."""
    mnt = Path(WORK_DIR / "mnt")
    mnt.mkdir(parents=True, exist_ok=True)
    image = WORK_DIR / "scratch.img"
    if kind == "tmpfs":
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True
        )
    else:
        image.unlink(missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(size)
        mkfs = [
            "mkfs.ext4",
            "-q",
            "-N",
            str(inodes),
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ]
        subprocess.run([*mkfs, str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        image.unlink(missing_ok=True)
        os.sync()  # no writeback of this run left to disturb the next one


def _warm(path: Path) -> None:
    """Read the tar once so that every run reads it from the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


def _spawn_one(
    mode: Mode, ds: Dataset, meta: dict[str, Any], scratch: str, quick: bool
) -> dict[str, Any]:
    size = 3 * meta["tar_bytes"] + meta["files"] * 8 * KiB + GiB
    inodes = 2 * meta["files"] + 65536
    with fresh_fs(scratch, size, inodes) as mnt:
        _warm(ds.tar_path())
        cmd = [sys.executable, __file__, "--one", mode.name, ds.name, "--repo", str(mnt / "repo")]
        cmd += ["--quick"] if quick else []
        proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _fmt_mib(n: float) -> str:
    return f"{n / MiB:.0f}"


@attrs.define
class Row:
    dataset: str
    mode: str
    runs: list[dict[str, Any]] = attrs.field(factory=list)

    def median(self, key: str) -> float:
        values = [float(r[key]) for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    def total(self) -> float:
        """Median wall time including a final syncfs (peers: their time plus one syncfs)."""
        if MODES[self.mode].peer is None:
            return self.median("wall")
        return statistics.median(float(r["wall"] + r["sync"]) for r in self.runs)

    def max(self, key: str) -> float:
        return max(float(r[key]) for r in self.runs)


def table(rows: Sequence[Row], metas: dict[str, dict[str, Any]]) -> str:
    head = (
        "| dataset | mode | runs | wall s | of which syncfs s | MB/s | CPU s | peak RSS MiB"
        " (importer + workers) | others' CPUs |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    lines = []
    for row in rows:
        mode = MODES[row.mode]
        wall = row.median("wall")
        sync = row.median("sync")
        if mode.peer is None:
            sync_text = "-" if not mode.final_sync else f"{sync:.2f}"
        else:
            sync_text = f"(+{sync:.2f})"
        rss = (
            f"{_fmt_mib(row.max('rss_main') + row.max('rss_workers'))}"
            f" ({_fmt_mib(row.max('rss_main'))} + {_fmt_mib(row.max('rss_workers'))})"
            if mode.peer is None
            else f"{_fmt_mib(row.max('rss_main'))} (largest process)"
        )
        mbps = metas[row.dataset]["tar_bytes"] / wall / 1e6
        lines.append(
            f"| {row.dataset} | {row.mode} | {len(row.runs)} | {wall:.2f} | {sync_text}"
            f" | {mbps:.0f} | {row.median('cpu'):.2f} | {rss} | {row.max('others'):.2f} |"
        )
    return head + "\n".join(lines) + "\n"


RATIOS = [
    # (label, faster mode, slower mode, compare totals incl. a final syncfs?)
    ("parallel vs seq-fdatasync", "parallel", "seq-fdatasync", True),
    ("parallel vs seq (target ≥ 1.8x)", "parallel", "seq", True),
    ("parallel vs ostree (target ≥ 3x)", "parallel", "ostree", True),
    ("parallel vs tar+fsverity, both with a syncfs", "parallel", "tar+fsverity", True),
    ("parallel-nosync vs seq-nosync", "parallel-nosync", "seq-nosync", False),
    ("parallel-nosync vs tar+fsverity (target ≥ 1.0x)", "parallel-nosync", "tar+fsverity", False),
    ("parallel-nosync vs tar", "parallel-nosync", "tar", False),
]


def ratios(rows: Sequence[Row]) -> str:
    by_key = {(r.dataset, r.mode): r for r in rows}
    out = ["| dataset | ratio | speed-up |", "|---|---|--:|"]
    for ds in dict.fromkeys(r.dataset for r in rows):
        for label, fast, slow, with_sync in RATIOS:
            a, b = by_key.get((ds, fast)), by_key.get((ds, slow))
            if a is None or b is None:
                continue
            ta = a.total() if with_sync else a.median("wall")
            tb = b.total() if with_sync else b.median("wall")
            out.append(f"| {ds} | {label} | {tb / ta:.2f}x |")
    return "\n".join(out) + "\n"


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(datasets(False)))
    parser.add_argument("--modes", default=None, help="default: all (fewer for huge, million)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scratch", choices=("ext4", "tmpfs"), default="ext4")
    parser.add_argument("--keep", action="store_true", help="keep the tars (and reuse them)")
    parser.add_argument("--quick", action="store_true", help="small datasets, one run each")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "DATASET"), help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    all_ds = datasets(args.quick)

    if args.one:
        mode, ds = MODES[args.one[0]], all_ds[args.one[1]]
        meta = json.loads(ds.tar_path().with_suffix(".json").read_text())
        print(json.dumps(run_one(mode, ds.tar_path(), meta["diff_id"], args.repo)))
        return

    if os.geteuid() != 0:
        sys.exit("needs root (mkfs, mount)")
    names = [n for n in args.datasets.split(",") if n]
    runs = 1 if args.quick else args.runs
    unknown = [n for n in names if n not in all_ds]
    if unknown:
        sys.exit(f"unknown datasets {unknown}; known: {list(all_ds)}")
    plan: list[tuple[Dataset, list[Mode], int]] = []
    missing: list[str] = []
    for name in names:
        wanted = args.modes.split(",") if args.modes else DEFAULT_MODES_FOR.get(name, DEFAULT_MODES)
        modes = []
        for m in wanted:
            mode = MODES[m]
            tool = {"tar+fsverity": "fsverity", "ostree": "ostree"}.get(m)
            if tool and shutil.which(tool) is None:
                missing.append(f"{m} ({tool} not installed)")
                continue
            modes.append(mode)
        plan.append((all_ds[name], modes, 1 if name in RUN_ONCE else runs))

    started = datetime.now(UTC)
    print(f"# bench_import, {started:%Y-%m-%d %H:%M} UTC", flush=True)
    print(
        f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.0f} GiB RAM, "
        f"{platform.platform()}, Python {platform.python_version()}; "
        f"scratch: fresh {'loop-mounted ext4 image' if args.scratch == 'ext4' else 'tmpfs'}"
        " per run; load before: " + Path("/proc/loadavg").read_text().strip(),
        flush=True,
    )
    for m in dict.fromkeys(missing):
        print(f"skipped: {m}", flush=True)
    metas: dict[str, dict[str, Any]] = {}
    try:
        for ds, _, _ in plan:
            metas[ds.name] = ensure_tar(ds)
        rows: list[Row] = []
        for ds, modes, n in plan:
            meta = metas[ds.name]
            print(
                f"\n{ds.name}: {ds.describe}; tar {meta['tar_bytes'] / 1e9:.3f} GB,"
                f" {meta['objects']:,} objects ({meta['distinct_objects']:,} distinct)",
                flush=True,
            )
            ds_rows = {m.name: Row(ds.name, m.name) for m in modes}
            for i in range(n):
                for mode in modes:
                    r = _spawn_one(mode, ds, meta, args.scratch, args.quick)
                    _check(r, mode, meta, ds_rows)
                    ds_rows[mode.name].runs.append(r)
                    print(
                        f"  run {i + 1} {mode.name:16} wall {r['wall']:7.2f} s"
                        f"  cpu {r['cpu']:7.2f} s  rss {_fmt_mib(r['rss_main'])}"
                        f"+{_fmt_mib(r['rss_workers'])} MiB  others {r['others']:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
            rows.extend(ds_rows.values())
        print()
        print(table(rows, metas))
        print(ratios(rows))
        print(f"total time {(datetime.now(UTC) - started).total_seconds() / 60:.1f} min")
    finally:
        if not args.keep:
            for ds, _, _ in plan:
                ds.tar_path().unlink(missing_ok=True)
                ds.tar_path().with_suffix(".json").unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # only when empty
                (WORK_DIR / "mnt").rmdir()
                WORK_DIR.rmdir()


def _check(result: dict[str, Any], mode: Mode, meta: dict[str, Any], rows: dict[str, Row]) -> None:
    """Our modes must all store the same objects and produce the same splitstream."""
    if mode.peer is not None:
        return
    if result["objects"] != meta["objects"]:
        raise SystemExit(f"{mode.name}: {result['objects']} objects, expected {meta['objects']}")
    if result["written"] != meta["distinct_objects"]:
        raise SystemExit(
            f"{mode.name}: wrote {result['written']} objects, expected {meta['distinct_objects']}"
        )
    for row in rows.values():
        for other in row.runs:
            if "splitstream" in other and other["splitstream"] != result["splitstream"]:
                raise SystemExit(f"{mode.name}: splitstream differs from {row.mode}'s")


if __name__ == "__main__":
    main()
