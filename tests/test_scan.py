"""Scanning a directory tree: against C ``mkcomposefs`` reading the same directory.

C mkcomposefs 1.0.8 (built by ``.ci/build-composefs``) scans a directory, and
``composefs-info dump`` of its image lists every entry it saw: metadata, inline
content, fs-verity digests of the large files, xattrs. C breaks hard links (each name
is its own inode), so that comparison uses ``hardlinks=False``; the hard-link groups of
the default mode are checked against the filesystem's own ``(st_dev, st_ino)``.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tarfixtures import has_xattrs, make_tree
from test_tree_oracle import CAPABILITY, hash_fd
from treecompare import assert_same_tree, link_groups, tree_from_c_dump
from trio_composefs._errors import ScanError
from trio_composefs.formats import Digest
from trio_composefs.fs import Directory, ExternalFile, InlineFile, Leaf, Socket
from trio_composefs.images import _scan as scan
from trio_composefs.images._scan import scan_directory

C_BIN = Path("/var/cache/trio-composefs/composefs-1.0.8/bin")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (devices, owners, security.capability)"
)


def c_tool(name: str) -> str:
    path = shutil.which(name, path=f"{C_BIN}:{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"C {name} not built (run .ci/build-composefs)")
    return path


def rich_tree(tmp: Path) -> Path:
    root = make_tree(tmp / "tree")
    (root / "setuid").write_bytes(b"#!/bin/sh\n" * 10)
    os.chown(root / "setuid", 1000, 1000)
    os.chmod(root / "setuid", 0o4755)
    os.setxattr(root / "setuid", "security.capability", CAPABILITY)
    (root / "files" / "s64").write_bytes(b"6" * 64)
    os.utime(root / "files" / "s64", ns=(1_700_000_000_123_456_789,) * 2)
    os.chown(root / "empty-dir", 70000, 4_000_000_000)
    os.utime(root / "empty-dir", ns=(-1_500_000_000, -1_500_000_000))  # before 1970
    os.setxattr(root / "empty-dir", "user.dir", b"a=b c\\\n")
    os.utime(root, ns=(1_700_000_000_000_000_001,) * 2)
    return root


@needs_root
def test_scan_matches_c_mkcomposefs(tmp_path: Path) -> None:
    mkcomposefs, info = c_tool("mkcomposefs"), c_tool("composefs-info")
    root = rich_tree(tmp_path)
    subprocess.run([mkcomposefs, str(root), str(tmp_path / "img")], check=True)
    dump = subprocess.run(
        [info, "dump", str(tmp_path / "img")], check=True, capture_output=True
    ).stdout
    theirs = tree_from_c_dump(dump)
    ours = scan_directory(root, digest_file=hash_fd, hardlinks=False)
    assert_same_tree(theirs, ours)
    if has_xattrs(root):
        assert ours.root.entries[b"files"].entries[b"s0"].stat.xattrs  # type: ignore[union-attr]


@needs_root
def test_hard_links_are_one_inode_and_read_once(tmp_path: Path) -> None:
    root = rich_tree(tmp_path)
    calls: list[int] = []

    def digest(fd: int, size: int) -> Digest:
        calls.append(size)
        return hash_fd(fd, size)

    fs = scan_directory(root, digest_file=digest)
    by_inode: dict[tuple[int, int], set[bytes]] = {}
    for path, inode in fs.walk():
        if isinstance(inode, Leaf):
            st = os.lstat(root / path.decode("utf-8", "surrogateescape").lstrip("/"))
            by_inode.setdefault((st.st_dev, st.st_ino), set()).add(path)
    expected = {frozenset(g) for g in by_inode.values() if len(g) > 1}
    assert link_groups(fs) == expected
    assert len(expected) == 2
    externals = {
        id(i) for _, i in fs.walk() if isinstance(i, Leaf) and isinstance(i.content, ExternalFile)
    }
    assert len(calls) == len(externals)  # once per inode, not per name
    broken = scan_directory(root, digest_file=digest, hardlinks=False)
    assert link_groups(broken) == set()


def test_inline_threshold_and_sockets(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "a64").write_bytes(b"a" * 64)
    (root / "b65").write_bytes(b"b" * 65)
    (root / "empty").write_bytes(b"")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        fs = scan_directory(root, digest_file=hash_fd)
    entries = fs.root.entries
    assert entries[b"a64"].content == InlineFile(b"a" * 64)  # type: ignore[union-attr]
    b65 = entries[b"b65"].content  # type: ignore[union-attr]
    assert isinstance(b65, ExternalFile)
    assert b65.size == 65
    assert entries[b"empty"].content == InlineFile(b"")  # type: ignore[union-attr]
    assert entries[b"sock"].content == Socket()  # type: ignore[union-attr]


@needs_root  # trusted.* xattrs
def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_bytes(b"x")
    os.symlink(real, tmp_path / "link")
    with pytest.raises(OSError, match="link") as info:
        scan_directory(tmp_path / "link", digest_file=hash_fd)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    os.symlink(real, real / "loop")
    os.setxattr(real / "f", "user.on-target", b"t")
    os.setxattr(real / "loop", "trusted.on-link", b"l", follow_symlinks=False)
    fs = scan_directory(real, digest_file=hash_fd)
    assert sorted(fs.root.entries) == [b"f", b"loop"]
    loop = fs.root.entries[b"loop"]
    assert not isinstance(loop, Directory)
    assert loop.stat.xattrs == {b"trusted.on-link": b"l"}  # the link's own, not f's


def test_depth_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan, "MAX_DEPTH", 4)
    (tmp_path / "t" / "a" / "b" / "c").mkdir(parents=True)
    scan_directory(tmp_path / "t", digest_file=hash_fd)
    (tmp_path / "t" / "a" / "b" / "c" / "d").mkdir()
    with pytest.raises(ScanError, match="deeper than 4"):
        scan_directory(tmp_path / "t", digest_file=hash_fd)


def test_errors_name_the_path(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "locked").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        scan_directory(root / "nothing-here", digest_file=hash_fd)

    def failing(fd: int, size: int) -> Digest:
        raise OSError(errno.EIO, "boom")

    (root / "locked" / "big").write_bytes(b"z" * 100)
    with pytest.raises(OSError, match="boom"):
        scan_directory(root, digest_file=failing)
