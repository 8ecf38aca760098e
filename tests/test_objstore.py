"""Small objects stored by the hash processes (``HashPool.store_objects``), checked with the
``fsverity`` tool (every stored file's name must be its digest) and against the per-object path."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from checks import assert_consistent, busy_threads
from trio_composefs import ComposefsError, VerityUnsupportedError
from trio_composefs.formats import BLOCK_SIZE, Algorithm, fsverity_digest
from trio_composefs.hashing import _pool
from trio_composefs.hashing._objstore import TMP_OBJECT_PREFIX, store_objects
from trio_composefs.hashing._pool import STORE_MAX_OBJECTS, HashPool
from trio_composefs.importer import layer_content_id, open_importer
from trio_composefs.repository import Repository
from trio_composefs.testing import FaultyRepository, open_fds

_RNG = random.Random(20261203)
SIZES = [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE, 100_000] + [
    _RNG.randint(0, BLOCK_SIZE) for _ in range(12)
]


def _objects(sizes: list[int], seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in sizes]


def _tool_digests(paths: list[Path], alg: Algorithm) -> list[str]:
    """``fsverity digest`` of each file, in order (the independent oracle)."""
    tool = shutil.which("fsverity")
    if tool is None:
        pytest.skip("the fsverity tool (fsverity-utils) is not installed")
    out = subprocess.run(
        [tool, "digest", f"--hash-alg={alg.hash_name}", "--block-size=4096", *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    by_path = {}
    for line in out.splitlines():
        tagged, _, name = line.partition(" ")
        by_path[name] = tagged.partition(":")[2]
    return [by_path[str(p)] for p in paths]


def _stored_files(objects: Path) -> list[Path]:
    return sorted(p for p in objects.rglob("*") if p.is_file())


@pytest.fixture
def objects_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "objects"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    yield path, fd
    os.close(fd)


@pytest.mark.parametrize("named", [False, True], ids=["tmpfile", "named"])
@pytest.mark.parametrize("alg", list(Algorithm), ids=lambda a: a.hash_name)
def test_store_objects_names_each_file_by_the_tools_digest(
    objects_dir: tuple[Path, int], alg: Algorithm, named: bool
) -> None:
    path, fd = objects_dir
    datas = _objects(SIZES)
    reply = store_objects(fd, memoryview(b"".join(datas)), SIZES, alg, named=named)
    width = alg.digest_size + 1
    assert len(reply) == width * len(SIZES)
    raws = [reply[i : i + alg.digest_size] for i in range(0, len(reply), width)]
    assert [reply[i + width - 1] for i in range(0, len(reply), width)] == [0] * len(SIZES)
    stored = [path / f"{raw.hex()[:2]}/{raw.hex()[2:]}" for raw in raws]
    assert [p.read_bytes() for p in stored] == datas
    assert _tool_digests(stored, alg) == [raw.hex() for raw in raws]
    assert sorted(stored) == _stored_files(path)  # nothing else, no temporary file left
    assert not [p for p in path.iterdir() if p.name.startswith(TMP_OBJECT_PREFIX)]
    # Again: every object is present already, and the new copies vanish.
    again = store_objects(fd, memoryview(b"".join(datas)), SIZES, alg, named=named)
    assert again[alg.digest_size :: width] == b"\1" * len(SIZES)
    assert _stored_files(path) == sorted(stored)


def test_store_objects_duplicates_within_one_batch(objects_dir: tuple[Path, int]) -> None:
    path, fd = objects_dir
    data = b"same bytes" * 50
    reply = store_objects(fd, memoryview(data * 3), [len(data)] * 3, Algorithm.SHA256)
    assert reply[32::33] == b"\0\1\1"
    assert len(_stored_files(path)) == 1


def test_store_objects_refuses_sizes_that_do_not_add_up(objects_dir: tuple[Path, int]) -> None:
    path, fd = objects_dir
    with pytest.raises(ValueError, match="add up to 5, the batch has 6"):
        store_objects(fd, memoryview(b"abcdef"), [2, 3], Algorithm.SHA256)
    assert list(path.iterdir()) == []


def test_a_batch_failing_mid_write_names_nothing(
    objects_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = objects_dir
    datas = _objects([100, 200, 300])
    real_write = os.write
    calls: list[int] = []

    def failing_write(wfd: int, data: memoryview) -> int:
        calls.append(wfd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device (test)")
        return real_write(wfd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        store_objects(fd, memoryview(b"".join(datas)), [100, 200, 300], Algorithm.SHA256)
    monkeypatch.undo()
    assert list(path.iterdir()) == []  # the first two were written but never named
    assert len(calls) == 3


# --- through the pool's worker processes ------------------------------------------------


def test_pool_store_objects_matches_the_tool(objects_dir: tuple[Path, int]) -> None:
    path, fd = objects_dir
    datas = _objects(SIZES, seed=2)
    # Objects given in pieces of any shape, empty ones included.
    pieces = [[d[:1], b"", d[1:]] if d else [] for d in datas]
    with HashPool(2) as pool:
        results = pool.store_objects(fd, pieces, Algorithm.SHA512)
        stats = pool.statistics()
    assert [present for _, present in results] == [False] * len(SIZES)
    stored = [path / digest.object_path() for digest, _ in results]
    assert [p.read_bytes() for p in stored] == datas
    assert _tool_digests(stored, Algorithm.SHA512) == [d.hex() for d, _ in results]
    assert stats.objects_stored == len(SIZES)
    assert stats.bytes_hashed == sum(SIZES)
    assert stats.workers_replaced == 0


def test_pool_store_objects_limits(objects_dir: tuple[Path, int]) -> None:
    _path, fd = objects_dir
    with HashPool(1) as pool:
        with pytest.raises(ValueError, match="at most 256"):
            pool.store_objects(fd, [[b"x"]] * (STORE_MAX_OBJECTS + 1))
        assert pool.store_objects(fd, []) == []
        pool.close()
        with pytest.raises(RuntimeError, match="closed"):
            pool.store_objects(fd, [[b"x"]])


def test_pool_store_objects_reraises_the_workers_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    fd = os.open(not_a_dir, os.O_RDONLY)
    try:
        with HashPool(1) as pool:
            with pytest.raises(NotADirectoryError):
                pool.store_objects(fd, [[b"abc"]])
            assert pool.statistics().workers_replaced == 0  # an error is not a death
    finally:
        os.close(fd)


@pytest.mark.parametrize("named", [False, True], ids=["tmpfile", "named"])
def test_worker_killed_mid_batch_names_nothing(objects_dir: tuple[Path, int], named: bool) -> None:
    path, fd = objects_dir
    datas = _objects([1000] * 40, seed=3)
    with HashPool(1) as pool:
        token = _pool.JOB_FAULT.set(lambda: True)
        try:
            with pytest.raises(ComposefsError, match=r"hash worker \d+ died \(exit code -9\)"):
                pool.store_objects(fd, [[d] for d in datas], named_tmpfiles=named)
        finally:
            _pool.JOB_FAULT.reset(token)
        # Half of the batch was written, none of it named.
        files = _stored_files(path)
        assert all(p.parent == path and p.name.startswith(TMP_OBJECT_PREFIX) for p in files)
        assert len(files) == (20 if named else 0)  # a crash leaves named tmpfiles (fsck's)
        results = pool.store_objects(fd, [[d] for d in datas], named_tmpfiles=named)
        assert pool.statistics().workers_replaced == 1
    assert [d for d, _ in results] == [fsverity_digest(d) for d in datas]


# --- the importer ------------------------------------------------------------------------


def _small_files_tar(count: int, seed: int = 5) -> bytes:
    rng = random.Random(seed)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(count):
            data = rng.randbytes(
                rng.choice([0, 1, 65, 100, 4095, 4096, 4097, rng.randint(0, 9000)])
            )
            if i % 7 == 0:
                data = b"duplicate " * 20  # the same object many times
            info = tarfile.TarInfo(f"d{i % 5}/f{i}")
            info.size = len(data)
            info.mtime = 1234567890
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


@pytest.mark.parametrize("named", [False, True], ids=["tmpfile", "named"])
async def test_import_through_the_workers_equals_the_per_object_path(
    tmp_path: Path, named: bool
) -> None:
    tar = _small_files_tar(700)
    did = _diff_id(tar)
    results = {}
    for mode, processes in (("workers", 2), ("threads", 0)):
        path = tmp_path / mode
        with Repository.init(path, algorithm=Algorithm.SHA256, insecure=True) as repo:
            repo.force_named_tmpfile = named
            async with open_importer(repo, hash_processes=processes) as importer:
                stats = await importer.import_layer([tar], did)
                pool = importer.hash_pool
                stored = 0 if pool is None else pool.statistics().objects_stored
            assert (stored > 0) == (processes > 0)
            # The first batches may go through threads: small ones do not start workers.
            assert stored <= stats.objects
            assert stats.objects_written + stats.objects_deduplicated == stats.objects
            results[mode] = (
                stats.splitstream,
                stats.objects_written,
                stats.objects_deduplicated,
                sorted(p.relative_to(path) for p in (path / "objects").rglob("*")),
            )
        assert_consistent(path, Algorithm.SHA256)
        assert not [p for p in (path / "objects").iterdir() if p.name.startswith(".tmp")]
    assert results["workers"] == results["threads"]


async def test_import_with_a_worker_killed_mid_batch_publishes_nothing(tmp_path: Path) -> None:
    tar = _small_files_tar(600, seed=6)
    did = _diff_id(tar)
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        repo.begin_object().abort()  # open the lazy dir fds before counting
        faulty = FaultyRepository(repo).kill_hash_worker(nth=2)
        fds = open_fds()
        with pytest.RaisesGroup(
            pytest.RaisesExc(ComposefsError, match="hash worker .* died"), flatten_subgroups=True
        ):
            async with open_importer(faulty, hash_processes=2) as importer:
                await importer.import_layer([tar], did)
        assert open_fds() == fds
        assert repo.has_stream(layer_content_id(did)) is None
        assert_consistent(Path(repo.path), repo.algorithm)
        assert busy_threads() == []
        async with open_importer(repo, hash_processes=2) as importer:
            stats = await importer.import_layer([tar], did)
        assert repo.has_stream(layer_content_id(did)) == stats.splitstream


async def test_import_cancelled_while_workers_store(tmp_path: Path) -> None:
    tar = _small_files_tar(3000, seed=7)
    did = _diff_id(tar)
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        async with open_importer(repo, hash_processes=2) as importer:
            with trio.move_on_after(0.05):
                await importer.import_layer([tar], did)
        assert repo.has_stream(layer_content_id(did)) is None
        assert_consistent(Path(repo.path), repo.algorithm)
        assert busy_threads() == []


def test_faulty_repository_keeps_object_faults_on_the_per_object_path(tmp_path: Path) -> None:
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        assert repo.helper_store_target() is not None
        assert FaultyRepository(repo).helper_store_target() == repo.helper_store_target()
        for point in ("begin", "write", "finish"):
            faulty = FaultyRepository(repo)
            faulty.fail(point, nth=1)
            assert faulty.helper_store_target() is None
        assert FaultyRepository(repo, write_delay=0.01).helper_store_target() is None
        assert FaultyRepository(repo).fail("sync").helper_store_target() is not None


def test_secure_repository_without_verity_refuses(tmp_path: Path) -> None:
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        if repo.verity_supported:
            pytest.skip("this filesystem has fs-verity: the kernel measures objects")
    with (
        Repository.open(tmp_path / "repo", insecure=False) as secure,
        pytest.raises(VerityUnsupportedError, match="lacks fs-verity"),
    ):
        secure.helper_store_target()


def test_link_falls_back_to_proc_where_at_empty_path_is_refused(
    objects_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without CAP_DAC_READ_SEARCH, linkat(AT_EMPTY_PATH) fails with ENOENT, like a
    # missing XX/ directory: the /proc path must take over (and XX/ still be made).
    from trio_composefs.hashing import _objstore

    calls: list[str] = []

    def refused(fd: int, empty: bytes, dirfd: int, path: bytes, flags: int) -> int:
        calls.append(path.decode())
        return -1

    monkeypatch.setattr(_objstore, "_empty_path_tried", True)
    monkeypatch.setattr(_objstore, "_linkat_empty", (refused, lambda: errno.ENOENT))
    path, fd = objects_dir
    datas = _objects([10, 20, 30], seed=9)
    reply = store_objects(fd, memoryview(b"".join(datas)), [10, 20, 30], Algorithm.SHA256)
    assert reply[32::33] == b"\0\0\0"
    assert sorted(p.read_bytes() for p in _stored_files(path)) == sorted(datas)
    assert _objstore._linkat_empty is None  # not tried again in this process
    # Tried for the first object only: before its XX/ existed, and once more after.
    assert calls == [calls[0], calls[0]]


def test_link_with_at_empty_path_reports_other_errors(
    objects_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_composefs.hashing import _objstore

    monkeypatch.setattr(_objstore, "_empty_path_tried", True)
    monkeypatch.setattr(_objstore, "_linkat_empty", (lambda *a: -1, lambda: errno.EMLINK))
    path, fd = objects_dir
    with pytest.raises(OSError, match="Too many links") as caught:
        store_objects(fd, memoryview(b"abc"), [3], Algorithm.SHA256)
    assert caught.value.errno == errno.EMLINK
    assert not _stored_files(path)


async def test_a_layer_of_a_few_small_files_starts_no_hash_process(tmp_path: Path) -> None:
    tar = _small_files_tar(20, seed=8)
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        async with open_importer(repo, hash_processes=2) as importer:
            stats = await importer.import_layer([tar], _diff_id(tar))
            pool = importer.hash_pool
            assert pool is not None
            assert not pool.has_workers
            assert pool.statistics().objects_stored == 0
        assert stats.objects_written > 0
        assert_consistent(Path(repo.path), repo.algorithm)


def test_the_worker_spells_the_repository_layout() -> None:
    """The hash worker imports no repository code (it starts lean), so it spells the two
    layout names it needs itself: they must be the layout module's."""
    from trio_composefs.hashing import _objstore
    from trio_composefs.repository import _layout

    assert _objstore.TMP_OBJECT_PREFIX == _layout.TMP_OBJECT_PREFIX
    for alg in (Algorithm.SHA256, Algorithm.SHA512):
        digest = fsverity_digest(b"x", alg)
        assert f"{_layout.OBJECTS}/{_objstore.object_name(digest.raw)}" == _layout.object_path(
            digest
        )
