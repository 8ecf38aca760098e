"""``copy_image`` / ``trio-cfsctl oci copy IMAGE --from REPO``: an image's closure between
repositories.

Oracles: ``fsck`` of both repositories (every object re-hashed, every layer stream
reassembled and matched against its diff_id); C ``composefs-info`` (``dump`` of the
copied image equals the source's; ``missing-objects`` against the destination's
``objects/`` is empty); inode numbers (hard links on one filesystem, copies on a
tmpfs); and, as root, the copied image mounted from the destination alone (the source
deleted) compared entry by entry with ``umoci unpack`` of the same image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from oracles import need_c_tool
from trio_composefs import DigestMismatchError, RepositoryError
from trio_composefs.formats import Algorithm, Digest
from trio_composefs.maintenance import fsck
from trio_composefs.oci import copy_image, open_image, open_source, parse_source, pull_image
from trio_composefs.repository import Repository, referenced_objects
from trio_composefs.repository._reading import object_digests
from trio_composefs.testing import write_sample_layout

CLI = [sys.executable, "-m", "trio_composefs"]


def new_repo(path: Path, algorithm: Algorithm = Algorithm.SHA256) -> Repository:
    return Repository.init(path, algorithm=algorithm, insecure=True)


@pytest.fixture
def src(tmp_path: Path) -> Iterator[Repository]:
    """A repository with the sample image pulled as ``sample``."""
    layout = tmp_path / "layout"
    write_sample_layout(layout, tag="sample")
    with new_repo(tmp_path / "src") as repo:

        async def pull() -> None:
            async with open_source(parse_source(f"oci:{layout}:sample")) as source:
                await pull_image(repo, source, tag="sample")

        trio.run(pull)
        yield repo


def closure_objects(repo: Repository) -> set[Digest]:
    """Every object the image ``sample`` needs, found independently of copy_image:
    its streams, their objects, and its composefs images and their objects."""
    stored = open_image(repo, "sample")
    out = {stored.manifest_stream, stored.config_stream}
    for name in ("oci-manifest-" + stored.manifest_digest, "oci-config-" + stored.config_digest):
        out.update(object_digests(repo, name))
    for diff_id, stream in stored.layers:
        out.add(stream)
        out.update(object_digests(repo, f"oci-layer-{diff_id}"))
    for _, image in stored.images:
        out.add(image)
        out.update(referenced_objects(repo, image))
    return out


def object_file(repo: Repository, digest: Digest) -> Path:
    return Path(repo.path) / "objects" / digest.object_path()


async def assert_fsck_clean(*repos: Repository) -> None:
    for repo in repos:
        report = await fsck(repo)
        assert report.ok, report.problems


def composefs_info(*args: str) -> str:
    return subprocess.run(
        [need_c_tool("composefs-info"), *args], capture_output=True, text=True, check=True
    ).stdout


def image_file(repo: Repository, tag: str = "sample") -> Path:
    ((_, image),) = [(k, v) for k, v in open_image(repo, tag).images if k.endswith("v1")]
    return object_file(repo, image)


async def test_copy_links_everything_and_both_check_clean(src: Repository, tmp_path: Path) -> None:
    with new_repo(tmp_path / "dst") as dst:
        stats = await copy_image(src, dst, "sample", tag="copied")
        needed = closure_objects(src)
        assert stats.objects == len(needed)
        assert (stats.linked, stats.copied, stats.present) == (len(needed), 0, 0)
        for digest in needed:  # one inode, two names
            assert object_file(src, digest).stat().st_ino == object_file(dst, digest).stat().st_ino
        stored, copied = open_image(src, "sample"), open_image(dst, "copied")
        assert copied.manifest_digest == stats.manifest_digest == stored.manifest_digest
        assert (copied.manifest, copied.config, copied.layers, copied.images) == (
            stored.manifest,
            stored.config,
            stored.layers,
            stored.images,
        )
        assert dst.list_streams() == src.list_streams()
        assert dst.list_images() == src.list_images()
        await assert_fsck_clean(src, dst)
        # C composefs: the same image, and every object it names is in dst
        assert composefs_info("dump", str(image_file(dst, "copied"))) == composefs_info(
            "dump", str(image_file(src))
        )
        missing = composefs_info(
            f"--basedir={dst.path}/objects", "missing-objects", str(image_file(dst, "copied"))
        )
        assert missing == ""
        # again: nothing to do but the tag
        again = await copy_image(src, dst, "@" + stored.manifest_digest, tag="again")
        assert again.present == again.objects
        assert again.linked == again.copied == 0
        assert open_image(dst, "again").manifest_digest == stored.manifest_digest


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs (another filesystem than tmp_path's), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "tmpfs"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


async def test_copy_across_filesystems_copies(src: Repository, tmpfs: Path) -> None:
    assert os.stat(tmpfs).st_dev != os.stat(src.path).st_dev
    with new_repo(tmpfs / "dst") as dst:
        stats = await copy_image(src, dst, "sample", tag="sample")
        assert (stats.linked, stats.copied) == (0, stats.objects)
        for digest in closure_objects(src):
            assert object_file(dst, digest).read_bytes() == object_file(src, digest).read_bytes()
        await assert_fsck_clean(dst)
        missing = composefs_info(
            f"--basedir={dst.path}/objects", "missing-objects", str(image_file(dst))
        )
        assert missing == ""


async def test_corrupt_source_object_is_refused_and_nothing_named(
    src: Repository, tmp_path: Path
) -> None:
    stored = open_image(src, "sample")
    diff_id, _ = stored.layers[0]
    victim = object_digests(src, f"oci-layer-{diff_id}")[0]
    path = object_file(src, victim)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with new_repo(tmp_path / "dst") as dst:
        with pytest.raises(DigestMismatchError, match=rf"{victim.object_path()} is corrupt"):
            await copy_image(src, dst, "sample", tag="t")
        assert not dst.has_object(victim)
        assert dst.list_streams() == {}
        assert dst.list_stream_refs() == {}
        assert dst.list_images() == {}
        await assert_fsck_clean(dst)  # what was linked is unnamed garbage, not damage


async def test_cancelled_copy_names_nothing(
    src: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled after a few objects: the destination names nothing; a second copy completes."""
    real = Repository.add_object_from
    added: list[Digest] = []
    scope = trio.CancelScope()

    def add_then_cancel(self: Repository, source: Repository, digest: Digest) -> str:
        outcome = real(self, source, digest)
        added.append(digest)
        if len(added) == 3:
            trio.from_thread.run_sync(scope.cancel)
        return outcome

    monkeypatch.setattr(Repository, "add_object_from", add_then_cancel)
    with new_repo(tmp_path / "dst") as dst:
        with scope:
            await copy_image(src, dst, "sample", tag="t", jobs=1)
        assert scope.cancelled_caught
        assert 3 <= len(added) < len(closure_objects(src))
        assert dst.list_streams() == {}
        assert dst.list_stream_refs() == {}
        assert dst.list_images() == {}
        monkeypatch.undo()
        stats = await copy_image(src, dst, "sample", tag="t")
        assert stats.present == 3
        assert open_image(dst, "t").manifest_digest == open_image(src, "sample").manifest_digest
        await assert_fsck_clean(dst)


async def test_corrupt_source_manifest_is_refused(src: Repository, tmp_path: Path) -> None:
    stored = open_image(src, "sample")
    (json_object,) = object_digests(src, f"oci-manifest-{stored.manifest_digest}")
    path = object_file(src, json_object)
    path.chmod(0o644)
    data = path.read_bytes()
    at = data.index(b'"layers":[{"digest":"sha256:') + 29  # a compressed blob's digest
    hexdigit = b"0" if data[at : at + 1] != b"0" else b"1"
    path.write_bytes(data[:at] + hexdigit + data[at + 1 :])  # valid JSON, same length
    with new_repo(tmp_path / "dst") as dst:
        with pytest.raises(DigestMismatchError, match=r"stored manifest .* has digest"):
            await copy_image(src, dst, "sample")
        assert dst.list_streams() == {}


async def test_different_algorithms_are_refused(src: Repository, tmp_path: Path) -> None:
    with (
        new_repo(tmp_path / "dst", Algorithm.SHA512) as dst,
        pytest.raises(RepositoryError, match="the object ids differ between algorithms"),
    ):
        await copy_image(src, dst, "sample")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)


def test_cli(src: Repository, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    new_repo(dst).close()
    src_path = str(src.path)
    digest = open_image(src, "sample").manifest_digest
    src.close()  # the CLI opens it itself
    done = cli("--insecure", "--repo", str(dst), "oci", "copy", "sample", "--from", src_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"manifest {digest}"
    assert lines[-1] == "tagged   sample"  # IMAGE is a tag: the default tag
    done = cli("--repo", str(dst), "oci", "copy", "@" + digest, "--from", src_path)
    assert done.returncode == 0, done.stderr
    assert "tagged" not in done.stdout  # a digest names no tag
    assert "already present" in done.stdout
    done = cli("--repo", str(dst), "oci", "copy", "nope", "--from", src_path)
    assert done.returncode == 1
    assert "nope" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    done = cli("--repo", str(dst), "oci", "images")
    assert "sample" in done.stdout


def test_mount_the_copy_without_the_source(tmp_path: Path, tmpfs: Path) -> None:
    """The copy alone (source deleted, destination on another filesystem) mounts and
    shows what ``umoci unpack`` shows for the same image."""
    from test_mount_images import scan_mount, umoci_unpacked
    from test_mount_kernel import _REASON as _MOUNT_REASON
    from test_tree_oracle import UMOCI
    from treecompare import assert_same_tree
    from trio_composefs.mount import unmount

    if _MOUNT_REASON is not None or UMOCI is None:
        pytest.skip(_MOUNT_REASON or "umoci is not installed")
    layout = tmp_path / "layout"
    write_sample_layout(layout, tag="sample")
    gzipped = tmp_path / "gz"  # umoci cannot read zstd layers (same diff_ids)
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format=gzip",
         f"oci:{layout}:sample", f"oci:{gzipped}:sample"],
        check=True,
    )  # fmt: skip
    theirs = umoci_unpacked(gzipped, "sample", tmp_path / "bundle")
    new_repo(tmp_path / "src").close()
    new_repo(tmpfs / "dst").close()
    for args in (
        ["--repo", str(tmp_path / "src"), "oci", "pull", f"oci:{layout}:sample", "sample"],
        ["--repo", str(tmpfs / "dst"), "oci", "copy", "sample", "--from", str(tmp_path / "src")],
    ):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
    shutil.rmtree(tmp_path / "src")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = cli("--repo", str(tmpfs / "dst"), "oci", "mount", "sample", str(mnt))
    assert done.returncode == 0, done.stderr
    try:
        assert_same_tree(theirs, scan_mount(mnt))
    finally:
        unmount(mnt)
