"""Our tree from layers against ``umoci unpack`` of the same OCI image (the real oracle).

Multi-layer images are built with real tools: directory trees archived by GNU tar
(``--format=posix --xattrs``: PAX nanosecond mtimes, ``SCHILY.xattr``), plus a layer
written by Python's :mod:`tarfile` for what a directory cannot hold (a hard link to a
file of a lower layer, entries whose parent directories are missing). The image is
pulled into a repository with :func:`pull_image`; our tree is built from the layer
splitstreams; ``umoci unpack`` extracts the same layout, and the extracted rootfs is
read back with :func:`scan_directory` using the same fs-verity digests. The two trees
must agree entry by entry (``treecompare``), before and after the OCI transform, with
only these documented allowances:

* the root directory's own metadata before the transform (upstream ignores the layers'
  root entry: the transform copies ``/usr``'s);
* the mtime of directories created for missing parents (umoci uses the extraction time;
  we use the entry's mtime, see ``fs/_layers.py``).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ocifixtures import Layout
from treecompare import assert_same_tree, compare_trees, summary
from trio_composefs.formats import Algorithm, Digest, FsVerityHasher
from trio_composefs.fs import FileSystem
from trio_composefs.fs._layers import TreeBuilder, transform_for_oci
from trio_composefs.images._scan import scan_directory
from trio_composefs.oci import open_image, open_source, parse_source, pull_image
from trio_composefs.oci._image_tree import image_filesystem
from trio_composefs.repository import Repository, iter_layer_entries

UMOCI = shutil.which("umoci")
TAR = shutil.which("tar")

pytestmark = [
    pytest.mark.skipif(UMOCI is None, reason="umoci is not installed"),
    pytest.mark.skipif(TAR is None, reason="GNU tar is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (devices, owners, capabilities)"),
]

#: cap_net_raw+ep, VFS_CAP_REVISION_2 (what ``setcap cap_net_raw+ep`` writes)
CAPABILITY = bytes.fromhex("010000020020000000000000") + bytes(8)
T0 = 1_700_000_000_000_000_000  # ns


def hash_fd(fd: int, size: int) -> Digest:
    hasher = FsVerityHasher(Algorithm.SHA256)
    done = 0
    while piece := os.read(fd, 1 << 20):
        hasher.update(piece)
        done += len(piece)
    assert done == size
    return hasher.digest()


def content(size: int, seed: int) -> bytes:
    block = bytes((seed * 31 + i) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


class TreeMaker:
    """Write files under a layer directory; timestamps are applied by :meth:`finish`."""

    def __init__(self, root: Path, *, exist_ok: bool = False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=exist_ok)
        self.times: list[tuple[Path, int]] = [(root, T0)]
        self.tick = 0

    def _stamp(self, path: Path, mtime_ns: int | None) -> None:
        self.tick += 1
        self.times.append(
            (path, mtime_ns if mtime_ns is not None else T0 + self.tick * 1_000_333_777)
        )

    def dir(
        self,
        rel: str,
        mode: int = 0o755,
        owner: tuple[int, int] = (0, 0),
        mtime_ns: int | None = None,
    ) -> Path:
        path = self.root / rel
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        os.chown(path, *owner)
        self._stamp(path, mtime_ns)
        return path

    def file(
        self,
        rel: str,
        data: bytes = b"",
        mode: int = 0o644,
        owner: tuple[int, int] = (0, 0),
        xattrs: dict[str, bytes] | None = None,
        mtime_ns: int | None = None,
    ) -> Path:
        path = self.root / rel
        path.write_bytes(data)
        os.chown(path, *owner)
        path.chmod(mode)  # after chown, which clears setuid
        for name, value in (xattrs or {}).items():
            os.setxattr(path, name, value)
        self._stamp(path, mtime_ns)
        return path

    def link(self, rel: str, target: str) -> None:
        os.link(self.root / target, self.root / rel)

    def symlink(self, rel: str, target: str, owner: tuple[int, int] = (0, 0)) -> None:
        path = self.root / rel
        os.symlink(target, path)
        os.chown(path, *owner, follow_symlinks=False)
        self._stamp(path, None)

    def node(self, rel: str, mode: int, rdev: int = 0) -> None:
        path = self.root / rel
        os.mknod(path, mode, rdev)
        self._stamp(path, None)

    def finish(self) -> Path:
        for path, ns in reversed(self.times):  # children before their parents
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
        return self.root


def gnu_tar(tree: Path, out: Path) -> bytes:
    subprocess.run(
        [
            str(TAR),
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--sort=name",
            "-C",
            str(tree),
            "-cf",
            str(out),
            ".",
        ],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def python_tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = 1_700_000_500
    ti.mode = 0o644
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def rich_layers(tmp: Path) -> tuple[list[bytes], set[bytes]]:
    """Three layers covering every rule; also the paths of implicit parent directories."""
    one = TreeMaker(tmp / "layer1")
    one.dir("usr", mtime_ns=T0 + 123_456_789)
    one.dir("usr/bin")
    one.file(
        "usr/bin/ping", content(70_000, 1), mode=0o4755, xattrs={"security.capability": CAPABILITY}
    )
    one.file("usr/bin/tool", content(65, 2), mode=0o755, owner=(1000, 1000))
    one.link("usr/bin/tool-again", "usr/bin/tool")
    one.file("usr/bin/tiny", b"#!/bin/sh\n", mode=0o755)
    one.link("usr/bin/tiny-again", "usr/bin/tiny")
    one.dir("usr/lib")
    one.file("usr/lib/big.so", content(3 * 1024 * 1024 + 17, 3))
    one.file("usr/lib/s0", b"")
    one.file("usr/lib/s64", content(64, 4), mode=0o600)
    one.file("usr/lib/s65", content(65, 5), mode=0o2755, owner=(0, 50))
    one.symlink("usr/lib64", "lib")
    one.symlink("usr/dangling", "/does/not/exist", owner=(7, 8))
    one.dir("etc", mode=0o750, owner=(1000, 1001))
    one.file(
        "etc/passwd",
        b"root:x:0:0::/root:/bin/sh\n",
        owner=(1000, 1001),
        xattrs={"user.note": b"v\x00\xff"},
    )
    one.file("etc/os-release", content(200, 6), xattrs={"user.a": b"1", "trusted.t": b"secret"})
    one.dir("dev")
    one.node("dev/null", 0o20666, os.makedev(1, 3))
    one.node("dev/loop7", 0o60640, os.makedev(7, 250))
    one.node("dev/big-minor", 0o20600, os.makedev(300, 70000))
    one.dir("run")
    one.file("run/pid", b"1\n")
    one.node("run/fifo", 0o10600)
    one.dir("opaque")
    one.file("opaque/old1", content(100, 7))
    one.dir("opaque/sub")
    one.file("opaque/sub/x", b"x")
    one.dir("wh")
    one.file("wh/gone", content(90, 8))
    one.dir("wh/gone-dir")
    one.file("wh/gone-dir/inner", b"i")
    one.file("wh/keep", b"k")
    one.dir("replace-me")
    one.file("replace-me/child", b"c")
    one.file("becomes-dir", b"f")
    one.dir("tmp", mode=0o1777)
    layer1 = gnu_tar(one.finish(), tmp / "layer1.tar")

    two = TreeMaker(tmp / "layer2")
    two.dir("usr", mode=0o755, owner=(0, 0), mtime_ns=T0 + 999_999_999)  # dir over dir
    two.dir("opaque")
    two.file("opaque/.wh..wh..opq")
    two.file("opaque/new", content(66, 9))
    two.dir("wh")
    two.file("wh/.wh.gone")
    two.file("wh/.wh.gone-dir")
    two.file("wh/.wh.never-existed")
    two.dir("etc", mode=0o755, owner=(0, 0))
    two.file("etc/passwd", b"root:x:0:0::/root:/bin/bash\n")
    two.file("replace-me", content(1000, 10))
    two.dir("becomes-dir")
    two.file("becomes-dir/inside", b"in")
    layer2 = gnu_tar(two.finish(), tmp / "layer2.tar")

    layer3 = python_tar(
        [
            (info("usr/bin/ping-link", tarfile.LNKTYPE, linkname="usr/bin/ping"), b""),
            (info("etc/tool-link", tarfile.LNKTYPE, linkname="usr/bin/tool"), b""),
            (
                info(
                    "implicit/a/b/file",
                    size=5,
                    uid=33,
                    gid=44,
                    pax_headers={"mtime": "1700000600.5"},
                ),
                b"hello",
            ),
            (info("implicit/a/b/later", size=0, mode=0o600), b""),
            (info("implicit/a/c", tarfile.SYMTYPE, linkname="b/file", mode=0o777), b""),
        ]
    )
    return [layer1, layer2, layer3], {b"/implicit", b"/implicit/a", b"/implicit/a/b"}


async def pull_and_build(
    tmp: Path, tars: list[bytes], tag: str = "t"
) -> tuple[FileSystem, FileSystem]:
    """Our raw tree (from the pulled layer streams) and umoci's (scanned)."""
    layout = Layout(tmp / "layout")
    image = layout.add_image(
        tars, compression=[("gzip", None)[i % 2] for i in range(len(tars))], tag=tag
    )
    layout.write_index()
    with Repository.init(tmp / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        async with open_source(parse_source(f"oci:{layout.path}:{tag}")) as source:
            await pull_image(repo, source)
        builder = TreeBuilder()
        for diff_id in image.diff_ids:
            builder.add_layer(iter_layer_entries(repo, f"oci-layer-{diff_id}"), name=diff_id)
    bundle = tmp / "bundle"
    done = await trio.run_process(
        [str(UMOCI), "unpack", "--image", f"{layout.path}:{tag}", str(bundle)],
        capture_stdout=True,
        capture_stderr=True,
        umask=0o022,
        check=False,
    )
    assert done.returncode == 0, f"umoci unpack failed: {done.stderr.decode(errors='replace')}"
    theirs = scan_directory(bundle / "rootfs", digest_file=hash_fd)
    return builder.filesystem, theirs


async def test_layers_match_umoci_unpack(tmp_path: Path) -> None:
    tars, implicit = rich_layers(tmp_path)
    ours, theirs = await pull_and_build(tmp_path, tars)

    # coverage: what the comparison actually exercised
    counts = summary(ours)
    assert counts["hard-link groups"] == 3
    for kind in ("InlineFile", "ExternalFile", "Symlink", "CharDevice", "BlockDevice", "Fifo"):
        assert counts.get(kind, 0) >= 1, kind

    # before the transform: everything but the root's own stat and invented mtimes
    assert_same_tree(ours, theirs, ignore_root=True, ignore_mtime=implicit)

    # the OCI transform on both sides: nothing left to allow but the invented mtimes
    # (user.* kept first, then the default allowlist: the filter only ever removes)
    for keep_user in (True, False):
        transform_for_oci(ours, keep_user_xattrs=keep_user)
        transform_for_oci(theirs, keep_user_xattrs=keep_user)
        assert_same_tree(ours, theirs, ignore_mtime=implicit)
    usr = ours.root.entries[b"usr"]
    assert (ours.root.stat.mtime, ours.root.stat.mtime_nsec) == (
        usr.stat.mtime,
        usr.stat.mtime_nsec,
    )
    assert ours.root.stat.mtime_nsec == 999_999_999  # layer 2's /usr, nanoseconds kept


def retarget(path: Path, target: str) -> None:
    path.unlink()
    os.symlink(target, path)


def unlink_and_copy(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def test_treecompare_reports_every_kind_of_difference(tmp_path: Path) -> None:
    """The comparison itself: a difference in any field is caught."""
    maker = TreeMaker(tmp_path / "t")
    maker.dir("usr")
    maker.file("usr/a", content(100, 1), xattrs={"user.x": b"1"})
    maker.link("usr/b", "usr/a")
    maker.file("usr/c", b"c")
    maker.symlink("usr/s", "a")
    root = maker.finish()
    base = scan_directory(root, digest_file=hash_fd)
    assert compare_trees(base, scan_directory(root, digest_file=hash_fd)) == []

    changes: list[tuple[Callable[[], object], str]] = [
        (lambda: os.chmod(root / "usr/c", 0o600), "mode"),
        (lambda: os.chown(root / "usr/c", 5, 0), "uid"),
        (lambda: os.utime(root / "usr/c", ns=(1, 1)), "mtime"),
        (lambda: (root / "usr/c").write_bytes(b"d"), "content"),
        (lambda: os.setxattr(root / "usr/c", "user.y", b"2"), "xattrs"),
        (lambda: retarget(root / "usr/s", "b"), "target"),
        (lambda: unlink_and_copy(root / "usr/b", content(100, 1)), "hard-link group"),
        (lambda: (root / "usr/new").write_bytes(b""), "only in actual"),
    ]
    for change, field in changes:
        shutil.rmtree(root)
        maker = TreeMaker(tmp_path / "t")
        maker.dir("usr")
        maker.file("usr/a", content(100, 1), xattrs={"user.x": b"1"})
        maker.link("usr/b", "usr/a")
        maker.file("usr/c", b"c")
        maker.symlink("usr/s", "a")
        maker.finish()
        change()
        problems = compare_trees(base, scan_directory(root, digest_file=hash_fd))
        assert any(field in p for p in problems), (field, problems)


async def test_same_layer_whiteouts_follow_upstream_not_oci(tmp_path: Path) -> None:
    """Upstream issue #8: whiteouts act at once, also on entries of their own layer.

    umoci follows the OCI rule (a whiteout hides lower layers only), so exactly the
    entries added before a whiteout in the same layer differ; everything else agrees,
    including a whiteout in a directory that does not exist (nothing is created).
    """
    d = tarfile.DIRTYPE
    lower = python_tar(
        [
            (info("usr", d, mode=0o755), b""),
            (info("d", d, mode=0o755), b""),
            (info("d/old", size=1), b"o"),
            (info("w", d, mode=0o755), b""),
            (info("w/x", size=1), b"x"),
        ]
    )
    upper = python_tar(
        [
            (info("d", d, mode=0o755), b""),
            (info("d/+early", size=1), b"e"),  # before the marker, same layer
            (info("d/.wh..wh..opq"), b""),
            (info("d/late", size=1), b"l"),
            (info("w/y", size=1), b"y"),
            (info("w/.wh.y"), b""),  # removes the y just added
            (info("w/.wh.x"), b""),
            (info("nowhere/a/.wh.b"), b""),
        ]
    )
    ours, theirs = await pull_and_build(tmp_path, [lower, upper])
    assert [p for p, _ in ours.walk()] == [b"/", b"/d", b"/d/late", b"/usr", b"/w"]
    assert compare_trees(ours, theirs, ignore_root=True) == [
        "b'/d/+early': only in actual (InlineFile)",
        "b'/w/y': only in actual (InlineFile)",
    ]


def umoci(*args: str) -> None:
    subprocess.run([str(UMOCI), *args], check=True, capture_output=True, umask=0o022)


def umoci_image(tmp: Path) -> Path:
    """An image whose layers umoci generated from rootfs changes (its whiteouts)."""
    layout = tmp / "layout"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:t")
    umoci("unpack", "--image", f"{layout}:t", str(tmp / "b1"))
    rootfs = tmp / "b1" / "rootfs"
    maker = TreeMaker(rootfs, exist_ok=True)
    maker.dir("usr", mtime_ns=T0 + 5)
    maker.dir("usr/bin")
    maker.file("usr/bin/ping", content(5000, 1), mode=0o4755)
    os.setxattr(rootfs / "usr/bin/ping", "security.capability", CAPABILITY)
    maker.file("usr/bin/a", content(65, 2), owner=(12, 34), xattrs={"user.k": b"v"})
    maker.link("usr/bin/b", "usr/bin/a")
    maker.file("usr/bin/small", b"s")
    maker.dir("usr/share/doc/pkg")
    maker.file("usr/share/doc/pkg/README", content(2 * 1024 * 1024, 3))
    maker.file("usr/share/doc/pkg/NEWS", b"")
    maker.dir("var/lib", mode=0o700)
    maker.file("var/lib/state", content(64, 4))
    maker.symlink("usr/lib", "share")
    maker.node("usr/null", 0o20666, os.makedev(1, 3))
    maker.finish()
    umoci("repack", "--image", f"{layout}:t", str(tmp / "b1"))

    umoci("unpack", "--image", f"{layout}:t", str(tmp / "b2"))
    rootfs = tmp / "b2" / "rootfs"
    shutil.rmtree(rootfs / "usr/share/doc")
    os.unlink(rootfs / "usr/bin/small")
    os.unlink(rootfs / "usr/lib")
    maker = TreeMaker(rootfs, exist_ok=True)
    maker.dir("usr/lib", mode=0o755)  # a symlink replaced by a directory
    maker.file("usr/lib/libc.so", content(300, 5))
    maker.link("usr/bin/c", "usr/bin/a")  # a new name for a lower layer's file
    maker.file("var/lib/state", content(65, 6), mtime_ns=T0 + 77)
    maker.dir("run/lock")
    maker.file("run/lock/x", b"")
    maker.finish()
    umoci("repack", "--image", f"{layout}:t", str(tmp / "b2"))
    return layout


async def test_umoci_built_layers_match_umoci_unpack(tmp_path: Path) -> None:
    layout = umoci_image(tmp_path)
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        async with open_source(parse_source(f"oci:{layout}:t")) as source:
            await pull_image(repo, source, tag="mine")
        ours = image_filesystem(repo, open_image(repo, "mine"), transform=False)
        transformed = image_filesystem(repo, open_image(repo, "mine"))
    await trio.run_process(
        [str(UMOCI), "unpack", "--image", f"{layout}:t", str(tmp_path / "final")],
        capture_stdout=True,
        capture_stderr=True,
    )
    theirs = scan_directory(tmp_path / "final" / "rootfs", digest_file=hash_fd)
    assert_same_tree(ours, theirs, ignore_root=True)
    assert b"/usr/share/doc" not in dict(ours.walk())
    transform_for_oci(theirs)
    assert_same_tree(transformed, theirs)


async def test_empty_xattr_values_as_gnu_tar_extracts_them(tmp_path: Path) -> None:
    """An xattr with an empty value: GNU tar writes ``SCHILY.xattr.user.e=`` and
    restores the empty xattr; umoci (Go's archive/tar) drops it. We keep it, as GNU tar
    does. (What upstream's tar-core does here is not verified: an open question.)"""
    maker = TreeMaker(tmp_path / "layer")
    maker.dir("usr")
    maker.file("usr/f", b"", xattrs={"user.e": b"", "user.f": b"x"})
    tar = gnu_tar(maker.finish(), tmp_path / "layer.tar")
    ours, theirs = await pull_and_build(tmp_path, [tar])
    assert compare_trees(ours, theirs, ignore_root=True) == [
        "b'/usr/f': xattrs {b'user.e': b'', b'user.f': b'x'} != {b'user.f': b'x'}"
    ]
    extracted = tmp_path / "gnu-extracted"
    extracted.mkdir()
    await trio.run_process(
        [str(TAR), "--xattrs", "--xattrs-include=*", "-xf", str(tmp_path / "layer.tar")],
        cwd=extracted,
    )
    assert_same_tree(ours, scan_directory(extracted, digest_file=hash_fd), ignore_root=True)


async def test_image_without_usr_gets_a_default_root(tmp_path: Path) -> None:
    """Upstream refuses an image without /usr; we give its root mode 0755, root:root."""
    layout = Layout(tmp_path / "layout")
    layout.add_image([python_tar([(info("etc/x", size=1), b"x")])], tag="t")
    layout.write_index()
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        async with open_source(parse_source(f"oci:{layout.path}:t")) as source:
            await pull_image(repo, source, tag="t")
        image = open_image(repo, "t")
        raw = image_filesystem(repo, image, transform=False)
        assert [p for p, _ in raw.walk()] == [b"/", b"/etc", b"/etc/x"]
        tree = image_filesystem(repo, image)
        assert [p for p, _ in tree.walk()] == [b"/", b"/etc", b"/etc/x"]
        assert (tree.root.stat.mode, tree.root.stat.uid, tree.root.stat.gid) == (0o755, 0, 0)
        assert image.image is not None  # the pull made its image
