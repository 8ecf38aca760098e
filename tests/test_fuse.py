"""FUSE mounts of composefs images (``trio_composefs.fuse``), against the kernel mount.

The images and expected trees are those of the kernel mount tests: C ``mkcomposefs``
images of ``test_mount_kernel``'s source tree (objects named by the ``fsverity``
tool), compared entry by entry with that source tree by the same ``snapshot``; and
OCI images pulled into a repository (``test_mount_images``), compared with the
kernel mount of the same image and with ``umoci unpack``.

The FUSE server runs in the test's own trio run, so the mount is only ever touched
from worker threads (``trio.to_thread``) or other processes. Every mount is undone
in a ``finally`` (leaving the ``async with``); the autouse ``no_fuse_leftovers``
fixture checks with ``findmnt`` that no FUSE mount is left and unmounts any that is
(failing the test).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from test_mount_images import _read_all_but, rich, scan_mount, umoci_unpacked
from test_mount_kernel import _REASON as _KERNEL_REASON
from test_mount_kernel import Built, assert_same_tree, c_image
from test_mount_kernel import built as built
from treecompare import assert_same_tree as assert_same_fs
from trio_composefs.formats import Algorithm, Digest
from trio_composefs.fs import (
    Directory,
    ExternalFile,
    FileSystem,
    Leaf,
    Stat,
)
from trio_composefs.fs.erofs import read_erofs
from trio_composefs.fuse import fuse_available
from trio_composefs.hashing import HashPool

if fuse_available():
    from trio_composefs.fuse import mounted_fuse
from trio_composefs.mount import mount_image, mounted_image, unmount
from trio_composefs.repository import Repository, read_image, store_image

pytestmark = [
    pytest.mark.skipif(not fuse_available(), reason="pyfuse3 is not installed"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fusermount3 missing"),
]

__all__ = ["built", "c_image", "rich"]

CLI = [sys.executable, "-m", "trio_composefs"]


def _fuse_mounts() -> list[str]:
    out = subprocess.run(
        ["findmnt", "-rn", "-t", "fuse.trio-composefs", "-o", "TARGET"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line.encode().decode("unicode_escape") for line in out.splitlines()]


@pytest.fixture(autouse=True)
def no_fuse_leftovers() -> Iterator[None]:
    before = set(_fuse_mounts())
    fds_before = set(os.listdir("/proc/self/fd"))
    yield
    left = [m for m in _fuse_mounts() if m not in before]
    for target in left:
        subprocess.run(["fusermount3", "-u", "-z", target], check=False)
    assert left == [], "FUSE mounts left behind"
    leaked = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in set(os.listdir("/proc/self/fd")) - fds_before
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert leaked == {}, "file descriptors left open"


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    target = tmp_path / "fuse-mnt"
    target.mkdir()
    return target


@pytest.fixture
def kmnt(tmp_path: Path) -> Path:
    target = tmp_path / "kernel-mnt"
    target.mkdir()
    return target


def _is_mount(path: Path) -> bool:
    return os.path.ismount(path)


def _read_all(path: Path) -> bytes:
    return path.read_bytes()


LAZY = pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "whole-tree"])


@LAZY
async def test_c_image_shows_the_source_tree(
    built: Built, c_image: Path, mnt: Path, lazy: bool
) -> None:
    """C mkcomposefs's image of the kernel tests' tree: the same snapshot as the kernel
    mount's (types, modes, owners, sizes, mtimes in ns, symlinks, devices, fifo, hard
    links by inode number, xattrs with an ACL, no trusted.overlay.*), every object
    verified once."""
    from trio_composefs.fuse import DirectoryObjects, serve_image

    image = await trio.to_thread.run_sync(_read_all, c_image)
    objects_fd = os.open(built.objects, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        async with serve_image(image, DirectoryObjects(objects_fd), mnt, lazy=lazy) as mount:
            assert await trio.to_thread.run_sync(_is_mount, mnt)
            await trio.to_thread.run_sync(assert_same_tree, built.source, mnt)
            stats = mount.statistics()
            assert "ro" in mount.options
    finally:
        os.close(objects_fd)
    assert not await trio.to_thread.run_sync(_is_mount, mnt)
    assert stats.open_failures == 0
    assert stats.verifier.verified == len(set(built.object_of.values()))
    assert stats.verifier.refused == 0


def _read_ahead_kb(mnt: Path) -> int:
    dev = os.stat(mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    return int(bdi.read_text())


def _statfs_and_writes(mnt: Path) -> tuple[os.statvfs_result, list[int]]:
    codes = []
    for attempt in (
        lambda: os.open(mnt / "data/tiny", os.O_WRONLY),
        lambda: os.open(mnt / "data/new", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.mkdir(mnt / "newdir"),
        lambda: os.setxattr(mnt / "data/tiny", "user.x", b"1"),
        lambda: os.chmod(mnt / "data/tiny", 0o777),
    ):
        try:
            attempt()
        except OSError as e:
            codes.append(e.errno or 0)
        else:
            codes.append(0)
    return os.statvfs(mnt), codes


@LAZY
async def test_statfs_and_read_only(built: Built, c_image: Path, mnt: Path, lazy: bool) -> None:
    from trio_composefs.fuse import DirectoryObjects, serve_image

    image = await trio.to_thread.run_sync(_read_all, c_image)
    objects_fd = os.open(built.objects, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        async with serve_image(image, DirectoryObjects(objects_fd), mnt, lazy=lazy) as mount:
            st, codes = await trio.to_thread.run_sync(_statfs_and_writes, mnt)
            inodes = mount.statistics().inodes
            # raised from FUSE's 128 KiB (as root): 1 MiB read requests
            assert await trio.to_thread.run_sync(_read_ahead_kb, mnt) == 1024
    finally:
        os.close(objects_fd)
    entries = {os.lstat(p).st_ino for p in [built.source, *built.source.rglob("*")]}
    assert inodes == len(entries)  # one inode per hard-link group
    assert (st.f_bsize, st.f_namemax, st.f_files, st.f_bfree) == (4096, 255, inodes, 0)
    sizes = {p.lstat().st_ino: p.lstat().st_size for p in built.source.rglob("*") if p.is_file()}
    assert st.f_blocks * 4096 >= sum(sizes.values())
    assert st.f_flag & os.ST_RDONLY
    assert codes == [errno.EROFS] * 5


# --- repository images made here: many large objects -------------------------------------------


def _store(repo: Repository, data_of: Callable[[int], bytes], size: int) -> Digest:
    """Write an object of ``size`` bytes, given as chunks ``data_of(offset)``."""
    with repo.begin_object() as tmp:
        offset = 0
        while offset < size:
            piece = data_of(offset)[: size - offset]
            tmp.write(piece)
            offset += len(piece)
        digest, _present = tmp.finish()
    return digest


def _pattern(seed: int) -> Callable[[int], bytes]:
    """Distinct, cheap content: 1 MiB of seeded random bytes, repeated with the offset."""
    block = random.Random(seed).randbytes(1 << 20)
    return lambda offset: (offset.to_bytes(8, "little") + block)[: 1 << 20]


def make_big_image(repo: Repository, sizes: dict[str, int], ref: str) -> FileSystem:
    """An image of regular files ``/big/NAME`` with the given sizes, published as ``ref``."""
    big = Directory(Stat(0o755))
    for i, (name, size) in enumerate(sorted(sizes.items())):
        digest = _store(repo, _pattern(i), size)
        big.entries[name.encode()] = Leaf(Stat(0o644), ExternalFile(size, digest))
    fs = FileSystem(Directory(Stat(0o755), {b"big": big}))
    repo.sync()
    repo.publish_image(store_image(repo, fs), ref)
    return fs


def expected_bytes(index: int, size: int) -> bytes:
    data_of = _pattern(index)
    return b"".join(data_of(off) for off in range(0, size, 1 << 20))[:size]


# --- pulled OCI images: FUSE against the kernel mount and umoci --------------------------------


def _only_image(repo_path: Path) -> str:
    with Repository.open(repo_path) as repo:
        (hex_name,) = repo.list_images()
    return hex_name


def _dir_stats(root: Path) -> dict[str, tuple[int, int]]:
    """``(st_size, st_nlink)`` of every directory."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        if p.is_dir() and not p.is_symlink():
            out[str(p.relative_to(root))] = (st.st_size, st.st_nlink)
    return out


@LAZY
async def test_oci_image_same_tree_as_kernel_mount_and_umoci(
    rich: tuple[Path, Path, set[bytes]], mnt: Path, kmnt: Path, tmp_path: Path, lazy: bool
) -> None:
    repo_path, layout, implicit = rich
    theirs = await trio.to_thread.run_sync(umoci_unpacked, layout, "t", tmp_path / "bundle")
    hex_name = _only_image(repo_path)
    with Repository.open(repo_path) as repo:
        async with mounted_fuse(repo, hex_name, mnt, lazy=lazy) as mount:
            ours = await trio.to_thread.run_sync(scan_mount, mnt)
            our_dirs = await trio.to_thread.run_sync(_dir_stats, mnt)
            stats = mount.statistics()
        kernel = None
        if _KERNEL_REASON is None:
            async with mounted_image(repo, hex_name, kmnt):
                kernel = await trio.to_thread.run_sync(scan_mount, kmnt)
                kernel_dirs = await trio.to_thread.run_sync(_dir_stats, kmnt)
    assert_same_fs(theirs, ours, ignore_mtime=implicit)
    if kernel is not None:
        assert_same_fs(kernel, ours)
        if lazy:  # the stored sizes and link counts of directories, as EROFS shows them
            assert our_dirs == kernel_dirs
        else:  # the tree has no dirent bytes: size 0; links counted as C counts them
            assert {k: v[1] for k, v in our_dirs.items()} == {
                k: v[1] for k, v in kernel_dirs.items()
            }
    assert stats.verifier.verified >= 3
    assert stats.open_failures == 0


def _flip_byte(path: Path, offset: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:  # fs-verity makes the object immutable
        pytest.skip(f"cannot corrupt {path}: {e.strerror} (fs-verity protects it)")
    try:
        byte = path.read_bytes()[offset]
        os.pwrite(fd, bytes([byte ^ 0x01]), offset)
    finally:
        os.close(fd)


def _read_twice(path: Path) -> list[int | None]:
    codes: list[int | None] = []
    for _ in range(2):
        try:
            path.read_bytes()
        except OSError as e:
            codes.append(e.errno)
        else:
            codes.append(None)
    return codes


async def test_flipped_byte_is_eio_through_fuse_but_served_by_the_kernel(
    rich: tuple[Path, Path, set[bytes]],
    mnt: Path,
    kmnt: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Why FUSE exists: on a filesystem without fs-verity, the kernel mount of an
    insecure repository serves a corrupted object silently; the FUSE mount refuses that
    one file with EIO (logged once, naming the object) and serves every other file."""
    repo_path, _layout, _ = rich
    hex_name = _only_image(repo_path)
    with Repository.open(repo_path) as repo:
        fs = read_erofs(read_image(repo, hex_name))
    big = dict(fs.walk())[b"/usr/lib/big.so"]
    assert isinstance(big, Leaf)
    assert isinstance(big.content, ExternalFile)
    assert big.content.digest is not None
    obj = repo_path / "objects" / big.content.digest.object_path()
    good = obj.read_bytes()
    _flip_byte(obj, 1_000_000)
    caplog.set_level(logging.ERROR, logger="trio_composefs.fuse")
    with Repository.open(repo_path) as repo:
        async with mounted_fuse(repo, hex_name, mnt) as mount:
            read, err = await trio.to_thread.run_sync(_read_all_but, mnt, mnt / "usr/lib/big.so")
            again = await trio.to_thread.run_sync(_read_twice, mnt / "usr/lib/big.so")
            size = (await trio.Path(mnt / "usr/lib/big.so").stat()).st_size
            stats = mount.statistics()
        served = None
        if _KERNEL_REASON is None:
            async with mounted_image(repo, hex_name, kmnt) as result:
                assert not result.verity
                served = await trio.to_thread.run_sync(_read_all, kmnt / "usr/lib/big.so")
    assert err == errno.EIO
    assert again == [errno.EIO, errno.EIO]
    assert size == len(good)  # stat still works: only the content is refused
    assert read > 10
    assert stats.verifier.refused == 1
    assert stats.open_failures == 3
    logged = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(logged) == 1
    assert str(obj) in logged[0]
    assert "/usr/lib/big.so" in logged[0]
    if served is not None:  # the kernel: no error, the flipped byte
        assert len(served) == len(good)
        assert served != good
        assert [i for i in range(len(good)) if served[i] != good[i]] == [1_000_000]


# --- concurrency ----------------------------------------------------------------------------------

READERS = 16
READER_SIZE = 6 << 20
CHUNK = 128 << 10


def _read_with_barrier(path: Path, barrier: threading.Barrier) -> str:
    """SHA-256 of the file, read in chunks; halfway through, wait for every other reader."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        done = 0
        while piece := f.read(CHUNK):
            h.update(piece)
            done += len(piece)
            if done - len(piece) < READER_SIZE // 2 <= done:
                barrier.wait()
    return h.hexdigest()


async def test_sixteen_readers_of_large_files_all_progress(repo: Repository, mnt: Path) -> None:
    """16 threads read 16 different large files; each waits halfway for all the others
    (a barrier), which only passes if every reader got half of its file while the
    others held their files open mid-read: no reader starves."""
    sizes = {f"f{i:02}": READER_SIZE for i in range(READERS)}
    await trio.to_thread.run_sync(make_big_image, repo, sizes, "big")
    want = {
        f"f{i:02}": hashlib.sha256(expected_bytes(i, READER_SIZE)).hexdigest()
        for i in range(READERS)
    }
    barrier = threading.Barrier(READERS, timeout=120)
    got: dict[str, str] = {}
    limiter = trio.CapacityLimiter(READERS)
    async with mounted_fuse(repo, "big", mnt) as mount:

        async def reader(name: str) -> None:
            got[name] = await trio.to_thread.run_sync(
                _read_with_barrier, mnt / "big" / name, barrier, limiter=limiter
            )

        async with trio.open_nursery() as nursery:
            for name in sizes:
                nursery.start_soon(reader, name)
        stats = mount.statistics()
    assert got == want
    assert stats.verifier.verified == READERS
    assert stats.bytes_read >= READERS * READER_SIZE


@attrs.define(eq=False)
class GatedPool(HashPool):
    """A hash pool that holds the hash of any object of ``gate_from`` bytes or more until
    ``gate`` is set (and says so on ``held``)."""

    gate_from: int = attrs.field(default=1 << 40, kw_only=True)
    gate: threading.Event = attrs.field(factory=threading.Event, kw_only=True)
    held: threading.Event = attrs.field(factory=threading.Event, kw_only=True)

    def level1_fd(self, fd: int, size: int, algorithm: Algorithm = Algorithm.SHA256) -> bytes:
        if size >= self.gate_from:
            self.held.set()
            assert self.gate.wait(60)
        return super().level1_fd(fd, size, algorithm)


HUGE = 128 << 20


def _first_bytes(path: Path, n: int) -> tuple[bytes, float]:
    start = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        data = f.read(n)
    return data, time.monotonic() - start


async def test_other_files_are_served_while_a_large_object_is_verified(
    repo: Repository, mnt: Path
) -> None:
    """The first open of a 128 MiB object hashes it in the pool: meanwhile another file
    opens and reads (its own verification is not queued behind), and the event loop
    keeps answering within a fraction of a second while the real hash runs."""
    await trio.to_thread.run_sync(make_big_image, repo, {"huge": HUGE, "small": 1 << 20}, "big")
    latencies: list[float] = []
    pool = GatedPool(gate_from=HUGE)
    with pool:
        async with mounted_fuse(repo, "big", mnt, hash_pool=pool) as mount:
            async with trio.open_nursery() as nursery:
                huge: list[tuple[bytes, float]] = []

                async def read_huge() -> None:
                    huge.append(await trio.to_thread.run_sync(_first_bytes, mnt / "big/huge", 4096))

                nursery.start_soon(read_huge)
                assert await trio.to_thread.run_sync(pool.held.wait, 60)
                small = await trio.to_thread.run_sync(_read_all, mnt / "big/small")
                assert small == expected_bytes(1, 1 << 20)
                assert not huge  # still held at the gate

                async def probe() -> None:
                    while not huge:
                        start = trio.current_time()
                        await trio.sleep(0.01)
                        latencies.append(trio.current_time() - start - 0.01)

                nursery.start_soon(probe)
                pool.gate.set()
            stats = mount.statistics()
    assert huge[0][0] == expected_bytes(0, 4096)
    assert stats.verifier.verified == 2
    assert latencies
    assert max(latencies) < 0.25, f"event loop stalled {max(latencies):.3f} s during the hash"


async def test_concurrent_first_opens_hash_once(repo: Repository, mnt: Path) -> None:
    await trio.to_thread.run_sync(make_big_image, repo, {"one": 8 << 20}, "one")
    async with mounted_fuse(repo, "one", mnt) as mount:
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(trio.to_thread.run_sync, _read_all, mnt / "big/one")
        stats = mount.statistics().verifier
    assert stats.verified == 1
    assert stats.cached == 7
    # every read is checked again, group by group (16 groups of 512 KiB), unless the
    # kernel's page cache answered it
    assert 16 <= stats.groups_checked <= 8 * 16
    assert stats.bytes_hashed == (8 << 20) + stats.groups_checked * (512 << 10)


def _read_flip_read(path: Path, obj: Path) -> tuple[bytes, int | None, int | None]:
    """Read the first MiB, flip a byte at 3 MiB in the object, read on; then reopen."""
    with open(path, "rb", buffering=0) as f:
        head = f.read(1 << 20)
        _flip_byte(obj, 3 << 20)
        try:
            while f.read(CHUNK):
                pass
            later = None
        except OSError as e:
            later = e.errno
    try:
        path.read_bytes()
        reopened = None
    except OSError as e:
        reopened = e.errno
    return head, later, reopened


@pytest.mark.parametrize("check_reads", [True, False], ids=["check-reads", "open-only"])
async def test_a_change_after_the_first_open_is_caught_by_the_reads(
    repo: Repository, mnt: Path, caplog: pytest.LogCaptureFixture, check_reads: bool
) -> None:
    """Verified at open is not enough: the object is changed while the file is open.
    The reads of the changed group fail with EIO (checked against the level-1 digests
    of the first open), and so does every later open. With ``check_reads=False`` the
    change is served (and a later open, remembered as verified, serves it too)."""
    fs = await trio.to_thread.run_sync(make_big_image, repo, {"f": 4 << 20}, "f")
    leaf = fs.root.entries[b"big"]
    assert isinstance(leaf, Directory)
    f = leaf.entries[b"f"]
    assert isinstance(f, Leaf)
    assert isinstance(f.content, ExternalFile)
    assert f.content.digest is not None
    obj = Path(repo.path) / "objects" / f.content.digest.object_path()
    caplog.set_level(logging.ERROR, logger="trio_composefs.fuse")
    async with mounted_fuse(repo, "f", mnt) as mount:
        head, later, reopened = await trio.to_thread.run_sync(_read_flip_read, mnt / "big/f", obj)
        stats = mount.statistics().verifier
    assert head == expected_bytes(0, 1 << 20)
    assert (later, reopened) == (errno.EIO, errno.EIO)
    assert (stats.verified, stats.refused) == (1, 1)
    logged = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(logged) == 1
    assert "bytes 3145728 to 3670016 changed after it was verified" in logged[0]
    assert str(obj) in logged[0]


# --- the command line ---------------------------------------------------------------------------


def cli(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, "--repo", str(repo), *args], capture_output=True, text=True, check=False
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _wait_for_line(proc: subprocess.Popen[str], needle: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert needle in line, (line, proc.stderr.read() if proc.stderr else "")
    return line


def _gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_cli_foreground_mount_until_ctrl_c(rich: tuple[Path, Path, set[bytes]], mnt: Path) -> None:
    repo_path, _layout, _ = rich
    proc = subprocess.Popen(
        [*CLI, "--repo", str(repo_path), "oci", "mount", "--fuse", "t", str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_line(proc, f"at {mnt} with FUSE; Ctrl-C unmounts")
        assert os.path.ismount(mnt)
        assert (mnt / "usr/lib/big.so").stat().st_size == 3 * 1024 * 1024 + 17
        assert len((mnt / "usr/lib/big.so").read_bytes()) == 3 * 1024 * 1024 + 17
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"unmounted {mnt}" in out
    assert "insecure" in err
    assert not os.path.ismount(mnt)


def test_cli_background_mount_ends_with_fusermount(
    rich: tuple[Path, Path, set[bytes]], mnt: Path
) -> None:
    repo_path, _layout, _ = rich
    hex_name = _only_image(repo_path)
    done = cli(repo_path, "mount", "--fuse", "--background", hex_name, str(mnt))
    try:
        assert os.path.ismount(mnt)
        pid = int(done.stdout.split("(pid ")[1].split(")")[0])
        assert f"unmount with fusermount3 -u {mnt}" in done.stdout
        assert (mnt / "usr/lib/big.so").stat().st_size == 3 * 1024 * 1024 + 17
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert _gone(pid), "the FUSE server outlived its mount"
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mount", "--fuse", "nope", "{mnt}"], "image 'refs/nope' not found"),
        (["oci", "mount", "--fuse", "t", "{tmp}/absent"], "does not exist"),
        (["oci", "mount", "--fuse", "t", "{mnt}", "--upperdir", "{tmp}"], "read-only"),
        (["oci", "mount", "--background", "t", "{mnt}"], "--fuse mounts only"),
    ],
)
def test_cli_errors_are_one_line(
    rich: tuple[Path, Path, set[bytes]], mnt: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    repo_path, _layout, _ = rich
    done = cli(repo_path, *[a.format(mnt=mnt, tmp=tmp_path) for a in args], check=False)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("trio-cfsctl: error: ")
    assert message in lines[0]
    assert not os.path.ismount(mnt)


def test_cli_without_pyfuse3_says_how_to_install_it(tmp_path: Path, mnt: Path) -> None:
    code = (
        "import sys; sys.modules['pyfuse3'] = None\n"
        "from trio_composefs.cli import main\n"
        f"main(['--repo', {str(tmp_path / 'repo')!r}, 'mount', '--fuse', 'x', {str(mnt)!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "apt-get install fuse3 libfuse3-dev" in done.stderr
    assert "pip install 'trio-composefs[fuse]'" in done.stderr


# --- as an unprivileged user ----------------------------------------------------------------------

UNPRIVILEGED = "nobody"
#: An interpreter the unprivileged user can run, with trio_composefs and pyfuse3, when the
#: environment names one; otherwise the ``unprivileged_python`` fixture makes one.
UNPRIVILEGED_PYTHON_ENV = "TRIO_COMPOSEFS_TEST_UNPRIVILEGED_PYTHON"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: A tree snapshot made by the unprivileged user (json on stdout): what it may see.
SNAPSHOT_SCRIPT = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = {}
for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in ["."] + sorted(dirnames + filenames):
        p = os.path.normpath(os.path.join(dirpath, name))
        if name == "." and p != os.path.normpath(root):
            continue
        st = os.lstat(p)
        e = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
             "mtime_ns": st.st_mtime_ns, "nlink": None if stat.S_ISDIR(st.st_mode) else st.st_nlink,
             "size": None if stat.S_ISDIR(st.st_mode) else st.st_size, "rdev": st.st_rdev}
        try:
            e["xattrs"] = {k: os.getxattr(p, k, follow_symlinks=False).hex()
                           for k in sorted(os.listxattr(p, follow_symlinks=False))}
        except OSError as err:
            e["xattrs"] = err.errno
        if stat.S_ISREG(st.st_mode):
            try:
                with open(p, "rb") as f:
                    e["sha256"] = hashlib.sha256(f.read()).hexdigest()
            except OSError as err:
                e["sha256"] = err.errno
        elif stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p)
        out[os.path.relpath(p, root)] = e
links = {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in filenames:
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        if st.st_nlink > 1:
            links.setdefault(st.st_ino, []).append(os.path.relpath(p, root))
out["<links>"] = sorted(sorted(v) for v in links.values() if len(v) > 1)
json.dump(out, sys.stdout)
"""


def _as_user(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["runuser", "-u", UNPRIVILEGED, "--", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _runs_for_user(python: str) -> str | None:
    """None if the unprivileged user can import pyfuse3 and our CLI with ``python``."""
    probe = subprocess.run(
        ["runuser", "-u", UNPRIVILEGED, "--", python, "-c", "import pyfuse3, trio_composefs.cli"],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    if probe.returncode == 0:
        return None
    return f"{python}: {probe.stderr.strip().splitlines()[-1:]}"


@pytest.fixture(scope="module")
def unprivileged_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An interpreter ``nobody`` can run with trio_composefs and pyfuse3, and a /dev/fuse it
    can open (mode 0666, as distributions make it; restored afterwards).

    ``sys.executable`` usually lives under /root, which other users cannot enter: then a
    virtual environment of Debian's ``/usr/bin/python3`` is made under /tmp with this
    checkout installed (not editable: the checkout may be unreadable too) and the extra.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    python = os.environ.get(UNPRIVILEGED_PYTHON_ENV)
    venv: str | None = None
    if python is None and _runs_for_user(sys.executable) is None:
        python = sys.executable
    if python is None:
        base = shutil.which("python3", path="/usr/bin")
        if base is None:
            pytest.skip(
                f"{UNPRIVILEGED} cannot run {sys.executable} and there is no /usr/bin/python3"
            )
        venv = tempfile.mkdtemp(prefix="trio-composefs-unpriv-venv-")
        os.chmod(venv, 0o755)
        subprocess.run([base, "-m", "venv", venv], check=True)
        done = subprocess.run(
            [f"{venv}/bin/pip", "install", "-q", f"{PROJECT_ROOT}[fuse]"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"cannot install this checkout for {UNPRIVILEGED}: {done.stderr[-300:]}")
        python = f"{venv}/bin/python"
    reason = _runs_for_user(python)
    if reason is not None:
        if venv is not None:
            shutil.rmtree(venv, ignore_errors=True)
        pytest.skip(f"{UNPRIVILEGED} cannot use {reason} (set {UNPRIVILEGED_PYTHON_ENV})")
    mode = os.stat("/dev/fuse").st_mode & 0o777
    try:
        # libfuse opens /dev/fuse itself before it falls back to fusermount3
        os.chmod("/dev/fuse", mode | 0o666)
        yield python
    finally:
        os.chmod("/dev/fuse", mode)
        if venv is not None:
            shutil.rmtree(venv, ignore_errors=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp the unprivileged user owns (the test's own tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="trio-composefs-fuse-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_unprivileged_fuse_mount_shows_the_kernel_mount_tree(
    rich: tuple[Path, Path, set[bytes]], shared_dir: Path, unprivileged_python: str
) -> None:
    """``nobody`` mounts a pulled image with ``trio-cfsctl mount --fuse --background``
    (through the setuid fusermount3) and sees exactly what it sees on root's kernel mount
    of the same image: metadata, contents (where its permissions allow), hard links."""
    if _KERNEL_REASON is not None:
        pytest.skip(f"no kernel mount to compare with: {_KERNEL_REASON}")
    repo_src, _layout, _ = rich
    repo_path = shared_dir / "repo"
    shutil.copytree(repo_src, repo_path, symlinks=True)
    mnt = shared_dir / "mnt"
    mnt.mkdir()
    kmnt = shared_dir / "kernel-mnt"
    kmnt.mkdir()
    subprocess.run(["chown", "-R", f"{UNPRIVILEGED}:", str(shared_dir)], check=True)
    hex_name = _only_image(repo_path)
    started = _as_user(
        unprivileged_python,
        "-m",
        "trio_composefs",
        "--repo",
        str(repo_path),
        "mount",
        "--fuse",
        "--background",
        hex_name,
        str(mnt),
    )
    pid = int(started.stdout.split("(pid ")[1].split(")")[0])
    try:
        options = subprocess.run(
            ["findmnt", "-rn", "-o", "OPTIONS", str(mnt)], capture_output=True, text=True
        ).stdout
        assert "allow_other" not in options
        assert f"user_id={pwd.getpwnam(UNPRIVILEGED).pw_uid}" in options
        fuse_view = _as_user(unprivileged_python, "-c", SNAPSHOT_SCRIPT, str(mnt)).stdout
        root_denied = subprocess.run(["ls", str(mnt)], capture_output=True, text=True)
    finally:
        _as_user("fusermount3", "-u", str(mnt), check=False)
    assert _gone(pid)
    assert root_denied.returncode != 0  # FUSE without allow_other: only its user sees it
    with Repository.open(repo_path) as repo:
        mount_image(repo, hex_name, kmnt)
    try:
        kernel_view = _as_user(unprivileged_python, "-c", SNAPSHOT_SCRIPT, str(kmnt)).stdout
    finally:
        unmount(kmnt)
    ours, theirs = json.loads(fuse_view), json.loads(kernel_view)
    assert sorted(ours) == sorted(theirs)
    for path in theirs:
        assert ours[path] == theirs[path], path
    assert len(ours["<links>"]) == 3
