"""Mounting pulled OCI images with the kernel: ``trio-cfsctl mount``/``oci mount``/``transaction``.

Images are built by real tools (GNU tar layers and umoci-generated layers, as in
``test_tree_oracle``), pulled with :func:`pull_image`, mounted with the CLI (run as a
separate process, as users run it) or :func:`mounted_image`, and the mounted tree is
scanned and compared entry by entry with ``umoci unpack`` of the same layout after the
documented OCI transform (``transform_for_oci``: the root takes ``/usr``'s metadata,
``/run`` is emptied, only ``security.capability`` xattrs stay). The contents are
compared through their fs-verity digests, computed by reading each file through the
mount. C ``mount.composefs`` mounts our image and must show the same tree.

Every mount is undone in a ``finally``; the autouse ``no_leftovers`` fixture of
``test_mount_kernel`` checks that no mount, loop device or fd is left behind.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import trio

from ocifixtures import Layout
from oracles import need_c_tool
from test_mount_kernel import _REASON as _MOUNT_REASON
from test_mount_kernel import _mount_targets, no_leftovers
from test_tree_oracle import UMOCI, hash_fd, info, python_tar, rich_layers, umoci_image
from treecompare import assert_same_tree, summary
from trio_composefs.formats import Algorithm, Digest, FsVerityHasher
from trio_composefs.fs import ExternalFile, FileSystem, InlineFile, Leaf
from trio_composefs.fs._layers import transform_for_oci
from trio_composefs.images._scan import scan_directory
from trio_composefs.mount import mounted_image, unmount
from trio_composefs.oci import open_source, parse_source, pull_image
from trio_composefs.repository import Repository
from trio_composefs.repository._verity import VerityOps
from trio_composefs.testing import write_sample_layout

__all__ = ["no_leftovers"]  # the autouse teardown check, reused

pytestmark = [
    pytest.mark.skipif(_MOUNT_REASON is not None, reason=_MOUNT_REASON or ""),
    pytest.mark.skipif(UMOCI is None, reason="umoci is not installed"),
]

CLI = [sys.executable, "-m", "trio_composefs"]


def cli(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, "--repo", str(repo), *args], capture_output=True, text=True, check=False
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def pull(repo_path: Path, reference: str, tag: str) -> None:
    async def go() -> None:
        with Repository.open(repo_path) as repo:
            async with open_source(parse_source(reference)) as source:
                await pull_image(repo, source, tag=tag)

    trio.run(go)


def umoci_unpacked(layout: Path, tag: str, dest: Path) -> FileSystem:
    """``umoci unpack`` of the layout, scanned, with the OCI transform applied."""
    subprocess.run(
        [str(UMOCI), "unpack", "--image", f"{layout}:{tag}", str(dest)],
        check=True,
        capture_output=True,
        umask=0o022,
    )
    fs = scan_directory(dest / "rootfs", digest_file=hash_fd)
    transform_for_oci(fs)
    return fs


def scan_mount(mnt: Path) -> FileSystem:
    return scan_directory(mnt, digest_file=hash_fd)


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def rich(tmp_path: Path) -> tuple[Path, Path, set[bytes]]:
    """(repository, layout) of the three-layer GNU tar image pulled as ``t``; implicit dirs."""
    tars, implicit = rich_layers(tmp_path / "src")
    # /run/fifo is emptied by the OCI transform: a fifo elsewhere, by Python's tarfile
    tars.append(
        python_tar(
            [
                (info("srv", tarfile.DIRTYPE, mode=0o755), b""),
                (info("srv/fifo", tarfile.FIFOTYPE, mode=0o640, uid=5, gid=6), b""),
            ]
        )
    )
    layout = Layout(tmp_path / "layout")
    layout.add_image(tars, compression=[("gzip", None)[i % 2] for i in range(4)], tag="t")
    layout.write_index()
    Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True).close()
    pull(tmp_path / "repo", f"oci:{layout.path}:t", "t")
    return tmp_path / "repo", layout.path, implicit


def test_oci_mount_shows_what_umoci_unpacks(
    rich: tuple[Path, Path, set[bytes]], mnt: Path, tmp_path: Path
) -> None:
    repo, layout, implicit = rich
    theirs = umoci_unpacked(layout, "t", tmp_path / "bundle")
    done = cli(repo, "--debug", "oci", "mount", "t", str(mnt))
    try:
        assert "file-backed EROFS" in done.stdout
        assert done.stderr.count("not verified by the kernel") == 1
        ours = scan_mount(mnt)
    finally:
        unmount(mnt)
    counts = summary(ours)
    assert counts["hard-link groups"] == 3
    for kind in ("InlineFile", "ExternalFile", "Symlink", "CharDevice", "BlockDevice", "Fifo"):
        assert counts.get(kind, 0) >= 1, kind
    # only allowance: umoci stamps parents it invents with the extraction time
    assert_same_tree(theirs, ours, ignore_mtime=implicit)
    caps = dict(ours.walk())[b"/usr/bin/ping"].stat.xattrs
    assert b"security.capability" in caps
    assert dict(ours.walk())[b"/usr/bin/ping"].stat.mode & 0o4000


def test_oci_mount_of_umoci_built_layers(mnt: Path, tmp_path: Path) -> None:
    layout = umoci_image(tmp_path)
    repo = tmp_path / "repo"
    Repository.init(repo, algorithm=Algorithm.SHA256, insecure=True).close()
    pull(repo, f"oci:{layout}:t", "mine")
    theirs = umoci_unpacked(layout, "t", tmp_path / "final")
    cli(repo, "oci", "mount", "mine", str(mnt))
    try:
        ours = scan_mount(mnt)
    finally:
        unmount(mnt)
    assert_same_tree(theirs, ours)
    assert b"/usr/share/doc" not in dict(ours.walk())  # whiteouts applied


def test_mount_by_digest_and_by_ref_with_a_writable_layer(
    rich: tuple[Path, Path, set[bytes]], mnt: Path, tmp_path: Path
) -> None:
    repo, _layout, _ = rich
    cli(repo, "oci", "mount", "t", str(mnt))  # builds the image
    try:
        expected = scan_mount(mnt)
    finally:
        unmount(mnt)
    with Repository.open(repo) as r:
        (hex_name,) = r.list_images()
        r.publish_image(r.list_images()[hex_name], "mine")
    for name in (hex_name, "mine", "refs/mine"):
        cli(repo, "mount", name, str(mnt))
        try:
            assert_same_tree(expected, scan_mount(mnt))
        finally:
            unmount(mnt)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    cli(repo, "mount", "mine", str(mnt), "--upperdir", str(upper), "--workdir", str(work))
    try:
        (mnt / "new-file").write_bytes(b"written")
        (mnt / "etc/passwd").write_bytes(b"changed\n")
    finally:
        unmount(mnt)
    assert (upper / "new-file").read_bytes() == b"written"
    assert (upper / "etc/passwd").read_bytes() == b"changed\n"


def test_c_mount_composefs_shows_our_image(
    rich: tuple[Path, Path, set[bytes]], mnt: Path, tmp_path: Path
) -> None:
    mount_composefs = need_c_tool("mount.composefs")
    repo, layout, implicit = rich
    theirs = umoci_unpacked(layout, "t", tmp_path / "bundle")
    cli(repo, "oci", "mount", "t", str(mnt))  # builds and publishes the image
    unmount(mnt)
    with Repository.open(repo) as r:
        (hex_name,) = r.list_images()
    basedir = tmp_path / "objects-link"  # -o cannot carry a ',' in the path
    basedir.symlink_to(repo / "objects")
    subprocess.run(
        [mount_composefs, "-o", f"basedir={basedir}", str(repo / "images" / hex_name), str(mnt)],
        check=True,
    )
    try:
        ours = scan_mount(mnt)
    finally:
        unmount(mnt)
    assert_same_tree(theirs, ours, ignore_mtime=implicit)


def _read_all_but(root: Path, broken: Path) -> tuple[int, int | None]:
    """Read every regular file but ``broken``; ``(files read, errno of broken)``."""
    count = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != broken:
            path.read_bytes()
            count += 1
    try:
        broken.read_bytes()
    except OSError as e:
        return count, e.errno
    return count, None


async def test_missing_object_fails_that_file_only(
    rich: tuple[Path, Path, set[bytes]], mnt: Path
) -> None:
    repo_path, _layout, _ = rich
    await trio.to_thread.run_sync(lambda: cli(repo_path, "oci", "mount", "t", str(mnt)))
    fs = scan_mount(mnt)
    unmount(mnt)
    big = dict(fs.walk())[b"/usr/lib/big.so"]
    assert isinstance(big, Leaf)
    assert isinstance(big.content, ExternalFile)
    assert big.content.digest is not None
    (repo_path / "objects" / big.content.digest.object_path()).unlink()
    with Repository.open(repo_path) as repo:
        (hex_name,) = repo.list_images()
        async with mounted_image(repo, hex_name, mnt) as result:
            assert not result.verity
            assert (mnt / "usr/lib/big.so").stat().st_size == 3 * 1024 * 1024 + 17
            read, err = _read_all_but(mnt, mnt / "usr/lib/big.so")
    assert read > 10
    assert err == errno.ENOENT  # "lazy lowerdata lookup failed" in the kernel log
    assert str(mnt) not in _mount_targets()


class UserspaceVerity(VerityOps):
    """Answers the fs-verity "measure" ioctl by hashing in userspace (this filesystem has
    no fs-verity), so a repository can be opened as secure."""

    def measure(self, fd: int, algorithm: Algorithm) -> Digest | None:
        hasher = FsVerityHasher(algorithm)
        offset = 0
        while piece := os.pread(fd, 1 << 20, offset):
            hasher.update(piece)
            offset += len(piece)
        return hasher.digest()


async def test_secure_repository_mounts_with_verity_require(
    rich: tuple[Path, Path, set[bytes]], mnt: Path
) -> None:
    """A secure repository (simulated measure; the filesystem has no fs-verity): the image
    named by digest is measured and opened, the overlay gets verity=require, so the kernel
    refuses every external file (EIO: its object has no fs-verity) and inline files read."""
    repo_path, _layout, _ = rich
    await trio.to_thread.run_sync(lambda: cli(repo_path, "oci", "mount", "t", str(mnt)))
    fs = scan_mount(mnt)
    unmount(mnt)
    with Repository.open(repo_path) as r:
        (hex_name,) = r.list_images()
    with Repository.open(repo_path, insecure=False, verity_ops=UserspaceVerity()) as repo:
        async with mounted_image(repo, hex_name, mnt) as result:
            assert result.verity
            externals = inlines = 0
            for path, inode in fs.walk():
                if not isinstance(inode, Leaf):
                    continue
                target = mnt / os.fsdecode(path[1:])
                if isinstance(inode.content, ExternalFile):
                    with pytest.raises(OSError, match="Input/output error") as info:
                        target.read_bytes()
                    assert info.value.errno == errno.EIO
                    externals += 1
                elif isinstance(inode.content, InlineFile) and not target.is_symlink():
                    assert target.read_bytes() == inode.content.data
                    inlines += 1
    assert externals >= 3
    assert inlines >= 3


def _gc(repo: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "--repo", str(repo), "gc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _still_running(proc: subprocess.Popen[str], seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


def test_transaction_blocks_gc_until_interrupted(rich: tuple[Path, Path, set[bytes]]) -> None:
    repo, _layout, _ = rich
    holder = subprocess.Popen(
        [*CLI, "--repo", str(repo), "transaction"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    gc = None
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert "holding the shared lock" in line
        gc = _gc(repo)
        assert _still_running(gc, 2.0), "gc did not wait for the transaction"
        holder.send_signal(signal.SIGINT)
        assert holder.wait(timeout=30) == 0
        assert gc.wait(timeout=60) == 0, gc.stderr.read() if gc.stderr else ""
    finally:
        for proc in (holder, gc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc is not None:
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()


async def test_mounted_image_blocks_gc(rich: tuple[Path, Path, set[bytes]], mnt: Path) -> None:
    repo_path, _layout, _ = rich
    await trio.to_thread.run_sync(lambda: cli(repo_path, "oci", "mount", "t", str(mnt)))
    unmount(mnt)
    with Repository.open(repo_path) as repo:
        (hex_name,) = repo.list_images()
    # gc runs while the image is mounted: it must wait until the block has unmounted
    repo = Repository.open(repo_path)
    gc: subprocess.Popen[str] | None = None
    try:
        async with mounted_image(repo, hex_name, mnt):
            repo.close()  # the context manager holds its own lock
            gc = await trio.to_thread.run_sync(_gc, repo_path)
            assert await trio.to_thread.run_sync(_still_running, gc, 2.0)
            before = await trio.to_thread.run_sync(scan_mount, mnt)
        assert await trio.to_thread.run_sync(gc.wait, 60) == 0
    finally:
        repo.close()
        if gc is not None:
            if gc.poll() is None:
                gc.kill()
                gc.wait()
            for stream in (gc.stdout, gc.stderr):
                if stream is not None:
                    stream.close()
    assert summary(before)["ExternalFile"] >= 1


SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from trio_composefs.mount import mounted_image
    from trio_composefs.repository import Repository

    async def main():
        with Repository.open(sys.argv[1]) as repo:
            async with mounted_image(repo, sys.argv[2], sys.argv[3]):
                print("mounted", flush=True)
                await trio.sleep_forever()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


def test_ctrl_c_in_a_mounted_block_unmounts(rich: tuple[Path, Path, set[bytes]], mnt: Path) -> None:
    repo, _layout, _ = rich
    cli(repo, "oci", "mount", "t", str(mnt))
    unmount(mnt)
    with Repository.open(repo) as r:
        (hex_name,) = r.list_images()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(repo), hex_name, str(mnt)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "mounted\n"
        assert os.path.ismount(mnt)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert not os.path.ismount(mnt)


def test_ctrl_c_during_oci_mount_leaves_nothing_half_done(
    rich: tuple[Path, Path, set[bytes]], mnt: Path
) -> None:
    """SIGINT at increasing delays into ``oci mount`` (which builds the image first): the
    command either finishes (exit 0, mounted, as asked) or is interrupted with nothing
    mounted: "interrupted", exit 130 (or, before the CLI even started, Python's own
    KeyboardInterrupt while importing); never an error with a mount left behind. One
    race is the process's, not ours: a SIGINT that arrives while the interpreter exits
    after a completed mount kills it (status -SIGINT) with the mount kept, as asked."""
    repo, _layout, _ = rich
    outcomes: list[str] = []
    for delay in (0.05, 0.3, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.7, 2.5):
        proc = subprocess.Popen(
            [*CLI, "--repo", str(repo), "oci", "mount", "t", str(mnt)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            outcomes.append("mounted")
            assert os.path.ismount(mnt)
            unmount(mnt)
            continue
        last = err.splitlines()[-1] if err else ""
        if proc.returncode == -signal.SIGINT and "Traceback" not in err:
            # killed by the default handler: Python had not installed its own yet (no
            # output), or had already restored it while exiting after a completed mount
            # (the insecure note, the command's last words, was printed)
            finished = "not verified by the kernel" in err
            assert os.path.ismount(mnt) == finished, err
            assert err.count("\n") == int(finished), err
            outcomes.append("killed after the mount" if finished else "killed at start")
            if finished:
                unmount(mnt)
            continue
        assert not os.path.ismount(mnt), (proc.returncode, err)
        if last == "trio-cfsctl: interrupted":
            assert proc.returncode == 130, err
            assert "Traceback" not in err, err
            outcomes.append("interrupted")
        else:
            # Python's own report: the interrupt came while importing or parsing the
            # arguments, before any command ran (a command's is caught by run())
            ours = re.findall(r"trio_composefs/\S+\", line \d+, in (\S+)", err)
            assert last == "KeyboardInterrupt", err
            assert not [f for f in ours if f.startswith(("cmd_", "_mount"))], err
            outcomes.append("before the CLI")
    assert str(mnt) not in _mount_targets()
    print(outcomes)  # which ones occur depends on the machine's speed


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_mount_the_sample_image(mnt: Path, tmp_path: Path) -> None:
    """``trio-cfsctl demo`` then ``oci mount sample`` and ``mount <digest>``: the README's
    quick start, compared with umoci's unpacking of the same sample layout."""
    repo = tmp_path / "repo"
    done = cli(repo, "demo")
    assert "pulled it as tag 'sample'" in done.stdout
    layout = tmp_path / "sample"
    write_sample_layout(layout, tag="sample")
    # umoci cannot read zstd layers: skopeo recompresses them (same diff_ids) for it
    gzipped = tmp_path / "sample-gzip"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--dest-compress",
            "--dest-compress-format=gzip",
            f"oci:{layout}:sample",
            f"oci:{gzipped}:sample",
        ],
        check=True,
        capture_output=True,
    )
    theirs = umoci_unpacked(gzipped, "sample", tmp_path / "bundle")
    cli(repo, "oci", "mount", "sample", str(mnt))
    try:
        assert_same_tree(theirs, scan_mount(mnt))
    finally:
        unmount(mnt)
    with Repository.open(repo) as r:
        (hex_name,) = r.list_images()
    cli(repo, "mount", hex_name, str(mnt))
    try:
        assert (mnt / "usr/bin/hello").read_bytes().startswith(b"#!/bin/sh\n")
        assert_same_tree(theirs, scan_mount(mnt))
    finally:
        unmount(mnt)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mount", "nope", "{mnt}"], "image 'refs/nope' not found"),
        (["mount", "t", "{mnt}"], "'t' is an OCI tag: mount it with `trio-cfsctl oci mount t"),
        (["oci", "mount", "nope", "{mnt}"], "nope"),
        (["oci", "mount", "t", "{tmp}/absent"], "does not exist"),
        (["oci", "mount", "t", "{mnt}", "--upperdir", "{tmp}"], "both --upperdir and --workdir"),
    ],
)
def test_errors_are_one_line(
    rich: tuple[Path, Path, set[bytes]], mnt: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    repo, _layout, _ = rich
    argv = [a.format(mnt=mnt, tmp=tmp_path) for a in args]
    done = cli(repo, *argv, check=False)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("trio-cfsctl: error: "), done.stderr
    assert message in lines[0]
    assert not os.path.ismount(mnt)
