"""Test helpers for the EROFS and dumpfile writers: trees from hypothesis and from the
host, and the C composefs 1.0.8 tools as oracles.

The host scanner is test-only code: regular files become inline (<= 64 bytes, as
composefs-rs) or external files with a fake digest derived from the path; sizes and
types are the real ones, which is all an image records.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from pathlib import Path

from hypothesis import strategies as st

from oracles import need_c_tool
from trio_composefs.formats import Algorithm, Digest
from trio_composefs.fs import (
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    Fifo,
    FileSystem,
    InlineFile,
    Inode,
    Leaf,
    Socket,
    Stat,
    Symlink,
    write_dumpfile,
)

# --- the C oracles ---------------------------------------------------------------------


def dumpfile_bytes(fs: FileSystem) -> bytes:
    return b"".join(write_dumpfile(fs))


def c_mkcomposefs(dumpfile: bytes, *, version: int = 1) -> bytes:
    """C ``mkcomposefs --min-version=V --max-version=V --from-file`` of ``dumpfile``."""
    tool = need_c_tool("mkcomposefs")
    result = subprocess.run(
        [tool, f"--min-version={version}", f"--max-version={version}", "--from-file", "-", "-"],
        input=dumpfile,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def c_dump(image: bytes, tmp: Path) -> bytes:
    """C ``composefs-info dump`` of an image."""
    tool = need_c_tool("composefs-info")
    path = tmp / "image.cfs"
    path.write_bytes(image)
    return subprocess.run([tool, "dump", str(path)], capture_output=True, check=True).stdout


def first_difference(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    at = next((i for i in range(n) if a[i] != b[i]), n)
    return f"lengths {len(a)} and {len(b)}, first difference at byte {at}"


# --- hypothesis trees ------------------------------------------------------------------

_NAME_BYTES = st.binary(min_size=1, max_size=40).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
_NAMES = st.one_of(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
    .map(str.encode)
    .filter(lambda n: n not in (b".", b"..")),
    _NAME_BYTES,
    st.integers(200, 255).map(lambda n: b"L" * n),
)
_IDS = st.one_of(st.sampled_from([0, 0, 0, 1, 65535, 65536, 2**32 - 1]), st.integers(0, 2**32 - 1))
_MTIMES = st.one_of(
    st.sampled_from([0, 0, 0, 1700000000, -1, 2**31, -(2**40)]), st.integers(-(2**62), 2**62)
)
_NSECS = st.one_of(st.just(0), st.just(0), st.integers(0, 999_999_999))
_XATTR_NAMES = st.one_of(
    st.sampled_from(
        [
            b"user.a",
            b"user.b",
            b"user.=odd key",
            b"security.selinux",
            b"security.capability",
            b"security.ima",
            b"trusted.overlay.foo",
            b"trusted.overlay.metacopy",
            b"trusted.overlay.opaque",
            b"trusted.x",
            b"system.posix_acl_access",
            b"system.posix_acl_default",
            b"lustre.lov",
            b"user.overlay.whiteout",
        ]
    ),
    st.binary(min_size=1, max_size=30).filter(lambda k: b"\0" not in k).map(lambda k: b"user." + k),
)
_XATTR_VALUES = st.one_of(
    st.sampled_from([b"", b"y", b"x", b"-", b"system_u:object_r:usr_t:s0", b"=\n\\ "]),
    st.binary(max_size=100),
)
_XATTRS = st.dictionaries(_XATTR_NAMES, _XATTR_VALUES, max_size=6)
_SIZES = st.one_of(
    st.sampled_from(
        [
            *(1, 64, 65, 1234, 4095, 4096, 4097, 8192, 8193, 2**20, 2**20 + 1),
            *(2**32, 2**32 + 1, 2**43, 2**43 + 1, 2**50, 2**53 - 1, 2**53),
        ]
    ),
    st.integers(1, 2**53),
)


@st.composite
def stats(draw: st.DrawFn, *, perm_max: int = 0o7777) -> Stat:
    return Stat(
        draw(st.integers(0, perm_max)),
        draw(_IDS),
        draw(_IDS),
        draw(_MTIMES),
        draw(_NSECS),
        draw(_XATTRS),
    )


def _digest(draw: st.DrawFn) -> Digest | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    return Digest(Algorithm.SHA256, draw(st.binary(min_size=32, max_size=32)))


@st.composite
def leaf_contents(draw: st.DrawFn, *, payloads: bool = False) -> Leaf:
    """Any kind of leaf; with ``payloads``, some external files carry a dumpfile's own
    payload (or none), which C's reader does not give back as such."""
    kind = draw(st.integers(0, 9))
    s = draw(stats())
    if kind <= 1:
        if draw(st.integers(0, 9)) == 0:  # C inlines up to 5000 bytes, composefs-rs 64
            n = draw(st.sampled_from([65, 2047, 2048, 2049, 3000, 4095, 4096, 4097, 5000]))
            return Leaf(s, InlineFile(draw(st.binary(min_size=n, max_size=n))))
        return Leaf(s, InlineFile(draw(st.binary(max_size=64))))
    if kind <= 3:
        size, digest = draw(_SIZES), _digest(draw)
        if payloads and draw(st.integers(0, 4)) == 0:
            other = _digest(draw)
            path = other.object_path() if other is not None else None
            payload = draw(st.sampled_from([None, "ab/cdef", path]))
            return Leaf(s, ExternalFile(size, digest, payload))
        return Leaf(s, ExternalFile(size, digest))
    if kind <= 5:
        length = draw(st.one_of(st.integers(1, 60), st.integers(3900, 4095), st.integers(1, 4095)))
        target = draw(st.binary(min_size=length, max_size=length)).replace(b"\0", b"x")
        return Leaf(s, Symlink(target))
    if kind == 6:
        rdev = draw(st.sampled_from([0, 0, os.makedev(1, 3), os.makedev(8, 1), 2**32 - 1]))
        return Leaf(s, CharDevice(rdev))
    if kind == 7:
        return Leaf(s, BlockDevice(draw(st.sampled_from([0, os.makedev(259, 7), 123]))))
    if kind == 8:
        return Leaf(s, Fifo())
    return Leaf(s, Socket())


@st.composite
def filesystems(draw: st.DrawFn, *, payloads: bool = False) -> FileSystem:
    """A tree with every entry kind, hard links, big directories and shared xattrs."""
    root = Directory(draw(stats()))
    dirs = [root]
    leaves: list[Leaf] = []
    for _ in range(draw(st.integers(0, 25))):
        parent = dirs[draw(st.integers(0, len(dirs) - 1))]
        name = draw(_NAMES)
        if name in parent.entries:
            continue
        child: Inode
        if draw(st.integers(0, 3)) == 0:
            child = Directory(draw(stats()))
            dirs.append(child)
        else:
            child = draw(leaf_contents(payloads=payloads))
            leaves.append(child)
        parent.entries[name] = child
    # Hard links: more names for some leaves.
    if leaves:
        for _ in range(draw(st.integers(0, 4))):
            leaf = leaves[draw(st.integers(0, len(leaves) - 1))]
            parent = dirs[draw(st.integers(0, len(dirs) - 1))]
            name = draw(_NAMES)
            if name not in parent.entries:
                parent.entries[name] = leaf
    # A big directory: several dirent blocks and a tail anywhere around 2048.
    if draw(st.integers(0, 3)) == 0:
        big = dirs[draw(st.integers(0, len(dirs) - 1))]
        count = draw(st.integers(100, 700))
        width = draw(st.integers(1, 40))
        for i in range(count):
            big.entries.setdefault(b"f%05d" % i + b"n" * width, Leaf(Stat(0o644), Fifo()))
    # Many shared xattrs on a few inodes (> 128 refs on one inode).
    if draw(st.integers(0, 3)) == 0:
        many = {b"user.s%03d" % i: b"v%d" % (i % 7) for i in range(draw(st.integers(120, 200)))}
        targets: list[Inode] = [root]
        targets.extend(leaves)
        for inode in targets[: draw(st.integers(2, 4))]:
            inode.stat.xattrs.update(many)
    return FileSystem(root)


# --- host trees ------------------------------------------------------------------------


def scan_host(top: str, *, max_entries: int = 200_000) -> FileSystem:
    """A tree from a host directory (lstat, listxattr): test-only, fake digests.

    Regular files up to 64 bytes are inline with their real bytes; bigger ones are
    external with a digest made from the path. Hard links (same dev/ino) share a leaf.
    Unreadable entries are skipped.
    """

    def make_stat(st_: os.stat_result, path: str) -> Stat:
        xattrs: dict[bytes, bytes] = {}
        try:
            for name in os.listxattr(path, follow_symlinks=False):
                with contextlib.suppress(OSError):
                    xattrs[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            pass
        return Stat(
            stat.S_IMODE(st_.st_mode),
            st_.st_uid,
            st_.st_gid,
            st_.st_mtime_ns // 10**9,
            st_.st_mtime_ns % 10**9,
            xattrs,
        )

    seen: dict[tuple[int, int], Leaf] = {}
    count = 0

    def scan(path: str, st_: os.stat_result) -> Directory:
        nonlocal count
        directory = Directory(make_stat(st_, path))
        try:
            names = sorted(os.listdir(os.fsencode(path)))
        except OSError:
            return directory
        for name in names:
            if count >= max_entries:
                break
            child_path = os.path.join(os.fsencode(path), name)
            try:
                cst = os.lstat(child_path)
            except OSError:
                continue
            count += 1
            mode = cst.st_mode
            child_str = os.fsdecode(child_path)
            if stat.S_ISDIR(mode):
                directory.entries[name] = scan(child_str, cst)
                continue
            key = (cst.st_dev, cst.st_ino)
            if cst.st_nlink > 1 and key in seen:
                directory.entries[name] = seen[key]
                continue
            s = make_stat(cst, child_str)
            leaf: Leaf
            if stat.S_ISREG(mode):
                if cst.st_size <= 64:
                    try:
                        with open(child_path, "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    leaf = Leaf(s, InlineFile(data))
                else:
                    fake = hashlib.sha256(child_path).digest()
                    leaf = Leaf(s, ExternalFile(cst.st_size, Digest(Algorithm.SHA256, fake)))
            elif stat.S_ISLNK(mode):
                leaf = Leaf(s, Symlink(os.readlink(child_path)))
            elif stat.S_ISCHR(mode):
                leaf = Leaf(s, CharDevice(cst.st_rdev))
            elif stat.S_ISBLK(mode):
                leaf = Leaf(s, BlockDevice(cst.st_rdev))
            elif stat.S_ISFIFO(mode):
                leaf = Leaf(s, Fifo())
            else:
                leaf = Leaf(s, Socket())
            seen[key] = leaf
            directory.entries[name] = leaf
        return directory

    return FileSystem(scan(top, os.lstat(top)))
