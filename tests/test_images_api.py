"""The image functions of the library: create_image, compute_image_id, write_dumpfile,
read_image (pytest-trio).

Oracles: C ``mkcomposefs`` 1.0.8 on the same directory (no transform, no hard links:
C does not detect them) or on our dumpfile; the ``fsverity digest`` tool for stored
objects; the tree read back by an independent scan.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from fstree import have_c_tools, signature
from fstree import mkcomposefs as c_mkcomposefs
from oracles import need_c_tool
from treecompare import assert_same_tree
from trio_composefs import (
    Algorithm,
    ObjectTmpfile,
    Repository,
    compute_image_id,
    create_image,
    read_image,
    write_dumpfile,
)
from trio_composefs.formats import Digest, fsverity_digest
from trio_composefs.fs import ExternalFile, FileSystem, Leaf, transform_for_oci
from trio_composefs.fs.erofs import write_erofs
from trio_composefs.images._scan import scan_directory

T0 = 1_700_000_000_987_654_321
needs_c = pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")


def make_tree(root: Path, *, usr: bool = True, hardlink: bool = True) -> Path:
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "a").write_bytes(b"small file")
    (root / "etc" / "b").write_bytes(bytes(range(256)) * 33)
    (root / "etc" / "c").write_bytes(b"c" * 65)
    (root / "etc" / "d").write_bytes(b"d" * 64)
    os.symlink("a", root / "etc" / "link")
    os.setxattr(root / "etc" / "a", "user.x", b"1")
    os.setxattr(root / "etc" / "b", "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    if usr:
        (root / "usr" / "lib").mkdir(parents=True)
        (root / "usr" / "lib" / "big").write_bytes(b"L" * 300_000)
        (root / "usr").chmod(0o750)
        (root / "run" / "tmp").mkdir(parents=True)
    if hardlink:
        os.link(root / "etc" / "b", root / "hard")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(T0, T0), follow_symlinks=False)
    os.utime(root / "usr" if usr else root, ns=(T0 + 1, T0 + 1))
    return root


def hash_fd(fd: int, size: int) -> Digest:
    return fsverity_digest(os.read(fd, size + 1), Algorithm.SHA256)


def external(fs: FileSystem) -> set[Digest]:
    return {
        inode.content.digest
        for _p, inode in fs.walk()
        if isinstance(inode, Leaf)
        and isinstance(inode.content, ExternalFile)
        and inode.content.digest is not None
    }


async def test_create_image_stores_objects_and_the_image(repo: Repository, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    digest = await create_image(repo, src, "mine")
    assert repo.resolve_image("mine") == digest
    assert repo.has_image(digest)
    # the tree, read back from the stored image, is the scanned and transformed tree
    expected = scan_directory(src, digest_file=hash_fd)
    transform_for_oci(expected)
    ours = await read_image(repo, "mine")
    assert_same_tree(ours, expected)
    assert signature(ours) == signature(expected)
    # root metadata came from /usr, /run was emptied, user.* dropped, capability kept
    assert ours.root.stat.mode == 0o750
    assert ours.root.entries[b"run"].entries == {}  # type: ignore[union-attr]
    etc = ours.root.entries[b"etc"]
    assert etc.entries[b"a"].stat.xattrs == {}  # type: ignore[union-attr]
    assert b"security.capability" in etc.entries[b"b"].stat.xattrs  # type: ignore[union-attr]
    # every file over 64 bytes is an object whose content is the file's
    objects = external(ours)
    assert len(objects) == 3  # etc/b (= hard), etc/c, usr/lib/big
    for d in objects:
        data = repo.read_object(d)
        assert fsverity_digest(data, Algorithm.SHA256) == d
    # the image ID is the fs-verity digest of the image object, which is our writer's image
    image = repo.read_object(digest)
    assert image == write_erofs(expected)
    assert fsverity_digest(image, Algorithm.SHA256) == digest
    # compute_image_id agrees, on the path and on the tree
    assert await compute_image_id(src, Algorithm.SHA256) == digest
    assert await compute_image_id(expected, Algorithm.SHA256) == digest


async def test_objects_measured_by_the_fsverity_tool(repo: Repository, tmp_path: Path) -> None:
    fsverity = shutil.which("fsverity")
    if fsverity is None:
        pytest.skip("fsverity tool not installed")
    src = make_tree(tmp_path / "src")
    digest = await create_image(repo, src)
    for d in [digest, *external(await read_image(repo, digest.hex()))]:
        path = Path(repo.path) / "objects" / d.object_path()
        out = await trio.run_process([fsverity, "digest", str(path)], capture_stdout=True)
        assert out.stdout.decode().split()[0] == f"sha256:{d.hex()}"


@needs_c
async def test_no_transform_equals_c_mkcomposefs_of_the_directory(
    repo: Repository, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src", hardlink=False)
    digest = await create_image(repo, src, transform=False)
    tool = need_c_tool("mkcomposefs")
    c = await trio.run_process(
        [
            tool,
            "--min-version=1",
            "--max-version=1",
            "--print-digest",
            str(src),
            str(tmp_path / "c"),
        ],
        capture_stdout=True,
    )
    assert c.stdout.decode().strip() == digest.hex()
    assert repo.read_object(digest) == (tmp_path / "c").read_bytes()
    # every xattr kept without the transform
    tree = await read_image(repo, digest.hex())
    assert tree.root.entries[b"etc"].entries[b"a"].stat.xattrs == {b"user.x": b"1"}  # type: ignore[union-attr]


@needs_c
@pytest.mark.parametrize("transform", [True, False])
async def test_write_dumpfile_built_by_c_gives_the_image_id(
    tmp_path: Path, transform: bool
) -> None:
    src = make_tree(tmp_path / "src")
    pieces: list[bytes] = []
    await write_dumpfile(src, pieces.append, algorithm=Algorithm.SHA256, transform=transform)
    image = c_mkcomposefs(b"".join(pieces), version=1)
    want = await compute_image_id(src, Algorithm.SHA256, transform=transform)
    assert fsverity_digest(image, Algorithm.SHA256) == want


async def test_write_dumpfile_of_a_stored_image(repo: Repository, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    await create_image(repo, src, "x")
    from_image: list[bytes] = []
    await write_dumpfile(await read_image(repo, "x"), from_image.append)
    from_dir: list[bytes] = []
    await write_dumpfile(src, from_dir.append, algorithm=Algorithm.SHA256)
    assert b"".join(from_image) == b"".join(from_dir)


async def test_version_0(repo: Repository, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    digest = await create_image(repo, src, version=0)
    assert digest == await compute_image_id(src, Algorithm.SHA256, version=0)
    assert digest != await compute_image_id(src, Algorithm.SHA256)


@pytest.mark.parametrize("repo_algorithm", [Algorithm.SHA512])
async def test_sha512_repository(repo: Repository, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    digest = await create_image(repo, src)
    assert digest.algorithm is Algorithm.SHA512
    assert digest == await compute_image_id(src)  # SHA-512 is the default, as cfsctl's
    for d in external(await read_image(repo, digest.hex())):
        assert d.algorithm is Algorithm.SHA512
        assert fsverity_digest(repo.read_object(d), Algorithm.SHA512) == d


async def test_without_usr(repo: Repository, tmp_path: Path) -> None:
    """No /usr: the root keeps its own metadata (cfsctl refuses; main's transform goes on)."""
    src = make_tree(tmp_path / "src", usr=False)
    digest = await create_image(repo, src, "x")
    tree = await read_image(repo, "x")
    assert tree.root.stat.mtime == (T0 + 1) // 10**9
    assert tree.root.stat.mode == os.stat(src).st_mode & 0o7777
    assert digest == await compute_image_id(src, Algorithm.SHA256)
    assert digest != await compute_image_id(src, Algorithm.SHA256, transform=False)


async def test_cancelled_create_image_names_nothing(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the worker thread scans: it stops at the next file, names nothing."""
    src = tmp_path / "src"
    (src / "usr").mkdir(parents=True)
    for i in range(20):
        (src / "usr" / f"f{i:02d}").write_bytes(b"%d" % i * 100)
    gate = threading.Event()
    reached = threading.Event()
    real_begin = Repository.begin_object

    def slow_begin(self: Repository) -> ObjectTmpfile:
        reached.set()
        gate.wait(10)
        return real_begin(self)

    monkeypatch.setattr(Repository, "begin_object", slow_begin)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def go() -> None:
                await create_image(repo, src, "x")

            nursery.start_soon(go)
            await trio.to_thread.run_sync(reached.wait, 10)
            scope.cancel()
            gate.set()
    assert scope.cancelled_caught
    assert repo.list_images() == {}
    assert repo.list_image_refs() == {}
    objects = [p for p in (Path(repo.path) / "objects").rglob("*") if p.is_file()]
    assert len(objects) <= 1  # the file being written when cancelled, at most
    assert repo.find_stray_tmpfiles() == []


async def test_read_image_errors(repo: Repository) -> None:
    from trio_composefs import ObjectNotFoundError

    with pytest.raises(ObjectNotFoundError):
        await read_image(repo, "nope")


async def test_the_limiter_given_is_used(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    limiter = trio.CapacityLimiter(1)
    results: list[Digest] = []
    async with trio.open_nursery() as nursery:
        await limiter.acquire()

        async def go() -> None:
            results.append(await compute_image_id(src, limiter=limiter))

        nursery.start_soon(go)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.statistics().tasks_waiting == 1
        assert results == []
        limiter.release()
    assert len(results) == 1
