"""Kernel mounts of composefs images: file-backed EROFS and the loop fallback, as root.

The images here are made independently of our own writer: a placeholder tree
(regular files > 64 bytes are sparse files of the right size carrying
``trusted.overlay.redirect`` and ``trusted.overlay.metacopy``; their contents are
objects named by the ``fsverity digest`` tool) packed by ``mkfs.erofs
--chunksize=4096``, as in composefs-erofs-notes §7. The mounted tree is compared
entry by entry with the source tree the placeholders were made from.

Every mount is undone in a ``finally``; the autouse fixture checks with
``findmnt`` and ``losetup`` that no mount and no loop device is left under the
test's temporary directories, and cleans up (failing the test) if one is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_composefs import MountError
from trio_composefs.mount import (
    MountResult,
    _kernel,
    kernel_filesystems,
    mount_image_file,
    mounted,
    unmount,
)
from trio_composefs.mount import _async as mount_async

TOOLS = ("mkfs.erofs", "fsverity", "findmnt", "losetup")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "mounting composefs images needs root"
    fs = kernel_filesystems()
    for name in ("erofs", "overlay"):
        if name not in fs:
            return f"the kernel lists no {name} in /proc/filesystems"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

ERO_TMP_PREFIX = ".trio-composefs-erofs."
EPOCH = 1_700_000_000
INLINE_MAX = 64


# --- leftovers ----------------------------------------------------------------------------------


def _mount_targets() -> list[str]:
    out = subprocess.run(
        ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=True
    ).stdout
    return [line.encode().decode("unicode_escape") for line in out.splitlines()]


def _loop_backing() -> list[tuple[str, str]]:
    out = subprocess.run(
        ["losetup", "-ln", "-O", "NAME,BACK-FILE"], capture_output=True, text=True, check=True
    ).stdout
    pairs = []
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        pairs.append((name, back.strip()))
    return pairs


def _erofs_tmpdirs() -> set[str]:
    import tempfile

    base = tempfile.gettempdir()
    return {n for n in os.listdir(base) if n.startswith(ERO_TMP_PREFIX)}


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    base = str(tmp_path_factory.getbasetemp())
    tmpdirs_before = _erofs_tmpdirs()
    fds_before = set(os.listdir("/proc/self/fd"))
    yield
    # a leaked fd could be a detached EROFS or overlay mount, alive but invisible to findmnt
    leaked = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in set(os.listdir("/proc/self/fd")) - fds_before
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert leaked == {}, "file descriptors left open"
    mounts = [t for t in _mount_targets() if t.startswith(base) or ERO_TMP_PREFIX in t]
    loops = [(n, b) for n, b in _loop_backing() if b.startswith(base)]
    tmpdirs = _erofs_tmpdirs() - tmpdirs_before
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", target], check=False)
    for name, _ in loops:
        subprocess.run(["losetup", "-d", name], check=False)
    assert (mounts, loops, tmpdirs) == ([], [], set()), "mounts, loop devices or dirs left"


@contextlib.contextmanager
def mounted_sync(*args: Any, **kwargs: Any) -> Iterator[MountResult]:
    result = mount_image_file(*args, **kwargs)
    try:
        yield result
    finally:
        unmount(result.mountpoint)


def is_mount(path: Path) -> bool:
    return os.path.ismount(path)


def _options(target: Path) -> list[str]:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", str(target)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().split(",")


# --- the source tree, its objects and its image -------------------------------------------------

# struct vfs_cap_data, revision 2: magic_etc (revision | effective), then permitted and
# inheritable for the two 32-bit halves. cap_net_bind_service (10), effective.
CAPABILITY = struct.pack("<IIIII", 0x02000000 | 1, 1 << 10, 0, 0, 0)
# posix_acl_xattr: version 2, then (tag u16, perm u16, id u32) entries in tag order:
# USER_OBJ rw-, USER 1000 r--, GROUP_OBJ r--, MASK r--, OTHER r--.
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in [
        (0x01, 6, 0xFFFFFFFF),
        (0x02, 4, 1000),
        (0x04, 4, 0xFFFFFFFF),
        (0x10, 4, 0xFFFFFFFF),
        (0x20, 4, 0xFFFFFFFF),
    ]
)


def make_source(root: Path) -> None:
    """A tree with every kind of entry and metadata a composefs image must carry."""
    rnd = random.Random(12)
    for d in ("data", "bin", "etc/deep/er", "home/user", "dev", "shared", "tmp", "usr/lib"):
        (root / d).mkdir(parents=True, exist_ok=True)
    contents = {
        "data/empty": b"",
        "data/tiny": b"hello\n",
        "data/b64": bytes(rnd.randrange(256) for _ in range(64)),
        "data/b65": bytes(rnd.randrange(256) for _ in range(65)),
        "data/page": rnd.randbytes(4096),
        "data/page1": rnd.randbytes(4097),
        "data/big": rnd.randbytes(3 * 2**20 + 17),
        "data/with space": b"spaces in a name\n" * 10,
        "bin/su": rnd.randbytes(1000),
        "etc/a": b"inline, hard-linked\n",
        "etc/deep/er/file": b"deep\n" * 40,
        "home/user/owned": rnd.randbytes(200),
        "home/user/owned-inline": b"owned\n",
    }
    for name, data in contents.items():
        (root / name).write_bytes(data)
    os.link(root / "data/big", root / "bin/big-link")
    os.link(root / "etc/a", root / "etc/a-link")
    os.link(root / "etc/a", root / "etc/deep/a-link2")
    os.symlink("usr/lib", root / "lib")
    os.symlink("/etc/passwd", root / "etc/abs")
    os.symlink("../nowhere", root / "etc/dangling")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.mknod(root / "dev/big", 0o600 | stat.S_IFCHR, os.makedev(300, 70000))
    os.mkfifo(root / "dev/fifo", 0o644)
    os.setxattr(root / "data/page", "user.comment", b"hello xattr")
    os.setxattr(root / "data/tiny", "user.empty", b"")
    os.setxattr(root / "etc", "user.dir", b"x" * 100)
    os.setxattr(root / "bin/su", "security.capability", CAPABILITY)
    owners = {
        "home/user": (1000, 1000),
        "home/user/owned": (100000, 200000),
        "home/user/owned-inline": (70000, 65536),
        "dev/loop9": (0, 6),
        "lib": (4000000000, 4000000001),
    }
    for name, (uid, gid) in owners.items():
        os.chown(root / name, uid, gid, follow_symlinks=False)
    modes = {
        "bin/su": 0o4755,
        "shared": 0o2775,
        "tmp": 0o1777,
        "data/b65": 0o600,
        "data/page1": 0o2711,
        "home/user/owned": 0o640,
    }
    for name, mode in modes.items():
        os.chmod(root / name, mode)
    os.setxattr(root / "etc/deep/er/file", "system.posix_acl_access", ACL)
    paths = sorted(
        (p for p in root.rglob("*")), key=lambda p: (-len(p.parts), str(p))
    )  # children before parents
    for i, p in enumerate([*paths, root]):
        ns = (EPOCH + i * 1001) * 10**9 + 123_456_789 + i
        os.utime(p, ns=(ns, ns), follow_symlinks=False)


def fsverity_digests(paths: list[Path]) -> dict[Path, str]:
    """Hex SHA-256 fs-verity digests by the ``fsverity`` tool (the oracle naming objects)."""
    out = subprocess.run(
        ["fsverity", "digest", *map(str, paths)], capture_output=True, text=True, check=True
    ).stdout
    digests = {}
    for line, path in zip(out.splitlines(), paths, strict=True):
        algo_hex, _, printed = line.partition(" ")
        assert printed == str(path)
        algo, _, hexdigest = algo_hex.partition(":")
        assert algo == "sha256"
        digests[path] = hexdigest
    return digests


def _copy_meta(src: Path, dst: Path) -> None:
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    for key in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, key, os.getxattr(src, key, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def dfs_order(root: Path) -> list[Path]:
    """Entries below ``root`` depth first, children sorted by name (dumpfile order)."""
    return sorted(root.rglob("*"), key=lambda p: [os.fsencode(c) for c in p.parts])


def make_image(source: Path, objects: Path, image: Path) -> dict[str, str]:
    """Objects and a mkfs.erofs placeholder image of ``source``; returns path -> object name."""
    placeholder = image.with_name(image.name + ".tree")
    placeholder.mkdir()
    entries = dfs_order(source)
    externals = [
        p for p in entries if stat.S_ISREG(os.lstat(p).st_mode) and os.lstat(p).st_size > INLINE_MAX
    ]
    digests = fsverity_digests(externals)
    linked: dict[tuple[int, int], Path] = {}
    object_of: dict[str, str] = {}
    for src in entries:
        rel = src.relative_to(source)
        dst = placeholder / rel
        st = os.lstat(src)
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            dst.mkdir()
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(st.st_mode):
            if key in linked:
                os.link(linked[key], dst)
                first = str(linked[key].relative_to(placeholder))
                if first in object_of:
                    object_of[str(rel)] = object_of[first]
                continue
            linked[key] = dst
            if src in digests:
                hexd = digests[src]
                name = f"{hexd[:2]}/{hexd[2:]}"
                (objects / hexd[:2]).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, objects / name)
                object_of[str(rel)] = name
                with open(dst, "wb") as f:
                    f.truncate(st.st_size)
                os.setxattr(dst, "trusted.overlay.redirect", f"/{name}".encode())
                os.setxattr(
                    dst, "trusted.overlay.metacopy", bytes([0, 36, 0, 1]) + bytes.fromhex(hexd)
                )
            else:
                shutil.copyfile(src, dst)
        else:
            os.mknod(dst, st.st_mode, st.st_rdev)
    for src in [*reversed(entries), source]:  # children before parents: mtimes stay
        _copy_meta(src, placeholder / src.relative_to(source))
    subprocess.run(
        ["mkfs.erofs", "--chunksize=4096", str(image), str(placeholder)],
        capture_output=True,
        check=True,
    )
    return object_of


@attrs.frozen
class Built:
    source: Path
    objects: Path
    image: Path
    object_of: dict[str, str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if _REASON is not None:
        pytest.skip(_REASON)
    base = tmp_path_factory.mktemp("built")
    source = base / "source"
    source.mkdir()
    make_source(source)
    # ':' ',' '\' in the objects path exercise the legacy option string's escaping
    objects = base / "obj:ects,di\\r"
    objects.mkdir()
    image = base / "image.erofs"
    object_of = make_image(source, objects, image)
    return Built(source, objects, image, object_of)


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    target = tmp_path / "mnt"
    target.mkdir()
    return target


# --- C mkcomposefs images from a dumpfile (composefs-dump(5)) ----------------------------------

C_BIN = Path("/var/cache/trio-composefs/composefs-1.0.8/bin")


def c_tool(name: str) -> str:
    found = shutil.which(name, path=f"{C_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"C composefs {name} not built (.ci/build-composefs on branch oracle)")
    return found


def _dump_escape(data: bytes, *, xattr: bool = False) -> str:
    out = []
    for b in data:
        if b == 0x5C:
            out.append("\\\\")
        elif b in (0x0A, 0x0D, 0x09):
            out.append({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}[b])
        elif 0x21 <= b <= 0x7E and not (xattr and b == 0x3D):
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    text = "".join(out)
    return "\\x2d" if text == "-" else text


def make_dumpfile(source: Path, object_of: dict[str, str]) -> str:
    """The dumpfile of ``source``: inline up to 64 bytes, external files by object name."""
    lines = []
    first: dict[tuple[int, int], str] = {}
    for p in [source, *dfs_order(source)]:
        st = os.lstat(p)
        rel = str(p.relative_to(source))
        path = "/" if p == source else "/" + rel
        mtime = f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9}"
        key = (st.st_dev, st.st_ino)
        head = f"{st.st_nlink} {st.st_uid} {st.st_gid} {st.st_rdev} {mtime}"
        if stat.S_ISREG(st.st_mode) and key in first:
            target = _dump_escape(first[key].encode())
            lines.append(
                f"{_dump_escape(path.encode())} {st.st_size} @{st.st_mode:o} {head} {target} - -"
            )
            continue
        first[key] = path
        payload = content = digest = "-"
        size = st.st_size
        if stat.S_ISDIR(st.st_mode):
            size = 0
        elif stat.S_ISLNK(st.st_mode):
            payload = _dump_escape(os.fsencode(os.readlink(p)))
        elif stat.S_ISREG(st.st_mode):
            if rel in object_of:
                payload = object_of[rel]
                digest = payload.replace("/", "")
            elif size:
                content = _dump_escape(p.read_bytes())
        xattrs = "".join(
            f" {_dump_escape(k.encode(), xattr=True)}="
            f"{_dump_escape(os.getxattr(p, k, follow_symlinks=False), xattr=True)}"
            for k in sorted(os.listxattr(p, follow_symlinks=False))
        )
        lines.append(
            f"{_dump_escape(path.encode())} {size} {st.st_mode:o} {head} "
            f"{payload} {content} {digest}{xattrs}"
        )
    return "\n".join(lines) + "\n"


def _mkcomposefs(dump_text: str, base: Path) -> Path:
    dump = base / "source.dump"
    dump.write_text(dump_text, encoding="ascii")
    image = base / "c.cfs"
    subprocess.run([c_tool("mkcomposefs"), "--from-file", str(dump), str(image)], check=True)
    return image


@pytest.fixture(scope="module")
def c_image(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    c_tool("mkcomposefs")
    return _mkcomposefs(
        make_dumpfile(built.source, built.object_of), tmp_path_factory.mktemp("c-image")
    )


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_c_mkcomposefs_image_without_acls(
    built: Built, mnt: Path, tmp_path: Path, force_loop: bool
) -> None:
    """No ACL in the tree: C leaves HAS_ACL unset and the EROFS is mounted noacl."""
    lines = make_dumpfile(built.source, built.object_of).splitlines()
    no_acl = [" ".join(w for w in line.split(" ") if not w.startswith("system.")) for line in lines]
    image = _mkcomposefs("\n".join(no_acl) + "\n", tmp_path)
    assert struct.unpack_from("<III", image.read_bytes()) == (0xD078629A, 1, 0)
    with mounted_sync(image, built.objects, mnt, force_loop=force_loop) as result:
        assert not result.acl
        assert_same_tree(built.source, mnt, drop_xattr="system.posix_acl_access")


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_c_mkcomposefs_image_shows_the_source_tree(
    built: Built, c_image: Path, mnt: Path, force_loop: bool
) -> None:
    with mounted_sync(c_image, built.objects, mnt, force_loop=force_loop) as result:
        assert result.method == ("loop" if force_loop else "file-backed")
        assert result.acl  # the tree has an ACL: C sets HAS_ACL
        assert struct.unpack_from("<III", c_image.read_bytes()) == (0xD078629A, 1, 1)
        # equal listings: the 256 whiteout stubs 00..ff in the image root are not shown
        assert_same_tree(built.source, mnt)


def test_c_mount_composefs_shows_the_same_tree(
    built: Built, c_image: Path, mnt: Path, tmp_path: Path
) -> None:
    mount_composefs = c_tool("mount.composefs")
    basedir = tmp_path / "objects-link"  # -o cannot carry the ',' in the real name
    basedir.symlink_to(built.objects)
    subprocess.run(
        [mount_composefs, "-o", f"basedir={basedir}", str(c_image), str(mnt)], check=True
    )
    try:
        assert_same_tree(built.source, mnt)
    finally:
        unmount(mnt)


# --- comparing trees ----------------------------------------------------------------------------


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def snapshot(root: Path) -> tuple[dict[str, dict[str, Any]], set[frozenset[str]]]:
    """Every entry's metadata, content digest and xattrs; and the hard-link groups."""
    entries: dict[str, dict[str, Any]] = {}
    by_inode: dict[int, list[str]] = {}
    for p in [root, *sorted(root.rglob("*"))]:
        rel = "/" + str(p.relative_to(root)) if p != root else "/"
        st = os.lstat(p)
        e: dict[str, Any] = {
            "mode": oct(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "xattrs": {
                k: os.getxattr(p, k, follow_symlinks=False)
                for k in sorted(os.listxattr(p, follow_symlinks=False))
            },
        }
        if not stat.S_ISDIR(st.st_mode):
            e["size"] = st.st_size
            e["nlink"] = st.st_nlink
            by_inode.setdefault(st.st_ino, []).append(rel)
        if stat.S_ISREG(st.st_mode):
            e["sha256"] = _sha(p)
        if stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        entries[rel] = e
    groups = {frozenset(v) for v in by_inode.values() if len(v) > 1}
    return entries, groups


def assert_same_tree(source: Path, mounted_root: Path, *, drop_xattr: str | None = None) -> None:
    want, want_groups = snapshot(source)
    for e in want.values():
        e["xattrs"].pop(drop_xattr, None)
    got, got_groups = snapshot(mounted_root)
    assert sorted(got) == sorted(want), "listings differ (stubs, objects or entries leaked)"
    for path in want:
        assert got[path] == want[path], f"entry {path} differs"
    assert got_groups == want_groups
    for path, e in got.items():
        hidden = [k for k in e["xattrs"] if k.startswith("trusted.overlay.")]
        assert hidden == [], f"{path} shows overlay xattrs {hidden}"


# --- mounting and comparing ---------------------------------------------------------------------


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_mount_shows_the_source_tree(built: Built, mnt: Path, force_loop: bool) -> None:
    with mounted_sync(built.image, built.objects, mnt, force_loop=force_loop) as result:
        assert result.method == ("loop" if force_loop else "file-backed")
        assert (result.loop_device is not None) == force_loop
        assert result.fallback_reason is None
        assert result.acl  # mkfs.erofs image: no composefs header, ACLs kept
        assert not result.writable
        assert not result.verity
        assert result.mountpoint == str(mnt)
        opts = _options(mnt)
        assert {"ro", "metacopy=on", "redirect_dir=on"} <= set(opts)
        assert_same_tree(built.source, mnt)
        if force_loop:
            assert (result.loop_device, str(built.image)) in _loop_backing()
    assert not os.path.ismount(mnt)


def test_file_backed_mount_uses_no_loop_device(built: Built, mnt: Path) -> None:
    with mounted_sync(built.image, built.objects, mnt):
        assert [b for _, b in _loop_backing() if b == str(built.image)] == []


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_mount_from_fds(built: Built, mnt: Path, force_loop: bool) -> None:
    image_fd = os.open(built.image, os.O_RDONLY | os.O_CLOEXEC)
    objects_fd = os.open(built.objects, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with mounted_sync(image_fd, objects_fd, mnt, force_loop=force_loop) as result:
            assert result.method == ("loop" if force_loop else "file-backed")
            assert (mnt / "data/big").read_bytes() == (built.source / "data/big").read_bytes()
    finally:
        os.close(image_fd)
        os.close(objects_fd)


def _composefs_headed(image: Path, dst: Path, flags: int) -> Path:
    data = bytearray(image.read_bytes())
    assert data[:32] == bytes(32)  # mkfs.erofs leaves the first 1024 bytes zero
    struct.pack_into("<IIII", data, 0, 0xD078629A, 1, flags, 1)
    dst.write_bytes(data)
    return dst


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
@pytest.mark.parametrize("has_acl", [False, True], ids=["noacl", "acl"])
def test_composefs_header_decides_noacl(
    built: Built, mnt: Path, tmp_path: Path, force_loop: bool, has_acl: bool
) -> None:
    image = _composefs_headed(built.image, tmp_path / "headed.img", int(has_acl))
    with mounted_sync(image, built.objects, mnt, force_loop=force_loop) as result:
        assert result.acl == has_acl
        assert (mnt / "data/page").read_bytes() == (built.source / "data/page").read_bytes()
        # noacl: the EROFS hides its ACLs, so the overlay shows none
        shown = os.listxattr(mnt / "etc/deep/er/file")
        assert ("system.posix_acl_access" in shown) == has_acl
        if has_acl:
            assert os.getxattr(mnt / "etc/deep/er/file", "system.posix_acl_access") == ACL


def test_fallback_when_new_api_is_missing(
    built: Built, mnt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_kernel, "_new_api_available", lambda: False)
    with mounted_sync(built.image, built.objects, mnt) as result:
        assert result.method == "loop"
        assert "ENOSYS" in (result.fallback_reason or "")
        assert "fell back because the kernel has no new mount API" in result.describe()
        assert (mnt / "bin/su").read_bytes() == (built.source / "bin/su").read_bytes()


@pytest.mark.parametrize("by_fd", [True, False], ids=["SET_FD", "proc-path"])
def test_overlay_layers_by_fd_or_by_proc_path(
    built: Built, mnt: Path, monkeypatch: pytest.MonkeyPatch, by_fd: bool
) -> None:
    """6.13+ takes the EROFS mount fd itself; older kernels get /proc/self/fd/N."""
    if not by_fd:

        def refuse(fd: int, key: str, value_fd: int) -> None:
            raise OSError(errno.EINVAL, "fsconfig(fd): Invalid argument")

        monkeypatch.setattr(_kernel, "sys_fsconfig_fd", refuse)
    objects_fd = os.open(built.objects, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with mounted_sync(built.image, objects_fd, mnt) as result:
            assert result.method == "file-backed"
            opts = _options(mnt)
            lower = [o for o in opts if o.startswith("lowerdir+=")]
            data = [o for o in opts if o.startswith("datadir+=")]
            if by_fd:
                assert lower == ["lowerdir+=/"]  # the detached EROFS mount's root
                # the objects' real path (findmnt splits it at its ',')
                assert data[0].startswith(f"datadir+={built.objects.parent}/obj")
            else:
                assert lower[0].startswith("lowerdir+=/proc/self/fd/")
                assert data[0].startswith("datadir+=/proc/self/fd/")
            assert (mnt / "data/big").read_bytes() == (built.source / "data/big").read_bytes()
    finally:
        os.close(objects_fd)


# --- missing objects, verity, writable ----------------------------------------------------------


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_missing_object(built: Built, mnt: Path, tmp_path: Path, force_loop: bool) -> None:
    objects = tmp_path / "objects"
    shutil.copytree(built.objects, objects)
    (objects / built.object_of["data/page"]).unlink()
    with mounted_sync(built.image, objects, mnt, force_loop=force_loop):
        st = os.stat(mnt / "data/page")  # metadata comes from the image: stat works
        assert st.st_size == 4096
        with pytest.raises(FileNotFoundError) as exc_info:  # open itself fails
            os.close(os.open(mnt / "data/page", os.O_RDONLY))
        # This kernel (6.18) answers ENOENT and logs "lazy lowerdata lookup failed".
        assert exc_info.value.errno == errno.ENOENT
        for rel in ("data/page1", "data/big", "data/tiny", "etc/a", "bin/big-link"):
            assert (mnt / rel).read_bytes() == (built.source / rel).read_bytes()


def _objects_have_verity(objects: Path) -> bool:
    first = next(p for p in objects.rglob("*") if p.is_file())
    return subprocess.run(["fsverity", "measure", str(first)], capture_output=True).returncode == 0


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_verity_require_without_fs_verity(built: Built, mnt: Path, force_loop: bool) -> None:
    if _objects_have_verity(built.objects):
        pytest.skip("the objects carry fs-verity here; this test documents the case without")
    with mounted_sync(built.image, built.objects, mnt, verity=True, force_loop=force_loop) as r:
        assert r.verity
        assert "verity=require" in _options(mnt)
        assert os.stat(mnt / "data/big").st_size == 3 * 2**20 + 17
        # An external file whose object has no fs-verity digest: overlayfs refuses it with
        # EIO ("lower file ... has no fs-verity digest"); inline files are in the image.
        with pytest.raises(OSError, match="Input/output error") as exc_info:
            (mnt / "data/big").read_bytes()
        assert exc_info.value.errno == errno.EIO
        assert (mnt / "data/tiny").read_bytes() == b"hello\n"


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_upper_and_work_dirs_make_it_writable(
    built: Built, mnt: Path, tmp_path: Path, force_loop: bool
) -> None:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    big_object = (built.objects / built.object_of["data/page"]).read_bytes()
    with mounted_sync(
        built.image, built.objects, mnt, upperdir=upper, workdir=work, force_loop=force_loop
    ) as result:
        assert result.writable
        assert "ro" not in _options(mnt)
        (mnt / "new").write_bytes(b"new file\n")
        with open(mnt / "data/page", "ab") as f:  # copy-up of a metacopy file
            f.write(b"appended")
        (mnt / "data/tiny").write_bytes(b"changed\n")
        (mnt / "etc/deep/er/file").unlink()
        assert (mnt / "data/page").read_bytes() == big_object + b"appended"
    assert (upper / "new").read_bytes() == b"new file\n"
    assert (upper / "data/page").read_bytes() == big_object + b"appended"
    assert (upper / "data/tiny").read_bytes() == b"changed\n"
    assert stat.S_ISCHR(os.lstat(upper / "etc/deep/er/file").st_mode)  # a whiteout
    assert (built.objects / built.object_of["data/page"]).read_bytes() == big_object


def test_read_only_mount_refuses_writes(built: Built, mnt: Path) -> None:
    with mounted_sync(built.image, built.objects, mnt):
        with pytest.raises(OSError, match="Read-only file system") as exc_info:
            (mnt / "new").write_bytes(b"x")
        assert exc_info.value.errno == errno.EROFS


# --- errors: each a MountError, nothing left behind ---------------------------------------------


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_missing_image(built: Built, mnt: Path, tmp_path: Path, force_loop: bool) -> None:
    with pytest.raises(MountError, match="not found") as exc_info:
        mount_image_file(tmp_path / "nope.img", built.objects, mnt, force_loop=force_loop)
    assert exc_info.value.errno == errno.ENOENT
    assert "nope.img" in str(exc_info.value)
    assert not os.path.ismount(mnt)


def test_not_an_erofs_image(built: Built, mnt: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(random.Random(1).randbytes(8192))
    with pytest.raises(MountError, match="not an EROFS image"):
        mount_image_file(junk, built.objects, mnt)
    assert not os.path.ismount(mnt)


def test_missing_objects_dir(built: Built, mnt: Path, tmp_path: Path) -> None:
    with pytest.raises(MountError, match=r"objects directory .* not found"):
        mount_image_file(built.image, tmp_path / "no-objects", mnt)


def test_upperdir_needs_workdir(built: Built, mnt: Path, tmp_path: Path) -> None:
    with pytest.raises(MountError, match="both --upperdir and --workdir"):
        mount_image_file(built.image, built.objects, mnt, upperdir=tmp_path)


@pytest.mark.parametrize("kind", ["missing", "file", "non-empty"])
def test_bad_mountpoint(built: Built, tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    if kind == "file":
        target.write_bytes(b"")
    elif kind == "non-empty":
        target.mkdir()
        (target / "something").write_bytes(b"")
    expected = {"missing": errno.ENOENT, "file": errno.ENOTDIR, "non-empty": errno.ENOTEMPTY}
    with pytest.raises(MountError, match=f"mountpoint {target} ") as exc_info:
        mount_image_file(built.image, built.objects, target)
    assert exc_info.value.errno == expected[kind]
    assert not os.path.ismount(target)


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_busy_mountpoint(built: Built, mnt: Path, tmp_path: Path, force_loop: bool) -> None:
    """A second mount on the same target is refused; the first stays intact."""
    empty = tmp_path / "empty-tree"
    empty.mkdir()
    empty_image = tmp_path / "empty.img"
    subprocess.run(["mkfs.erofs", str(empty_image), str(empty)], capture_output=True, check=True)
    # an empty filesystem mounted there: the directory looks empty but is a mount point
    with mounted_sync(empty_image, built.objects, mnt, force_loop=force_loop):
        assert os.listdir(mnt) == []
        with pytest.raises(MountError, match="already has a filesystem mounted") as exc_info:
            mount_image_file(built.image, built.objects, mnt, force_loop=force_loop)
        assert exc_info.value.errno == errno.EBUSY
        assert _mount_targets().count(str(mnt)) == 1
    with mounted_sync(built.image, built.objects, mnt, force_loop=force_loop):
        with pytest.raises(MountError, match="already has a filesystem mounted"):
            mount_image_file(built.image, built.objects, mnt, force_loop=force_loop)
        assert _mount_targets().count(str(mnt)) == 1


def test_bind_mounted_mountpoint_is_busy(built: Built, mnt: Path) -> None:
    """A directory bind-mounted onto itself: same device and parent, only mountinfo knows."""
    subprocess.run(["mount", "--bind", str(mnt), str(mnt)], check=True)
    try:
        assert not os.path.ismount(mnt)
        with pytest.raises(MountError, match="already has a filesystem mounted"):
            mount_image_file(built.image, built.objects, mnt)
        assert _mount_targets().count(str(mnt)) == 1
    finally:
        unmount(mnt)


def test_mountpoint_through_a_symlink(built: Built, mnt: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(mnt)
    with mounted_sync(built.image, built.objects, link) as result:
        assert result.mountpoint == str(mnt)
        assert os.path.ismount(mnt)
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_overlay_refusal_after_erofs_leaves_nothing(
    built: Built, mnt: Path, tmp_path: Path, force_loop: bool
) -> None:
    """The kernel refuses the overlay (upper and work on different filesystems) after the
    EROFS is mounted: the EROFS, its temporary directory and the loop device all go."""
    upper = tmp_path / "upper"
    upper.mkdir()
    work = Path("/dev/shm") / f"trio-composefs-work-{os.getpid()}"
    work.mkdir()
    try:
        with pytest.raises(MountError, match="overlayfs over image") as exc_info:
            mount_image_file(
                built.image, built.objects, mnt, upperdir=upper, workdir=work, force_loop=force_loop
            )
        assert exc_info.value.errno in (errno.EINVAL, errno.EXDEV)
    finally:
        os.rmdir(work)
    assert not os.path.ismount(mnt)


_NOT_ROOT_SCRIPT = """
import json, sys
from trio_composefs.mount import mount_image_file, MountError
try:
    mount_image_file(sys.argv[1], sys.argv[2], sys.argv[3], force_loop=sys.argv[4] == "1")
except MountError as e:
    print(json.dumps({"errno": e.errno, "message": str(e)}))
else:
    print(json.dumps({"mounted": True}))
"""


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
def test_not_root(built: Built, mnt: Path, force_loop: bool) -> None:
    """Without CAP_SYS_ADMIN (dropped from the bounding set, so root's exec lacks it)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    proc = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-sys_admin",
            "--inh-caps=-sys_admin",
            sys.executable,
            "-c",
            _NOT_ROOT_SCRIPT,
            str(built.image),
            str(built.objects),
            str(mnt),
            "1" if force_loop else "0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    if answer.get("mounted"):
        unmount(mnt)
        pytest.fail("mounted without CAP_SYS_ADMIN")
    assert answer["errno"] == errno.EPERM
    assert "needs root" in answer["message"]
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("force_loop", [False, True], ids=["file-backed", "loop"])
@pytest.mark.parametrize("fstype", ["erofs", "overlay"])
def test_kernel_without_filesystem(
    built: Built, mnt: Path, monkeypatch: pytest.MonkeyPatch, force_loop: bool, fstype: str
) -> None:
    """The kernel's own ENODEV, for a type name it does not have, stands in for erofs/overlay."""
    real_fsopen, real_mount = _kernel.sys_fsopen, _kernel.sys_mount

    def fsopen(name: str, flags: int = _kernel.FSOPEN_CLOEXEC) -> int:
        return real_fsopen("trio_composefs_nofs" if name == fstype else name, flags)

    def mount(source: str, target: str, fs: str, flags: int, data: str | None) -> None:
        real_mount(source, target, "trio_composefs_nofs" if fs == fstype else fs, flags, data)

    monkeypatch.setattr(_kernel, "sys_fsopen", fsopen)
    monkeypatch.setattr(_kernel, "sys_mount", mount)
    with pytest.raises(MountError, match=f"no {fstype} filesystem") as exc_info:
        mount_image_file(built.image, built.objects, mnt, force_loop=force_loop)
    assert exc_info.value.errno == errno.ENODEV
    assert f"modprobe {fstype}" in str(exc_info.value)
    assert not os.path.ismount(mnt)


def test_unmount_errors(built: Built, mnt: Path) -> None:
    with pytest.raises(MountError, match="nothing is mounted") as exc_info:
        unmount(mnt)
    assert exc_info.value.errno == errno.EINVAL
    mount_image_file(built.image, built.objects, mnt)
    try:
        with open(mnt / "data/big", "rb"):
            with pytest.raises(MountError, match="is busy") as busy:
                unmount(mnt)
            assert busy.value.errno == errno.EBUSY
    finally:
        unmount(mnt)
    assert not os.path.ismount(mnt)


# --- the async context manager ------------------------------------------------------------------


async def test_mounted_async(built: Built, mnt: Path) -> None:
    async with mounted(built.image, built.objects, mnt) as result:
        assert result.method == "file-backed"
        data = await trio.Path(mnt / "data/big").read_bytes()
        assert data == (built.source / "data/big").read_bytes()
    assert not is_mount(mnt)


async def test_mounted_with_fds(built: Built, mnt: Path) -> None:
    """As a repository would call it: the image and objects opened by the caller."""
    image_fd = os.open(built.image, os.O_RDONLY | os.O_CLOEXEC)
    objects_fd = os.open(built.objects, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        async with mounted(image_fd, objects_fd, mnt) as result:
            assert result.describe().startswith(f"mounted {mnt}: file-backed EROFS")
            data = await trio.Path(mnt / "bin/big-link").read_bytes()
            assert data == (built.source / "data/big").read_bytes()
    finally:
        os.close(image_fd)
        os.close(objects_fd)
    assert not is_mount(mnt)


async def test_mounted_unmounts_on_error(built: Built, mnt: Path) -> None:
    async def body() -> None:
        async with mounted(built.image, built.objects, mnt, force_loop=True):
            assert is_mount(mnt)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await body()
    assert not is_mount(mnt)


async def test_mounted_unmounts_when_cancelled(built: Built, mnt: Path) -> None:
    with trio.CancelScope() as scope:
        async with mounted(built.image, built.objects, mnt):
            assert is_mount(mnt)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert not is_mount(mnt)


async def test_cancelled_while_mounting(
    built: Built, mnt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that arrives while the thread mounts: the mount finishes, then is undone."""
    started, go = threading.Event(), threading.Event()
    results: list[MountResult] = []

    def gated(*args: Any, **kwargs: Any) -> MountResult:
        started.set()
        go.wait(10)
        results.append(mount_image_file(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(mount_async, "mount_image_file", gated)
    entered = False
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def user() -> None:
                nonlocal entered
                async with mounted(built.image, built.objects, mnt):
                    entered = True
                    await trio.sleep_forever()

            nursery.start_soon(user)
            await trio.to_thread.run_sync(started.wait)
            scope.cancel()
            go.set()
    assert [r.method for r in results] == ["file-backed"]
    assert not is_mount(mnt)
    # the finished mount is handed to the block, whose first checkpoint is cancelled
    assert entered


_CTRL_C_SCRIPT = """
import os, signal, sys, time
import trio
from trio_composefs.mount import _async, mount_image_file, mounted

def gated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the thread mounts
    time.sleep(0.2)
    return mount_image_file(*args, **kwargs)

_async.mount_image_file = gated

async def main():
    async with mounted(sys.argv[1], sys.argv[2], sys.argv[3]):
        print("entered", flush=True)
        await trio.sleep(30)

try:
    trio.run(main)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
print("mounted" if os.path.ismount(sys.argv[3]) else "not mounted")
"""


def test_ctrl_c_while_mounting_leaves_nothing_mounted(built: Built, mnt: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_SCRIPT, str(built.image), str(built.objects), str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if os.path.ismount(mnt):
        unmount(mnt)
    assert proc.stdout.split("\n")[-3:] == ["KeyboardInterrupt", "not mounted", ""], proc.stderr
