"""HashPool and digest_fd against the one-shot hasher (itself checked against the fsverity tool)."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trio_composefs import ComposefsError
from trio_composefs.formats import BLOCK_SIZE, Algorithm, fsverity_digest, level1_group_size
from trio_composefs.formats._fsverity import digest_from_level1, level1_digests
from trio_composefs.hashing._pool import HashPool, HashPoolStatistics, _split, digest_fd

MIB = 1 << 20
G256 = level1_group_size(Algorithm.SHA256)  # 512 KiB
G512 = level1_group_size(Algorithm.SHA512)  # 256 KiB
DATA = random.Random(208).randbytes(34 * MIB + 12345)


def _sizes(group: int) -> list[int]:
    base = {0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE, 100_000}
    for n in (group, 2 * group, 3 * group, MIB, 16 * MIB, 32 * MIB, 2 * group * group // 4096):
        base |= {n - 1, n, n + 1}
    base |= {3 * group + 1234, len(DATA)}
    return sorted(s for s in base if s <= len(DATA))


CASES = [(alg, n) for alg in Algorithm for n in _sizes(level1_group_size(alg))]


@pytest.fixture(scope="module")
def data_fd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    path = tmp_path_factory.mktemp("hashpool") / "data"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture(scope="module")
def expected() -> dict[tuple[Algorithm, int], str]:
    return {(alg, n): fsverity_digest(DATA[:n], alg).hex() for alg, n in CASES}


@pytest.fixture(scope="module")
def split_pool() -> Iterator[HashPool]:
    """Two workers; everything from two blocks up is split over them."""
    with HashPool(2, threshold=0, inline_below=0) as pool:
        yield pool


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_split_ranges_are_group_aligned_and_cover_the_file() -> None:
    for alg in Algorithm:
        group = level1_group_size(alg)
        for size in (BLOCK_SIZE + 1, group, group + 1, 5 * MIB + 3, 100 * MIB, 1 << 33):
            for workers in (1, 2, 3, 8):
                ranges = _split(size, alg, workers)
                assert ranges[0][0] == 0
                assert sum(length for _off, length in ranges) == size
                for (off, length), (next_off, _) in itertools.pairwise(ranges):
                    assert off % group == 0
                    assert length % group == 0
                    assert next_off == off + length
                assert len(ranges) <= -(-size // group)
                assert max(length for _o, length in ranges) <= 16 * MIB + group


@pytest.mark.parametrize(("alg", "size"), CASES, ids=[f"{a.hash_name}-{n}" for a, n in CASES])
def test_digest_fd_single_thread(
    data_fd: int, expected: dict[tuple[Algorithm, int], str], alg: Algorithm, size: int
) -> None:
    assert digest_fd(data_fd, size, alg).hex() == expected[(alg, size)]


@pytest.mark.parametrize(("alg", "size"), CASES, ids=[f"{a.hash_name}-{n}" for a, n in CASES])
def test_pool_split(
    split_pool: HashPool,
    data_fd: int,
    expected: dict[tuple[Algorithm, int], str],
    alg: Algorithm,
    size: int,
) -> None:
    before = split_pool.statistics()
    digest = split_pool.digest_fd(data_fd, size, alg)
    assert digest.algorithm is alg
    assert digest.hex() == expected[(alg, size)]
    after = split_pool.statistics()
    # inline_below is raised to one block + 1: one-block files have no level-1 digests.
    assert after.files_split - before.files_split == (size > BLOCK_SIZE)
    assert after.bytes_hashed - before.bytes_hashed == size


def test_pool_default_thresholds_single_caller(
    data_fd: int, expected: dict[tuple[Algorithm, int], str]
) -> None:
    with HashPool(2) as pool:
        for size in (100_000, MIB - 1, MIB, 32 * MIB + 1):
            assert pool.digest_fd(data_fd, size).hex() == expected[(Algorithm.SHA256, size)]
        stats = pool.statistics()
    # One caller: files under 1 MiB stay in the calling thread, larger ones are split.
    assert stats == HashPoolStatistics(
        files_inline=2,
        files_whole=0,
        files_split=2,
        jobs=stats.jobs,
        bytes_hashed=100_000 + 2 * MIB - 1 + 32 * MIB + 1,
        workers_replaced=0,
    )
    assert stats.jobs == 2 + 4


def test_many_threads_at_once(data_fd: int) -> None:
    rng = random.Random(7)
    work = [
        (
            rng.choice(list(Algorithm)),
            rng.choice([rng.randrange(len(DATA)), rng.randrange(3 * MIB)]),
        )
        for _ in range(36)
    ]
    want = [fsverity_digest(DATA[:n], alg) for alg, n in work]
    got: list[object] = [None] * len(work)
    start = threading.Barrier(6)

    def run(pool: HashPool, k: int) -> None:
        start.wait()
        for i in range(k, len(work), 6):
            alg, n = work[i]
            got[i] = pool.digest_fd(data_fd, n, alg)

    with HashPool(2) as pool:
        threads = [threading.Thread(target=run, args=(pool, k)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = pool.statistics()
    assert got == want
    assert stats.files_inline + stats.files_whole + stats.files_split == len(work)
    # Concurrent callers send sub-threshold files whole to a worker.
    assert stats.files_whole > 0


async def test_from_trio_threads_with_a_pool_made_inside_trio(data_fd: int) -> None:
    sizes = [5 * MIB + 1, 200 * 1024, 40_000, 3 * G256 - 1, 7, 12 * MIB]
    results: dict[int, str] = {}
    limiter = trio.CapacityLimiter(4)
    with HashPool() as pool:

        async def one(size: int) -> None:
            digest = await trio.to_thread.run_sync(pool.digest_fd, data_fd, size, limiter=limiter)
            results[size] = digest.hex()

        async with trio.open_nursery() as nursery:
            for size in sizes:
                nursery.start_soon(one, size)
    assert results == {n: fsverity_digest(DATA[:n]).hex() for n in sizes}


def _reaped(pid: int) -> bool:
    """Whether ``pid`` is no child of ours any more, not even a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def _children() -> set[int]:
    """Our child processes, from /proc (zombies included)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat.rpartition(")")[2].split()[1]) == os.getpid():
            out.add(int(entry))
    return out


def test_close_leaves_no_fd_process_or_thread_behind(data_fd: int) -> None:
    fds_before = _open_fds()
    threads_before = set(threading.enumerate())
    children_before = _children()
    pool = HashPool(2, threshold=0)
    assert pool.worker_pids() == []  # started on first use
    assert _open_fds() == fds_before
    assert set(threading.enumerate()) == threads_before
    assert pool.digest_fd(data_fd, 3 * MIB) == fsverity_digest(DATA[: 3 * MIB])
    pids = pool.worker_pids()
    assert len(pids) == 2
    assert all(_alive(pid) for pid in pids)
    # Our own children (no fork server, no resource tracker), each with its socket here.
    assert _children() - children_before == set(pids)
    assert len(_open_fds() - fds_before) == 2
    assert len(set(threading.enumerate()) - threads_before) == 1  # the launcher
    pool.close()
    assert pool.closed
    assert pool.worker_pids() == []
    assert all(_reaped(pid) for pid in pids)
    assert _open_fds() == fds_before
    assert set(threading.enumerate()) == threads_before
    assert _children() == children_before
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="HashPool is closed"):
        pool.digest_fd(data_fd, 3 * MIB)
    with pytest.raises(RuntimeError, match="HashPool is closed"):
        pool.digest_fd(data_fd, 10)


def test_close_waits_for_a_call_in_progress(data_fd: int) -> None:
    pool = HashPool(1, threshold=0)
    pool.digest_fd(data_fd, MIB)  # start the worker
    result: list[object] = []
    caller = threading.Thread(target=lambda: result.append(pool.digest_fd(data_fd, len(DATA))))
    caller.start()
    while pool.statistics().idle_workers and not result:  # until the caller holds the worker
        time.sleep(0.0005)
    pool.close()
    caller.join()
    assert result == [fsverity_digest(DATA)]


def test_file_shorter_than_size(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(DATA[: 2 * MIB])
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ComposefsError, match="file ended at byte 2097152"):
            digest_fd(fd, 2 * MIB + 1)
        with HashPool(2, threshold=0) as pool:
            with pytest.raises(ComposefsError, match="file ended at byte 2097152"):
                pool.digest_fd(fd, 3 * MIB)
            # The pool is still usable after a job failed.
            assert pool.digest_fd(fd, 2 * MIB) == fsverity_digest(DATA[: 2 * MIB])
            assert pool.statistics().workers_replaced == 0
    finally:
        os.close(fd)


def test_unreadable_fd_raises_oserror(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, DATA[:MIB])
        with pytest.raises(OSError, match="Bad file descriptor"):
            digest_fd(fd, MIB)
        with HashPool(1, threshold=0) as pool, pytest.raises(OSError, match="Bad file"):
            pool.digest_fd(fd, MIB)
    finally:
        os.close(fd)


def test_dead_worker_is_reported_and_replaced(data_fd: int) -> None:
    with HashPool(1, threshold=0) as pool:
        assert pool.digest_fd(data_fd, MIB) == fsverity_digest(DATA[:MIB])
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.001)
        with pytest.raises(ComposefsError, match=f"hash worker {pid}"):
            pool.digest_fd(data_fd, MIB)
        assert pool.statistics().workers_replaced == 1
        assert pool.worker_pids() != [pid]
        assert pool.digest_fd(data_fd, MIB) == fsverity_digest(DATA[:MIB])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        HashPool(0)
    with HashPool() as pool:
        assert pool.workers == os.cpu_count()


def test_worker_killed_in_the_middle_of_a_job() -> None:
    # /dev/zero never ends: a terabyte keeps the single worker busy until it is killed.
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        with HashPool(1, threshold=0) as pool:
            assert pool.digest_fd(fd, 3 * MIB) == fsverity_digest(bytes(3 * MIB))
            (pid,) = pool.worker_pids()
            killer = threading.Thread(target=_kill_when_busy, args=(pool, pid))
            killer.start()
            try:
                with pytest.raises(ComposefsError, match=rf"hash worker {pid} .*exit code -9"):
                    pool.digest_fd(fd, 1 << 40)
            finally:
                killer.join()
            assert pool.statistics().workers_replaced == 1
            assert pool.digest_fd(fd, 3 * MIB) == fsverity_digest(bytes(3 * MIB))
    finally:
        os.close(fd)


def _kill_when_busy(pool: HashPool, pid: int) -> None:
    while pool.statistics().idle_workers:  # until the caller has borrowed the worker
        time.sleep(0.001)
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_close_fails_a_caller_waiting_for_a_worker_and_lets_the_busy_one_finish() -> None:
    zero = os.open("/dev/zero", os.O_RDONLY)
    size = 160 * MIB  # about a quarter of a second for one SHA-512 worker
    outcomes: dict[str, object] = {}

    def call(name: str, n: int) -> None:
        try:
            outcomes[name] = pool.digest_fd(zero, n, Algorithm.SHA512)
        except RuntimeError as exc:
            outcomes[name] = exc

    try:
        pool = HashPool(1, threshold=0)
        busy = threading.Thread(target=call, args=("busy", size))
        busy.start()
        while (s := pool.statistics()).idle_workers or not s.workers:  # "busy" holds the worker
            time.sleep(0.001)
        waiting = threading.Thread(target=call, args=("waiting", 2 * MIB))
        waiting.start()
        while pool.statistics().callers < 2:
            time.sleep(0.001)
        pool.close()
        busy.join()
        waiting.join()
    finally:
        os.close(zero)
    assert outcomes["busy"] == fsverity_digest(bytes(size), Algorithm.SHA512)
    assert isinstance(outcomes["waiting"], RuntimeError)
    assert "HashPool is closed" in str(outcomes["waiting"])


def test_worker_inherits_only_its_socket_and_ignores_sigint(data_fd: int) -> None:
    # data_fd, and this one, are open here and must not reach the worker.
    stray = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(stray, True)
    try:
        with HashPool(1, threshold=0) as pool:
            assert pool.digest_fd(data_fd, MIB) == fsverity_digest(DATA[:MIB])
            (pid,) = pool.worker_pids()
            fds = {
                int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
            }
            assert len(fds) == 4, fds
            assert fds[0] == fds[1] == "/dev/null"
            (sock,) = (target for fd, target in fds.items() if fd > 2)
            assert sock.startswith("socket:")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[1:4] == [b"-P", b"-m", b"trio_composefs.hashing._worker"]
            status = Path(f"/proc/{pid}/status").read_text()
            (ignored,) = (int(x.split()[1], 16) for x in status.splitlines() if x[:7] == "SigIgn:")
            assert ignored & (1 << (signal.SIGINT - 1))
            os.kill(pid, signal.SIGINT)
            assert pool.digest_fd(data_fd, 2 * MIB) == fsverity_digest(DATA[: 2 * MIB])
            assert pool.worker_pids() == [pid]
    finally:
        os.close(stray)


def test_worker_imports_neither_trio_nor_the_package_init() -> None:
    # The worker runs as ``python -P -m trio_composefs.hashing._worker``: importing it must
    # not run the pool's or the importer's imports (the package roots are lazy).
    code = "import sys, trio_composefs.hashing._worker; print(*sorted(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "trio_composefs.hashing._worker" in out
    assert "trio_composefs.formats._fsverity" in out
    heavy = [m for m in out if m.partition(".")[0] in ("trio", "multiprocessing", "concurrent")]
    assert heavy == []
    assert "trio_composefs.hashing._pool" not in out
    assert "trio_composefs.importer._importer" not in out


def test_workers_outlive_the_thread_that_started_them(data_fd: int) -> None:
    # Linux sends the parent-death signal when the *thread* that forked a
    # process exits; trio retires idle worker threads after a while.
    with HashPool(2, threshold=0) as pool:
        first = threading.Thread(target=pool.digest_fd, args=(data_fd, 3 * MIB))
        first.start()
        first.join()
        pids = pool.worker_pids()
        time.sleep(0.2)
        assert all(_alive(pid) for pid in pids)
        assert pool.digest_fd(data_fd, 3 * MIB) == fsverity_digest(DATA[: 3 * MIB])
        assert pool.worker_pids() == pids
        assert pool.statistics().workers_replaced == 0


def _run_script(
    path: Path, source: str, *args: str, process_group: int | None = None
) -> subprocess.Popen[str]:
    """Start ``source`` as a Python script at ``path``, with its output piped."""
    path.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=process_group,
    )


def test_a_script_without_main_guard(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(DATA[: 5 * MIB + 7])
    runs = tmp_path / "runs"
    script = f"""
        import os
        from trio_composefs.hashing._pool import HashPool

        with open({str(runs)!r}, "a") as f:
            f.write("ran\\n")
        fd = os.open({str(data)!r}, os.O_RDONLY)
        with HashPool(2, threshold=0) as pool:
            print(pool.digest_fd(fd, os.fstat(fd).st_size))
            print(pool.statistics().files_split)
    """
    proc = _run_script(tmp_path / "no_guard.py", script)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")
    assert out.split() == [fsverity_digest(DATA[: 5 * MIB + 7]).hex(), "1"]
    assert runs.read_text() == "ran\n"  # only the parent ran the script


_USE_POOL_AND_WAIT = """
    import os, signal, sys, threading, time
    from trio_composefs.hashing._pool import HashPool

    pool = HashPool(2, threshold=0)
    fd = os.open("/dev/zero", os.O_RDONLY)
    pool.digest_fd(fd, 4 << 20)
    if sys.argv[-1] == "busy":  # keep both workers going through 16 MiB jobs
        threading.Thread(target=pool.digest_fd, args=(fd, 1 << 40), daemon=True).start()
        time.sleep(0.2)
    if sys.argv[-1] == "stopped":  # they cannot read EOF: only PR_SET_PDEATHSIG ends them
        for pid in pool.worker_pids():
            os.kill(pid, signal.SIGSTOP)
            while open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "T":
                time.sleep(0.001)
    print(*pool.worker_pids(), flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("state", ["idle", "busy", "stopped"])
def test_workers_exit_when_the_parent_is_killed(tmp_path: Path, state: str) -> None:
    proc = _run_script(tmp_path / "parent.py", _USE_POOL_AND_WAIT, state)
    assert proc.stdout is not None
    assert proc.stderr is not None
    pids: list[int] = []
    try:
        pids = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(pids) == 2
        assert all(_alive(pid) for pid in pids)
        if state == "stopped":
            assert all(Path(f"/proc/{pid}/stat").read_text().split()[2] == "T" for pid in pids)
        proc.kill()
        proc.wait()  # not communicate(): surviving workers would hold its stderr open
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(_alive(pid) for pid in pids)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        for pid in pids:  # survivors of a failed test
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_reaches_the_parent_only(tmp_path: Path) -> None:
    script = """
        import os, time
        from trio_composefs.hashing._pool import HashPool

        fd = os.open("/dev/zero", os.O_RDONLY)
        try:
            with HashPool(2, threshold=0) as pool:
                pool.digest_fd(fd, 4 << 20)
                print("ready", flush=True)
                time.sleep(60)
        except KeyboardInterrupt:
            print(*pool.statistics().stopped_exit_codes, pool.worker_pids())
    """
    # Its own process group, like a shell job in a terminal.
    proc = _run_script(tmp_path / "ctrl_c.py", script, process_group=0)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    # The workers were still alive to read EOF when the parent closed the pool.
    assert (out, err) == ("0 0 []\n", "")


@pytest.mark.parametrize("algorithm", [Algorithm.SHA256, Algorithm.SHA512])
def test_digest_fds_hashes_a_batch_of_files_concurrently(
    tmp_path: Path, algorithm: Algorithm
) -> None:
    sizes = [0, 1, 4096, 40_000, 200 * 1024, 700_000, (1 << 20) + 5, 33 * 1024]
    rnd = random.Random(7)
    contents = [rnd.randbytes(n) for n in sizes]
    fds = []
    try:
        for i, data in enumerate(contents):
            path = tmp_path / f"f{i}"
            path.write_bytes(data)
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        with HashPool(2) as pool:
            got = pool.digest_fds(list(zip(fds, sizes, strict=True)), algorithm)
            stats = pool.statistics()
        assert [d.hex() for d in got] == [fsverity_digest(c, algorithm).hex() for c in contents]
        # the files between 32 KiB and 1 MiB went to the workers, whole
        assert stats.files_whole == 4
    finally:
        for fd in fds:
            os.close(fd)


LEVEL1_CASES = [(alg, n) for alg, n in CASES if n > BLOCK_SIZE]


@pytest.mark.parametrize(
    ("alg", "size"), LEVEL1_CASES, ids=[f"{a.hash_name}-{n}" for a, n in LEVEL1_CASES]
)
@pytest.mark.parametrize("threshold", [0, 1 << 20], ids=["split", "default"])
def test_level1_fd_gives_each_group_digest(
    data_fd: int,
    expected: dict[tuple[Algorithm, int], str],
    alg: Algorithm,
    size: int,
    threshold: int,
) -> None:
    """``level1_fd``: one digest per group, each that of the group hashed alone, and
    together they finish into the file's digest (checked against the oracle)."""
    with HashPool(2, threshold=threshold) as pool:
        level1 = pool.level1_fd(data_fd, size, alg)
    group = level1_group_size(alg)
    assert len(level1) == -(-size // group) * alg.digest_size
    assert digest_from_level1(alg, size, level1).hex() == expected[(alg, size)]
    last = (size - 1) // group
    for i in sorted({0, last // 2, last}):
        one = level1_digests(DATA[i * group : min(size, (i + 1) * group)], alg)
        assert level1[i * alg.digest_size : (i + 1) * alg.digest_size] == one


def test_level1_fd_refuses_one_block(data_fd: int) -> None:
    with HashPool(1) as pool, pytest.raises(ValueError, match="no level-1 digests"):
        pool.level1_fd(data_fd, BLOCK_SIZE)
