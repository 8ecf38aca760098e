"""Mounting a composefs image with the kernel: EROFS below, overlayfs on top (blocking, L1).

A composefs mount is two filesystems stacked:

* the image, a metadata-only EROFS, mounted read-only. Its regular files carry
  ``trusted.overlay.metacopy`` (the fs-verity digest) and
  ``trusted.overlay.redirect`` (``/XX/REST``, the object's path);
* overlayfs with that EROFS as its only ordinary lower layer and the
  repository's ``objects/`` directory as a *data-only* lower layer
  (``lowerdir+=`` then ``datadir+=``, or ``lowerdir=EROFS::OBJECTS`` in the
  legacy option string), ``metacopy=on``, ``redirect_dir=on``. Reads of a
  metacopy file are redirected to the object; ``verity=require`` makes the
  kernel check the object's fs-verity digest against the metacopy xattr.

Two ways to get there, tried in this order:

``file-backed`` (the way composefs-rs mounts; Linux 6.12+ for file-backed
    EROFS, 6.8+ for ``lowerdir+``/``datadir+``): the new mount API —
    ``fsopen("erofs")`` with ``source`` = the image *file* (a regular file
    gives a file-backed mount, no loop device), ``ro``, ``fsmount`` — the
    EROFS mount stays detached, known only by its fd; then
    ``fsopen("overlay")`` with ``lowerdir+`` = the EROFS mount fd
    (``FSCONFIG_SET_FD``, 6.13+; else the string ``/proc/self/fd/<fd>``;
    ``findmnt`` then shows ``lowerdir+=/``, the detached mount's root),
    ``fsmount``, and ``move_mount`` onto the target. Closing the fds leaves only
    the overlay; unmounting it frees everything.
``loop`` (the fallback, and the way C ``mount.composefs`` mounts on older
    kernels): a read-only, autoclear loop device over the image
    (``LOOP_CONFIGURE``, or ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64``), EROFS
    mounted with ``mount(2)`` on a private temporary directory, overlayfs
    mounted with the legacy option string, then the EROFS mount detached
    (``MNT_DETACH``): the overlay keeps it alive, and the loop device
    detaches itself when the overlay is unmounted.

The EROFS mount gets ``noacl`` unless the composefs header (the first 32 bytes
of the image: magic ``0xd078629a``, version, flags) has HAS_ACL (flags bit 0),
as C composefs does. An EROFS image without the composefs header (one made by
``mkfs.erofs``) is mounted as it is, with ACLs.

The system call numbers are the generic ones (``include/uapi/asm-generic/
unistd.h``), which every architecture shares from 424 on except alpha, ia64
and mips: 429 ``move_mount``, 430 ``fsopen``, 431 ``fsconfig``, 432
``fsmount``. On another architecture the new API is treated as missing.

This module never imports trio; :mod:`trio_composefs.mount._async` runs it in a
thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from typing import Literal

import attrs

from .._errors import MountError

__all__ = [
    "MountMethod",
    "MountResult",
    "kernel_filesystems",
    "mount_image_file",
    "unmount",
]

MountMethod = Literal["file-backed", "loop"]

# --- constants (include/uapi/linux/mount.h, loop.h, fs.h) --------------------------------------

_GENERIC_SYSCALL_ARCHES = frozenset(
    {
        "x86_64",
        "i386",
        "i686",
        "aarch64",
        "arm64",
        "armv7l",
        "armv6l",
        "armv8l",
        "riscv64",
        "ppc64le",
        "ppc64",
        "s390x",
        "loongarch64",
    }
)
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

MS_RDONLY = 0x1
MNT_DETACH = 0x2

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 0x1
LO_FLAGS_AUTOCLEAR = 0x4

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32), lo_file_name[64],
# lo_crypt_name[64], lo_encrypt_key[32], lo_init[2] (u64): 232 bytes.
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s16x")
# struct loop_config: u32 fd, u32 block_size, struct loop_info64 info, u64 __reserved[8].
LOOP_CONFIG = struct.Struct(f"=II{LOOP_INFO64.size}s64x")

COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_FLAGS_HAS_ACL = 0x1
COMPOSEFS_HEADER = struct.Struct("<III")  # magic, version, flags
EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC = 0xE0F5E1E2

PathArg = str | os.PathLike[str]


@attrs.frozen
class MountResult:
    """How an image was mounted.

    Attributes:
        mountpoint: the directory the overlay was moved onto.
        method: ``"file-backed"`` (new mount API, EROFS over the image file, no
            loop device) or ``"loop"`` (loop device and legacy ``mount(2)``).
        verity: whether overlayfs was told ``verity=require``.
        writable: whether an upper and work directory were given.
        acl: whether the EROFS mount keeps POSIX ACLs (composefs header
            HAS_ACL, or no composefs header); ``noacl`` otherwise.
        loop_device: the loop device (``/dev/loopN``) of a ``"loop"`` mount; it
            detaches itself when the mount goes.
        fallback_reason: why the file-backed way was not used, for ``--debug``;
            ``None`` when it was, or when the loop was asked for.
    """

    mountpoint: str
    method: MountMethod
    verity: bool
    writable: bool
    acl: bool
    loop_device: str | None = None
    fallback_reason: str | None = None

    def describe(self) -> str:
        """One line for ``--debug``: the way used, and why the fallback if it was one."""
        if self.method == "file-backed":
            how = "file-backed EROFS (new mount API, no loop device)"
        else:
            how = f"loop device {self.loop_device} (legacy mount(2))"
        extras = [
            "verity=require" if self.verity else "no verity",
            "writable" if self.writable else "read-only",
            "acl" if self.acl else "noacl",
        ]
        line = f"mounted {self.mountpoint}: {how}, {', '.join(extras)}"
        if self.fallback_reason:
            line += f"; fell back because {self.fallback_reason}"
        return line


# --- thin syscall wrappers ----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _new_api_available() -> bool:
    return platform.machine() in _GENERIC_SYSCALL_ARCHES


def sys_fsopen(fsname: str, flags: int = FSOPEN_CLOEXEC) -> int:
    """fsopen(2): a filesystem context fd."""
    if not _new_api_available():
        raise OSError(errno.ENOSYS, f"fsopen: no generic syscall numbers on {platform.machine()}")
    return _check(
        _libc.syscall(
            ctypes.c_long(SYS_FSOPEN), ctypes.c_char_p(fsname.encode()), ctypes.c_uint(flags)
        ),
        f"fsopen({fsname})",
    )


def sys_fsconfig(fd: int, cmd: int, key: str | None = None, value: str | None = None) -> None:
    """fsconfig(2) with a flag, a string value or a command (``aux`` = 0)."""
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_FSCONFIG),
            ctypes.c_int(fd),
            ctypes.c_uint(cmd),
            ctypes.c_char_p(None if key is None else key.encode()),
            ctypes.c_char_p(None if value is None else os.fsencode(value)),
            ctypes.c_int(0),
        ),
        f"fsconfig({key or 'create'})",
    )


def sys_fsconfig_fd(fd: int, key: str, value_fd: int) -> None:
    """fsconfig(2) FSCONFIG_SET_FD: a parameter given as an open fd (``aux``)."""
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_FSCONFIG),
            ctypes.c_int(fd),
            ctypes.c_uint(FSCONFIG_SET_FD),
            ctypes.c_char_p(key.encode()),
            ctypes.c_char_p(None),
            ctypes.c_int(value_fd),
        ),
        f"fsconfig({key}, fd)",
    )


def _set_layer(ctx: int, key: str, fd: int | None, name: str) -> None:
    """Give overlayfs a layer: by fd where the kernel takes one (6.13+), else by name.

    A detached mount (the EROFS) has no path; its name is ``/proc/self/fd/N``,
    which the kernel resolves through the magic link.
    """
    if fd is not None:
        try:
            sys_fsconfig_fd(ctx, key, fd)
            return
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    sys_fsconfig(ctx, FSCONFIG_SET_STRING, key, name)


def sys_fsmount(fd: int, attr_flags: int) -> int:
    """fsmount(2): a detached mount fd for a created context."""
    return _check(
        _libc.syscall(
            ctypes.c_long(SYS_FSMOUNT),
            ctypes.c_int(fd),
            ctypes.c_uint(FSMOUNT_CLOEXEC),
            ctypes.c_uint(attr_flags),
        ),
        "fsmount",
    )


def sys_move_mount(mount_fd: int, target: str) -> None:
    """move_mount(2) of a detached mount fd onto ``target``."""
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_MOVE_MOUNT),
            ctypes.c_int(mount_fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(os.fsencode(target)),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        "move_mount",
    )


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    """mount(2)."""
    _check(
        _libc.mount(
            os.fsencode(source),
            os.fsencode(target),
            fstype.encode(),
            flags,
            None if data is None else os.fsencode(data),
        ),
        f"mount -t {fstype}",
    )


def sys_umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(os.fsencode(target), flags), "umount")


def _fs_log(fd: int) -> str:
    """The messages a filesystem context logged ("e overlay: ..."), joined; '' when none."""
    messages: list[str] = []
    for _ in range(16):
        try:
            data = os.read(fd, 4096)
        except OSError:  # ENODATA: the log is empty
            break
        if not data:
            break
        messages.append(data.decode(errors="replace").strip())
    return "; ".join(messages)


# --- checks before anything is mounted ----------------------------------------------------------


def kernel_filesystems() -> frozenset[str]:
    """The filesystem types listed in /proc/filesystems (modules not yet loaded are absent)."""
    try:
        with open("/proc/filesystems", encoding="ascii", errors="replace") as f:
            return frozenset(line.split()[-1] for line in f if line.strip())
    except OSError:
        return frozenset()


def _missing_fs_error(fstype: str, err: OSError) -> MountError:
    listed = "listed" if fstype in kernel_filesystems() else "not listed"
    return MountError(
        f"this kernel has no {fstype} filesystem ({listed} in /proc/filesystems): "
        f"load it with 'modprobe {fstype}' or use a kernel built with it",
        errno=err.errno,
    )


def _not_root_error(err: OSError) -> MountError:
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    return MountError(
        f"mounting needs root (CAP_SYS_ADMIN; the kernel answered {name}): run it as root",
        errno=err.errno,
    )


def _unescape_mountinfo(field: str) -> str:
    r"""Undo the kernel's octal escapes (``\040`` for space, ``\134`` for ``\``)."""
    out = bytearray()
    raw = field.encode()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def is_mount_point(path: str) -> bool:
    """Whether something is mounted on ``path`` (an absolute, resolved path).

    /proc/self/mountinfo (field 5, the mount point) catches bind mounts on the
    same filesystem, which :func:`os.path.ismount` misses.
    """
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return any(
                _unescape_mountinfo(line.split(" ")[4]) == path for line in f if line.strip()
            )
    except OSError:
        return False


def _check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(
            f"mountpoint {mountpoint} does not exist: create an empty directory there first",
            errno=errno.ENOENT,
        ) from None
    except OSError as e:
        raise MountError(f"mountpoint {mountpoint}: {e.strerror}", errno=e.errno) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(
            f"mountpoint {mountpoint} is not a directory: mount on an empty directory",
            errno=errno.ENOTDIR,
        )
    if is_mount_point(mountpoint):
        raise MountError(
            f"mountpoint {mountpoint} already has a filesystem mounted on it: "
            f"unmount it first (umount {mountpoint})",
            errno=errno.EBUSY,
        )
    with os.scandir(mountpoint) as it:
        if any(True for _ in it):
            raise MountError(
                f"mountpoint {mountpoint} is not empty: mount on an empty directory",
                errno=errno.ENOTEMPTY,
            )


def _image_acl(image_fd: int, name: str) -> bool:
    """Check the image is an EROFS; True unless its composefs header lacks HAS_ACL."""
    head = os.pread(image_fd, EROFS_SUPER_OFFSET + 4, 0)
    if len(head) < EROFS_SUPER_OFFSET + 4 or (
        int.from_bytes(head[EROFS_SUPER_OFFSET:], "little") != EROFS_SUPER_MAGIC
    ):
        raise MountError(
            f"image {name} is not an EROFS image (no magic 0xe0f5e1e2 at byte offset 1024): "
            "give a composefs image file",
            errno=errno.EINVAL,
        )
    magic, _version, flags = COMPOSEFS_HEADER.unpack_from(head)
    if magic != COMPOSEFS_MAGIC:
        return True
    return bool(flags & COMPOSEFS_FLAGS_HAS_ACL)


@contextlib.contextmanager
def _closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_dir_or_path(arg: int | PathArg, what: str) -> Iterator[tuple[int, str]]:
    """(fd, the name the kernel resolves) of an image or a directory given as fd or path."""
    if isinstance(arg, int):
        yield arg, f"/proc/self/fd/{arg}"
        return
    name = os.path.abspath(os.fspath(arg))
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(
            f"{what} {name} not found: check the name (or build/pull the image first)",
            errno=errno.ENOENT,
        ) from None
    except OSError as e:
        raise MountError(f"{what} {name}: {e.strerror}", errno=e.errno) from None
    with _closing_fd(fd):
        yield fd, name


# --- the two mount methods ----------------------------------------------------------------------


@attrs.frozen
class _Options:
    verity: bool
    upperdir: str | None
    workdir: str | None
    acl: bool

    @property
    def writable(self) -> bool:
        return self.upperdir is not None


class _Fallback(Exception):
    """The file-backed way is not available here; the reason says why."""


def _mount_file_backed(
    image: str, objects: str, objects_fd: int | None, mountpoint: str, opts: _Options
) -> None:
    try:
        erofs_ctx = sys_fsopen("erofs")
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise _Fallback("the kernel has no new mount API (fsopen: ENOSYS)") from None
        if e.errno in (errno.EPERM, errno.EACCES):
            raise _not_root_error(e) from None
        if e.errno == errno.ENODEV:
            raise _missing_fs_error("erofs", e) from None
        raise MountError(f"fsopen(erofs): {e.strerror}", errno=e.errno) from None
    with _closing_fd(erofs_ctx):
        try:
            sys_fsconfig(erofs_ctx, FSCONFIG_SET_STRING, "source", image)
            if not opts.acl:
                sys_fsconfig(erofs_ctx, FSCONFIG_SET_FLAG, "noacl")
            sys_fsconfig(erofs_ctx, FSCONFIG_SET_FLAG, "ro")
            sys_fsconfig(erofs_ctx, FSCONFIG_CMD_CREATE)
            erofs_mnt = sys_fsmount(erofs_ctx, MOUNT_ATTR_RDONLY)
        except OSError as e:
            log = _fs_log(erofs_ctx)
            if e.errno in (errno.ENOTBLK, errno.EOPNOTSUPP):
                raise _Fallback(
                    f"the kernel refused a file-backed EROFS ({errno.errorcode[e.errno]}"
                    f"{': ' + log if log else ''})"
                ) from None
            raise MountError(
                f"image {image} could not be mounted as EROFS: {e.strerror}"
                f"{' (' + log + ')' if log else ' (see dmesg)'}",
                errno=e.errno,
            ) from None
    with _closing_fd(erofs_mnt):
        try:
            ovl_ctx = sys_fsopen("overlay")
        except OSError as e:
            if e.errno == errno.ENODEV:
                raise _missing_fs_error("overlay", e) from None
            raise MountError(f"fsopen(overlay): {e.strerror}", errno=e.errno) from None
        with _closing_fd(ovl_ctx):
            step = "lowerdir+"
            try:
                sys_fsconfig(ovl_ctx, FSCONFIG_SET_STRING, "source", "composefs")
                sys_fsconfig(ovl_ctx, FSCONFIG_SET_STRING, "metacopy", "on")
                sys_fsconfig(ovl_ctx, FSCONFIG_SET_STRING, "redirect_dir", "on")
                _set_layer(ovl_ctx, "lowerdir+", erofs_mnt, f"/proc/self/fd/{erofs_mnt}")
                step = "datadir+"
                _set_layer(ovl_ctx, "datadir+", objects_fd, objects)
                step = "options"
                if opts.upperdir is not None and opts.workdir is not None:
                    sys_fsconfig(ovl_ctx, FSCONFIG_SET_STRING, "upperdir", opts.upperdir)
                    sys_fsconfig(ovl_ctx, FSCONFIG_SET_STRING, "workdir", opts.workdir)
                else:
                    sys_fsconfig(ovl_ctx, FSCONFIG_SET_FLAG, "ro")
                if opts.verity:
                    sys_fsconfig(ovl_ctx, FSCONFIG_SET_STRING, "verity", "require")
                step = "create"
                sys_fsconfig(ovl_ctx, FSCONFIG_CMD_CREATE)
                ovl_mnt = sys_fsmount(ovl_ctx, 0 if opts.writable else MOUNT_ATTR_RDONLY)
            except OSError as e:
                log = _fs_log(ovl_ctx)
                if e.errno == errno.EINVAL and step in ("lowerdir+", "datadir+"):
                    raise _Fallback(
                        f"overlayfs refused {step} (kernel before 6.8?{' ' + log if log else ''})"
                    ) from None
                raise MountError(
                    f"overlayfs over image {image} and objects {objects} failed: {e.strerror}"
                    f"{' (' + log + ')' if log else ' (see dmesg)'}",
                    errno=e.errno,
                ) from None
        with _closing_fd(ovl_mnt):
            try:
                sys_move_mount(ovl_mnt, mountpoint)
            except OSError as e:
                raise MountError(
                    f"could not attach the mount at {mountpoint}: {e.strerror}", errno=e.errno
                ) from None


def _escape_option(path: str) -> str:
    """Escape ``\\``, ``:`` and ``,`` for overlayfs's legacy option string."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(lower: str, objects: str, opts: _Options) -> str:
    """The legacy overlayfs option string, as C ``mount.composefs`` builds it."""
    parts = [
        "metacopy=on",
        "redirect_dir=on",
        f"lowerdir={_escape_option(lower)}::{_escape_option(objects)}",
    ]
    if opts.upperdir is not None and opts.workdir is not None:
        parts.append(f"upperdir={_escape_option(opts.upperdir)}")
        parts.append(f"workdir={_escape_option(opts.workdir)}")
    else:
        parts.insert(0, "ro")
    if opts.verity:
        parts.append("verity=require")
    return ",".join(parts)


def _loop_info(image_fd: int) -> bytes:
    name = os.readlink(f"/proc/self/fd/{image_fd}").encode()[:63]
    return LOOP_INFO64.pack(
        0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, name, b"", b""
    )


def _attach_loop(image_fd: int) -> tuple[int, str]:
    """A read-only, autoclear loop device over ``image_fd``: (open fd, /dev/loopN).

    The device detaches itself on its last close: keep the fd open until the
    EROFS mount holds the device, then close it.
    """
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise _not_root_error(e) from None
        raise MountError(
            f"no loop devices (/dev/loop-control: {e.strerror}): load the loop module "
            "(modprobe loop)",
            errno=e.errno,
        ) from None
    with _closing_fd(ctl):
        last: OSError | None = None
        for _ in range(32):  # another process may take the free device first
            try:
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            except OSError as e:
                if e.errno in (errno.EPERM, errno.EACCES):
                    raise _not_root_error(e) from None
                raise MountError(
                    f"no free loop device (LOOP_CTL_GET_FREE: {e.strerror}): free one "
                    "(losetup -D) or load more (modprobe loop max_loop=...)",
                    errno=e.errno,
                ) from None
            device = f"/dev/loop{number}"
            try:
                fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                last = e
                time.sleep(0.01)
                continue
            try:
                info = _loop_info(image_fd)
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, LOOP_CONFIG.pack(image_fd, 0, info))
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOTTY):
                        raise
                    fcntl.ioctl(fd, LOOP_SET_FD, image_fd)  # kernel before 5.8
                    try:
                        fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
                    except OSError:
                        with contextlib.suppress(OSError):
                            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
                        raise
            except OSError as e:
                os.close(fd)
                if e.errno == errno.EBUSY:
                    last = e
                    continue
                if e.errno in (errno.EPERM, errno.EACCES):
                    raise _not_root_error(e) from None
                raise MountError(
                    f"could not set up loop device {device}: {e.strerror}", errno=e.errno
                ) from None
            return fd, device
    raise MountError(
        f"no free loop device ({last.strerror if last else 'all busy'}): "
        "free one (losetup -D) or try again",
        errno=last.errno if last else errno.EBUSY,
    )


def _mount_loop(image_fd: int, image: str, objects: str, mountpoint: str, opts: _Options) -> str:
    """The legacy way; returns the loop device used."""
    loop_fd, device = _attach_loop(image_fd)
    with _closing_fd(loop_fd):  # closing it lets autoclear detach the device when unused
        tmp = tempfile.mkdtemp(prefix=".trio-composefs-erofs.")
        try:
            try:
                sys_mount(device, tmp, "erofs", MS_RDONLY, None if opts.acl else "noacl")
            except OSError as e:
                if e.errno == errno.EPERM:
                    raise _not_root_error(e) from None
                if e.errno == errno.ENODEV:
                    raise _missing_fs_error("erofs", e) from None
                raise MountError(
                    f"image {image} could not be mounted as EROFS from {device}: {e.strerror}",
                    errno=e.errno,
                ) from None
            try:
                sys_mount(
                    "composefs",
                    mountpoint,
                    "overlay",
                    0 if opts.writable else MS_RDONLY,
                    overlay_options(tmp, objects, opts),
                )
            except OSError as e:
                if e.errno == errno.ENODEV:
                    raise _missing_fs_error("overlay", e) from None
                raise MountError(
                    f"overlayfs over image {image} and objects {objects} failed: {e.strerror} "
                    "(see dmesg)",
                    errno=e.errno,
                ) from None
            finally:
                sys_umount2(tmp, MNT_DETACH)
        finally:
            os.rmdir(tmp)
    return device


# --- public -------------------------------------------------------------------------------------


def mount_image_file(
    image: int | PathArg,
    objects_dir: int | PathArg,
    mountpoint: PathArg,
    *,
    verity: bool = False,
    upperdir: PathArg | None = None,
    workdir: PathArg | None = None,
    force_loop: bool = False,
) -> MountResult:
    """Mount the composefs image ``image`` over ``objects_dir`` at ``mountpoint``.

    Blocking: a few system calls, milliseconds.

    Args:
        image: the EROFS image file, as a path or an open fd (the caller keeps
            the fd; the kernel resolves it through ``/proc/self/fd``).
        objects_dir: the repository's ``objects/`` directory, as a path or an
            open directory fd (kept by the caller).
        mountpoint: an existing empty directory with nothing mounted on it.
        verity: pass ``verity=require`` to overlayfs: every external file must
            have fs-verity with the digest the image records, or reading it
            fails with EIO (on a filesystem without fs-verity, every external
            file fails; inline files still read).
        upperdir, workdir: both or neither; with them the mount is writable,
            changes go to ``upperdir`` (as C ``mount.composefs --upperdir
            --workdir``). Both must be on the same filesystem.
        force_loop: use the loop-device fallback even where the file-backed
            way works.

    What users see through the mount (Linux 6.18): the image's tree, with
    ``trusted.overlay.metacopy``/``redirect`` consumed by overlayfs and the
    composefs whiteout stubs ``00``..``ff`` not listed. Metadata comes from the
    image, contents from the objects, looked up lazily on open: a missing
    object still stats, but opening it fails with ENOENT (the kernel logs
    "lazy lowerdata lookup failed"); with ``verity`` an object without the
    right fs-verity digest fails with EIO ("has no fs-verity digest").

    Returns:
        A :class:`MountResult` saying which way was used.

    Raises:
        MountError: not root, a missing or non-EROFS image, a kernel without
            EROFS or overlayfs, a mountpoint that is not an empty directory, or
            any refusal by the kernel. Nothing is left mounted or attached.
    """
    if (upperdir is None) != (workdir is None):
        raise MountError(
            "a writable mount needs both --upperdir and --workdir (on the same filesystem)"
        )
    target = os.path.realpath(os.fspath(mountpoint))
    _check_mountpoint(target)
    with (
        _open_dir_or_path(image, "image") as (image_fd, image_name),
        _open_dir_or_path(objects_dir, "objects directory") as (_objects_fd, objects_name),
    ):
        if not stat.S_ISREG(os.fstat(image_fd).st_mode):
            raise MountError(
                f"image {image_name} is not a regular file: give a composefs image file",
                errno=errno.EINVAL,
            )
        if not stat.S_ISDIR(os.fstat(_objects_fd).st_mode):
            raise MountError(
                f"objects directory {objects_name} is not a directory", errno=errno.ENOTDIR
            )
        opts = _Options(
            verity=verity,
            upperdir=None if upperdir is None else os.path.abspath(os.fspath(upperdir)),
            workdir=None if workdir is None else os.path.abspath(os.fspath(workdir)),
            acl=_image_acl(image_fd, image_name),
        )
        reason: str | None = None
        if not force_loop:
            try:
                _mount_file_backed(
                    image_name,
                    objects_name,
                    objects_dir if isinstance(objects_dir, int) else None,
                    target,
                    opts,
                )
            except _Fallback as fb:
                reason = str(fb)
            else:
                return MountResult(
                    mountpoint=target,
                    method="file-backed",
                    verity=verity,
                    writable=opts.writable,
                    acl=opts.acl,
                )
        device = _mount_loop(image_fd, image_name, objects_name, target, opts)
        return MountResult(
            mountpoint=target,
            method="loop",
            verity=verity,
            writable=opts.writable,
            acl=opts.acl,
            loop_device=device,
            fallback_reason=reason,
        )


def unmount(mountpoint: PathArg, *, lazy: bool = False) -> None:
    """Unmount ``mountpoint`` (umount2; ``lazy`` = ``MNT_DETACH``).

    A loop device under a ``"loop"`` mount detaches itself (autoclear).

    Raises:
        MountError: nothing is mounted there (EINVAL), it is busy (EBUSY: a
            process has a file open or its working directory there), or not root.
    """
    target = os.path.abspath(os.fspath(mountpoint))
    try:
        sys_umount2(target, MNT_DETACH if lazy else 0)
    except OSError as e:
        if e.errno == errno.EINVAL:
            msg = f"nothing is mounted at {target}"
        elif e.errno == errno.EBUSY:
            msg = (
                f"{target} is busy: close the files open there and leave the directory "
                "(see 'fuser -m'), then unmount again"
            )
        elif e.errno in (errno.EPERM, errno.EACCES):
            msg = f"unmounting {target} needs root: run it as root"
        elif e.errno == errno.ENOENT:
            msg = f"{target} does not exist"
        else:
            msg = f"could not unmount {target}: {e.strerror}"
        raise MountError(msg, errno=e.errno) from None
