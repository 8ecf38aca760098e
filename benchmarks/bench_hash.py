"""Throughput of fs-verity hashing of files: one thread, two threads, HashPool, fsverity(1).

Usage: python benchmarks/bench_hash.py [--size-mib N] [--runs N] [--dir DIR] [--alg sha256|sha512]

Writes N MiB of random files to a scratch directory (default: a new directory in
/dev/shm, a tmpfs, so the disk plays no part): half in 4 big files, half in
200 KiB files. Every method digests every file (open, hash, close) and the
median of ``--runs`` runs is reported, for all files and for each half. Results
are checked against each other. The last column is the most CPUs that other
processes on the machine used meanwhile (from /proc/stat): on a shared machine,
a row with a high value there is not a fair measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from trio_composefs.formats import Algorithm
from trio_composefs.hashing import HashPool, digest_fd

SMALL = 200 * 1024
BIG_FILES = 4

Method = Callable[[Sequence[Path]], dict[str, str]]


def _digest_files(files: Sequence[Path], hash_one: Callable[[int, int], str]) -> dict[str, str]:
    out = {}
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out[str(path)] = hash_one(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return out


def _halves(files: Sequence[Path]) -> list[list[Path]]:
    """Two lists of about equal bytes (files sorted by size, dealt alternately)."""
    ordered = sorted(files, key=lambda p: p.stat().st_size, reverse=True)
    return [ordered[0::2], ordered[1::2]]


def _in_threads(parts: Sequence[Sequence[Path]], run: Method) -> dict[str, str]:
    results: list[dict[str, str]] = [{} for _ in parts]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = run(parts[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    merged: dict[str, str] = {}
    for r in results:
        merged.update(r)
    return merged


def _deal(files: Sequence[Path], n: int) -> list[list[Path]]:
    return [list(files[i::n]) for i in range(n)]


def methods(alg: Algorithm, pool: HashPool, tool: str | None) -> dict[str, Method]:
    def one_thread(files: Sequence[Path]) -> dict[str, str]:
        return _digest_files(files, lambda fd, size: digest_fd(fd, size, alg).hex())

    def pooled(files: Sequence[Path]) -> dict[str, str]:
        return _digest_files(files, lambda fd, size: pool.digest_fd(fd, size, alg).hex())

    def run_tool(files: Sequence[Path]) -> dict[str, str]:
        assert tool is not None
        out = subprocess.run(
            [tool, "digest", f"--hash-alg={alg.hash_name}", "--block-size=4096", *map(str, files)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = {}
        for line in out.splitlines():
            tagged, _, name = line.partition(" ")
            result[name] = tagged.partition(":")[2]
        return result

    table: dict[str, Method] = {
        "FsVerityHasher, 1 thread": one_thread,
        "FsVerityHasher, 2 threads": lambda f: _in_threads(_halves(f), one_thread),
        "HashPool, 1 calling thread": pooled,
        "HashPool, 2 calling threads": lambda f: _in_threads(_halves(f), pooled),
        "HashPool, 8 calling threads": lambda f: _in_threads(_deal(f, 8), pooled),
    }
    if tool is not None:
        table["fsverity digest, 1 process"] = run_tool
        table["fsverity digest, 2 processes"] = lambda f: _in_threads(_halves(f), run_tool)
    return table


def make_files(root: Path, total: int) -> tuple[list[Path], list[Path]]:
    big_size = total // 2 // BIG_FILES
    big, small = [], []
    for i in range(BIG_FILES):
        path = root / f"big-{i}"
        with path.open("wb") as f:
            left = big_size + i * 4097  # sizes not aligned to anything
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                f.write(chunk)
                left -= len(chunk)
        big.append(path)
    blob = os.urandom(SMALL + 4096)
    for i in range(total // 2 // SMALL):
        path = root / f"small-{i:05d}"
        path.write_bytes(blob[i % 4096 : i % 4096 + SMALL])
        small.append(path)
    return big, small


_TICK = os.sysconf("SC_CLK_TCK")


def _system_busy() -> float:
    """CPU-seconds every process on the machine has used (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def _own_cpu(pool: HashPool) -> float:
    """CPU-seconds used by this process, its children and the pool's workers."""
    total = sum(os.times()[:4])  # self and waited-for children (the fsverity tool)
    for pid in pool.worker_pids():  # our children, but not waited for yet
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(stat[11]) + int(stat[12])) / _TICK
    return total


def measure(
    run: Method, files: Sequence[Path], runs: int, pool: HashPool
) -> tuple[float, float, dict[str, str]]:
    """Median seconds, mean CPUs used by *other* processes meanwhile, last result."""
    times = []
    result: dict[str, str] = {}
    busy0, own0 = _system_busy(), _own_cpu(pool)
    for _ in range(runs):
        t0 = time.perf_counter()
        result = run(files)
        times.append(time.perf_counter() - t0)
    others = (_system_busy() - busy0) - (_own_cpu(pool) - own0)
    return statistics.median(times), max(0.0, others / sum(times)), result


def worker_startup(path: Path, alg: Algorithm, pools: int = 5) -> tuple[float, float]:
    """Median seconds of a new pool's first call on ``path``, and of its second call.

    The first call starts the workers (one per CPU) and waits for them to answer.
    """
    first: list[float] = []
    second: list[float] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for _ in range(pools):
            with HashPool(threshold=0) as pool:
                for times in (first, second):
                    t0 = time.perf_counter()
                    pool.digest_fd(fd, size, alg)
                    times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(first), statistics.median(second)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="total MiB of files")
    parser.add_argument("--runs", type=int, default=5, help="runs per method (median)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch parent directory")
    parser.add_argument("--alg", choices=["sha256", "sha512"], default="sha256")
    args = parser.parse_args(argv)
    alg = Algorithm.from_name(args.alg)
    parent = args.dir or (Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None)
    tool = shutil.which("fsverity")

    scratch = Path(tempfile.mkdtemp(prefix="bench-hash-", dir=parent))
    try:
        big, small = make_files(scratch, args.size_mib << 20)
        sets = {"all": big + small, "big": big, "small": small}
        sizes = {name: sum(p.stat().st_size for p in files) for name, files in sets.items()}
        print(
            f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cpus,"
            f" {_cpu_model()}, Python {platform.python_version()}, {alg.hash_name}"
        )
        print(
            f"# files in {scratch}: {len(big)} x ~{sizes['big'] // len(big) >> 20} MiB"
            f" + {len(small)} x 200 KiB = {sizes['all'] / 2**20:.0f} MiB;"
            f" median of {args.runs} runs; load average before {os.getloadavg()[0]:.2f}"
        )
        first, later = worker_startup(small[0], alg)
        print(
            f"# worker start-up: a new pool's first call on a 200 KiB file {first * 1e3:.1f} ms,"
            f" its second {later * 1e3:.2f} ms (median of 5 pools of {os.cpu_count()} workers)"
        )
        header = f"| {'method':<30} |" + "".join(f" {k + ' MB/s':>11} |" for k in sets)
        print(header + " ratio (all) | others' CPUs |")
        print("|" + "-" * 32 + "|" + "------------:|" * (len(sets) + 2))
        reference: dict[str, str] | None = None
        base: float | None = None
        with HashPool() as pool:
            for name, run in methods(alg, pool, tool).items():
                cells = []
                others = []
                for set_name, files in sets.items():
                    median, other, result = measure(run, files, args.runs, pool)
                    others.append(other)
                    if reference is None and set_name == "all":
                        reference = result
                    assert reference is not None
                    wrong = [k for k, v in result.items() if reference[k] != v]
                    if wrong or len(result) != len(files):
                        sys.exit(f"{name}: wrong or missing digests for {wrong[:3]}")
                    rate = sizes[set_name] / median / 1e6
                    if set_name == "all":
                        base = base or rate
                        ratio = rate / base
                    cells.append(rate)
                print(
                    f"| {name:<30} |"
                    + "".join(f" {c:>11.0f} |" for c in cells)
                    + f" {ratio:>10.2f}x |"
                    + f" {max(others):>12.2f} |",
                    flush=True,
                )
            stats = pool.statistics()
        print(
            f"# load average after {os.getloadavg()[0]:.2f}; HashPool: {stats.files_inline} files"
            f" inline, {stats.files_whole} whole in a worker, {stats.files_split} split"
            f" into {stats.jobs - stats.files_whole} jobs"
        )
    finally:
        shutil.rmtree(scratch)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


if __name__ == "__main__":
    main()
