"""Read a composefs EROFS image back into a tree (pure, sans-IO, hostile-input safe).

:func:`read_erofs` undoes what a composefs writer did to the tree, as C
``composefs-info dump`` does; :func:`image_objects` lists the repository objects an
image references (for gc and fsck). Both take the whole image in memory.

The image (all integers little-endian; block = 4096):

* 0: the composefs header, 32 bytes: ``magic`` 0xd078629a, ``version`` 1,
  ``flags`` (bit 0: has ACLs), ``composefs_version`` (0 or 1 for C mkcomposefs,
  1 for composefs-rs V1, 2 for composefs-rs's legacy V2), 16 unused bytes.
* 1024: the EROFS superblock (magic 0xE0F5E1E2, ``blkszbits`` 12, ``root_nid``,
  ``build_time``/``build_time_nsec`` (the mtime of compact inodes), ``blocks`` (an
  image shorter than ``blocks * 4096`` bytes is truncated),
  ``meta_blkaddr``, ``xattr_blkaddr``). Compression, extra devices, custom xattr
  prefixes and every incompatible feature but CHUNKED_FILE are refused.
* Inodes at ``meta_blkaddr * 4096 + nid * 32``: compact (32 bytes) or extended (64),
  then the xattr area (``12 + 4 * (i_xattr_icount - 1)`` bytes: a header with the
  shared count, shared refs, inline entries), then the inline tail of the data.
  Data layouts: FLAT_PLAIN (blocks at ``i_u``), FLAT_INLINE (full blocks at
  ``i_u``, the last ``size % 4096`` bytes inline), CHUNK_BASED (external files: no
  data in the image).
* Directories: chunks of 12-byte dirents (``nid`` u64, ``nameoff`` u16, type u8)
  followed by the names; the first ``nameoff`` gives the count; the last name
  ends at the chunk end or at a NUL. Names are sorted byte-wise (the kernel
  looks them up by binary search) and include ``.`` and ``..``.

What the composefs writers did, undone here:

* ``trusted.overlay.overlay.X`` becomes ``trusted.overlay.X`` again; every other
  ``trusted.overlay.*`` xattr is the writer's own (the root's ``opaque=y``, the
  metacopy and redirect) and is dropped.
* A regular file with a CHUNK_BASED layout is an :class:`ExternalFile`: its size,
  the digest of its ``trusted.overlay.metacopy`` (``struct ovl_metacopy``: version
  0, length 4 + digest size, flags 0, algorithm 1 = SHA-256 or 2 = SHA-512, digest;
  an empty value means no digest) and the payload of its
  ``trusted.overlay.redirect`` without the leading ``/`` (it must be UTF-8).
* V0/V1 only: the 256 character devices 0/0 named ``00``..``ff`` in the root are
  skipped, and a regular file carrying ``trusted.overlay.overlay.whiteout`` becomes
  the character device 0/0 (a whiteout) it was, without its two whiteout xattrs;
  its directory loses ``trusted.overlay.overlay.whiteouts``,
  ``user.overlay.whiteouts`` and the ``opaque=x`` pair the writer added. (C's reader
  also skips every other character device 0/0 and keeps the ``opaque=x`` pair;
  composefs-rs drops the pair. V2 images hold whiteouts as character devices.)
* Hard links: every name whose dirent points to the same nid gets the same
  :class:`~.._tree.Leaf`.
* Other files: inline regular files (FLAT layouts, at most 5000 bytes, C's limit)
  are :class:`InlineFile`; symlink targets have 1 to 4095 bytes; devices take
  ``i_u`` as their number. (C 1.0.8's reader also loses a last inline xattr entry of
  exactly 4 bytes, such as an empty ``system.posix_acl_access``; we keep it.)

Safety: every offset and length is checked against the image before it is read;
the traversal is iterative; each directory is expanded once (a directory reached
twice, through a cycle or a hard link, is an error); directories nest at most
2048 deep (as in composefs-rs: no 4096-byte path goes deeper); the work is linear in the
image size (at most ``len(image) // 12`` dirents and ``len(image)`` bytes of inline
data and symlink targets in all). Every problem raises :class:`ErofsError` naming
the nid and byte offset.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

import attrs

from ..._errors import ErofsError
from ...formats._fsverity import Algorithm, Digest
from .._tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    Fifo,
    FileSystem,
    InlineFile,
    Leaf,
    LeafContent,
    Socket,
    Stat,
    Symlink,
)

__all__ = ["ErofsHeader", "image_objects", "read_erofs", "read_erofs_header"]

BLOCK_SIZE = 4096
BLOCK_BITS = 12
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_FORMAT_VERSION = 1
EROFS_SUPER_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_COMPAT_KNOWN = 0x1 | 0x2 | 0x4  # SB_CHKSUM, MTIME, XATTR_FILTER

LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4

INLINE_CONTENT_MAX = 5000  # C's LCFS_INLINE_CONTENT_MAX; composefs-rs inlines less
SYMLINK_MAX = 4095  # PATH_MAX - 1
NAME_MAX = 255

_HEADER = struct.Struct("<IIII16x")
# magic, checksum, feature_compat, blkszbits, extslots, root_nid, inos, build_time,
# build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid+volume_name (32),
# feature_incompat, available_compr_algs, extra_devices, devt_slotoff, dirblkbits,
# xattr_prefix_count, xattr_prefix_start, packed_nid.
_SUPER = struct.Struct("<IIIBBHQQIIII32xIHHHBBIQ")
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
_XATTR_HEADER = struct.Struct("<IB7x")
_XATTR_ENTRY = struct.Struct("<BBH")
_DIRENT = struct.Struct("<QHBx")
_U32 = struct.Struct("<I")

_PREFIXES: dict[int, bytes] = {
    0: b"",
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}

_DIRENT_TYPES = {
    1: S_IFREG,
    2: S_IFDIR,
    3: S_IFCHR,
    4: S_IFBLK,
    5: S_IFIFO,
    6: S_IFSOCK,
    7: S_IFLNK,
}

_OVERLAY = b"trusted.overlay."
_ESCAPED = b"trusted.overlay.overlay."
_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"
_ESC_WHITEOUT = b"trusted.overlay.overlay.whiteout"
_USER_WHITEOUT = b"user.overlay.whiteout"
_WHITEOUT_DIR_XATTRS = {
    b"trusted.overlay.overlay.whiteouts": None,
    b"user.overlay.whiteouts": None,
    b"trusted.overlay.overlay.opaque": b"x",
    b"user.overlay.opaque": b"x",
}
_STUB_NAME = re.compile(rb"[0-9a-f]{2}")
_ALGORITHMS = {alg.kernel_id: alg for alg in Algorithm}


@attrs.frozen
class ErofsHeader:
    """The composefs header and the superblock fields a reader needs.

    Attributes:
        flags: the composefs header flags (bit 0: some inode has a POSIX ACL).
        composefs_version: 0 or 1 (C mkcomposefs, composefs-rs V1) or 2 (composefs-rs V2).
        root_nid: the root directory's inode number.
        build_time, build_time_nsec: the mtime of every compact inode.
        meta_start, xattr_start: byte offsets of the inode table and the shared xattrs.
    """

    flags: int
    composefs_version: int
    root_nid: int
    build_time: int
    build_time_nsec: int
    meta_start: int
    xattr_start: int


def read_erofs_header(image: bytes | bytearray | memoryview) -> ErofsHeader:
    """Check the composefs header and the EROFS superblock; return their useful fields.

    Raises:
        ErofsError: not a composefs EROFS image, or one using features composefs
            never uses (compression, extra devices, another block size, ...).
    """
    data = bytes(image) if not isinstance(image, bytes) else image
    return _parse_header(data)


def _parse_header(data: bytes) -> ErofsHeader:
    if len(data) < EROFS_SUPER_OFFSET + _SUPER.size:
        raise ErofsError(
            f"image of {len(data)} bytes is too short for the composefs header and the"
            f" EROFS superblock ({EROFS_SUPER_OFFSET + _SUPER.size} bytes)",
            offset=0,
        )
    magic, version, flags, composefs_version = _HEADER.unpack_from(data, 0)
    if magic != COMPOSEFS_MAGIC:
        raise ErofsError(f"bad composefs magic {magic:#010x} (want 0xd078629a)", offset=0)
    if version != COMPOSEFS_FORMAT_VERSION:
        raise ErofsError(f"unsupported composefs header version {version} (want 1)", offset=4)
    if composefs_version > 2:
        raise ErofsError(f"unknown composefs_version {composefs_version}", offset=12)
    (
        sb_magic,
        _checksum,
        feature_compat,
        blkszbits,
        extslots,
        root_nid,
        _inos,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr,
        xattr_blkaddr,
        feature_incompat,
        compr_algs,
        extra_devices,
        _devt_slotoff,
        _dirblkbits,
        xattr_prefix_count,
        _xattr_prefix_start,
        packed_nid,
    ) = _SUPER.unpack_from(data, EROFS_SUPER_OFFSET)
    sb = EROFS_SUPER_OFFSET
    if sb_magic != EROFS_MAGIC:
        raise ErofsError(f"bad EROFS magic {sb_magic:#010x} (want 0xe0f5e1e2)", offset=sb)
    if blkszbits != BLOCK_BITS:
        raise ErofsError(f"block size 2**{blkszbits}, composefs uses 4096", offset=sb + 12)
    if feature_compat & ~FEATURE_COMPAT_KNOWN:
        raise ErofsError(
            f"unknown compatible features {feature_compat & ~FEATURE_COMPAT_KNOWN:#x}",
            offset=sb + 8,
        )
    if feature_incompat & ~FEATURE_INCOMPAT_CHUNKED_FILE:
        raise ErofsError(
            f"unsupported incompatible features {feature_incompat:#x}"
            " (composefs images are uncompressed, single-device)",
            offset=sb + 80,
        )
    if extslots or compr_algs or extra_devices or xattr_prefix_count or packed_nid:
        raise ErofsError(
            "superblock uses features composefs never uses (extension slots, compression,"
            " extra devices, custom xattr prefixes or a packed inode)",
            offset=sb,
        )
    if blocks * BLOCK_SIZE > len(data):
        raise ErofsError(
            f"image truncated: the superblock counts {blocks} blocks"
            f" ({blocks * BLOCK_SIZE} bytes), the image has {len(data)} bytes",
            offset=len(data),
        )
    if build_time_nsec > 999_999_999:
        raise ErofsError(f"build_time_nsec {build_time_nsec} out of range", offset=sb + 32)
    return ErofsHeader(
        flags=flags,
        composefs_version=composefs_version,
        root_nid=root_nid,
        build_time=build_time,
        build_time_nsec=build_time_nsec,
        meta_start=meta_blkaddr * BLOCK_SIZE,
        xattr_start=xattr_blkaddr * BLOCK_SIZE,
    )


class _Inode:
    """One decoded inode: its header fields and where its parts lie in the image."""

    __slots__ = (
        "gid",
        "layout",
        "mode",
        "mtime",
        "mtime_nsec",
        "nid",
        "offset",
        "size",
        "u",
        "uid",
        "xattr_end",
        "xattr_start",
    )

    nid: int
    offset: int
    layout: int
    mode: int
    size: int
    u: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    xattr_start: int
    xattr_end: int


# Where a directory is: None for the root, else (where its parent is, its name). The
# path itself is only built for an error message, so deep trees cost no quadratic
# time or memory.
_Where = tuple["_Where", bytes] | None

#: The deepest directory nesting accepted: a path of at most 4096 bytes ("/d" per
#: level) cannot go deeper; composefs-rs has the same limit.
MAX_DEPTH = 2048


def _path(where: _Where) -> bytes:
    names: list[bytes] = []
    while where is not None:
        where, name = where
        names.append(name)
    return b"/" + b"/".join(reversed(names))


def _deeper(where: _Where, name: bytes, depth: int, ino: _Inode) -> _Where:
    if depth + 1 > MAX_DEPTH:
        raise ErofsError(
            f"directories nested deeper than {MAX_DEPTH} levels", nid=ino.nid, offset=ino.offset
        )
    return (where, name)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.header = _parse_header(data)
        self.legacy_rewrites = self.header.composefs_version < 2
        # Budgets that keep the work linear in the image size whatever it claims.
        self.dirent_budget = self.size // 12 + 2
        self.data_budget = self.size

    # -- bounds ------------------------------------------------------------------

    def need(self, start: int, length: int, what: str, nid: int | None) -> None:
        if start < 0 or length < 0 or start + length > self.size:
            raise ErofsError(
                f"{what} ({length} bytes at {start}) lies outside the {self.size}-byte image",
                nid=nid,
                offset=start,
            )

    # -- inodes ------------------------------------------------------------------

    def inode(self, nid: int) -> _Inode:
        offset = self.header.meta_start + nid * 32
        self.need(offset, _COMPACT.size, "inode", nid)
        i_format = self.data[offset] | self.data[offset + 1] << 8
        ino = _Inode()
        ino.nid = nid
        ino.offset = offset
        if i_format & ~0xF:
            raise ErofsError(f"unknown i_format bits {i_format:#x}", nid=nid, offset=offset)
        ino.layout = (i_format >> 1) & 0x7
        if i_format & 1:
            self.need(offset, _EXTENDED.size, "extended inode", nid)
            (
                _fmt,
                icount,
                ino.mode,
                _res,
                ino.size,
                ino.u,
                _ino,
                ino.uid,
                ino.gid,
                ino.mtime,
                ino.mtime_nsec,
                _nlink,
            ) = _EXTENDED.unpack_from(self.data, offset)
            isize = _EXTENDED.size
            if ino.mtime_nsec > 999_999_999:
                raise ErofsError(
                    f"i_mtime_nsec {ino.mtime_nsec} out of range", nid=nid, offset=offset + 40
                )
            if ino.mtime >= 1 << 63:
                ino.mtime -= 1 << 64  # C and the kernel read it as signed
        else:
            (
                _fmt,
                icount,
                ino.mode,
                _nlink,
                ino.size,
                _res,
                ino.u,
                _ino,
                ino.uid,
                ino.gid,
                _res2,
            ) = _COMPACT.unpack_from(self.data, offset)
            isize = _COMPACT.size
            ino.mtime = self.header.build_time
            if ino.mtime >= 1 << 63:
                ino.mtime -= 1 << 64
            ino.mtime_nsec = self.header.build_time_nsec
        if ino.layout not in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED):
            raise ErofsError(
                f"unsupported data layout {ino.layout} (compressed?)", nid=nid, offset=offset
            )
        ino.xattr_start = offset + isize
        xattr_size = 0 if icount == 0 else 12 + 4 * (icount - 1)
        ino.xattr_end = ino.xattr_start + xattr_size
        self.need(ino.xattr_start, xattr_size, "xattr area", nid)
        return ino

    def inline_tail(self, ino: _Inode) -> bytes:
        """The inline tail of a FLAT_INLINE inode (empty for other layouts)."""
        if ino.layout != LAYOUT_FLAT_INLINE:
            return b""
        tail = ino.size % BLOCK_SIZE
        start = ino.xattr_end
        self.need(start, tail, "inline data", ino.nid)
        if tail and start // BLOCK_SIZE != (start + tail - 1) // BLOCK_SIZE:
            raise ErofsError(
                f"inline data of {tail} bytes crosses a block boundary", nid=ino.nid, offset=start
            )
        return self.data[start : start + tail]

    def block_data(self, ino: _Inode) -> tuple[int, int]:
        """``(start, length)`` of the data held in blocks (not the inline tail)."""
        if ino.layout == LAYOUT_FLAT_PLAIN:
            length = ino.size
        elif ino.layout == LAYOUT_FLAT_INLINE:
            length = ino.size - ino.size % BLOCK_SIZE
        else:
            raise ErofsError("a chunk-based inode has no data here", nid=ino.nid, offset=ino.offset)
        start = ino.u * BLOCK_SIZE
        if length:
            self.need(start, length, "data blocks", ino.nid)
        return start, length

    def file_data(self, ino: _Inode, what: str) -> bytes:
        if ino.size > self.data_budget:
            raise ErofsError(
                f"{what} of {ino.size} bytes exceeds what the image can hold",
                nid=ino.nid,
                offset=ino.offset,
            )
        start, length = self.block_data(ino)
        tail = self.inline_tail(ino)
        self.data_budget -= ino.size
        return self.data[start : start + length] + tail

    # -- xattrs ------------------------------------------------------------------

    def entry(self, pos: int, end: int, nid: int) -> tuple[bytes, bytes, int]:
        """Decode one xattr entry at ``pos`` (which must end by ``end``)."""
        if pos + _XATTR_ENTRY.size > end:
            raise ErofsError("truncated xattr entry", nid=nid, offset=pos)
        name_len, index, value_size = _XATTR_ENTRY.unpack_from(self.data, pos)
        body = pos + _XATTR_ENTRY.size
        stop = body + name_len + value_size
        if stop > end:
            raise ErofsError(
                f"xattr entry of {name_len}+{value_size} bytes overruns its area",
                nid=nid,
                offset=pos,
            )
        prefix = _PREFIXES.get(index)
        if prefix is None:
            raise ErofsError(f"unknown xattr name index {index}", nid=nid, offset=pos)
        name = prefix + self.data[body : body + name_len]
        if not name or b"\0" in name or len(name) > NAME_MAX:
            raise ErofsError(f"invalid xattr name {name[:80]!r}", nid=nid, offset=pos)
        value = self.data[body + name_len : stop]
        return name, value, (stop + 3) & ~3

    def xattrs(self, ino: _Inode) -> list[tuple[bytes, bytes]]:
        if ino.xattr_end == ino.xattr_start:
            return []
        _filter, shared_count = _XATTR_HEADER.unpack_from(self.data, ino.xattr_start)
        pos = ino.xattr_start + _XATTR_HEADER.size
        end = ino.xattr_end
        if pos + 4 * shared_count > end:
            raise ErofsError(
                f"{shared_count} shared xattr refs do not fit the xattr area",
                nid=ino.nid,
                offset=ino.xattr_start,
            )
        result: list[tuple[bytes, bytes]] = []
        for _ in range(shared_count):
            (ref,) = _U32.unpack_from(self.data, pos)
            at = self.header.xattr_start + 4 * ref
            self.need(at, _XATTR_ENTRY.size, "shared xattr", ino.nid)
            name, value, _next = self.entry(at, self.size, ino.nid)
            result.append((name, value))
            pos += 4
        while pos < end:
            name, value, pos = self.entry(pos, end, ino.nid)
            result.append((name, value))
        if pos != end:
            raise ErofsError("xattr entries overrun their area", nid=ino.nid, offset=pos)
        return result

    def stat(self, ino: _Inode, raw: list[tuple[bytes, bytes]]) -> Stat:
        """The tree's metadata: permission bits, owner, mtime, unescaped xattrs."""
        xattrs: dict[bytes, bytes] = {}
        for name, value in raw:
            if name.startswith(_OVERLAY):
                if not name.startswith(_ESCAPED):
                    continue  # the writer's own: metacopy, redirect, the root's opaque
                name = _OVERLAY + name[len(_ESCAPED) :]
            if name in xattrs:
                raise ErofsError(
                    f"xattr {name!r} appears twice", nid=ino.nid, offset=ino.xattr_start
                )
            xattrs[name] = value
        return Stat(ino.mode & 0o7777, ino.uid, ino.gid, ino.mtime, ino.mtime_nsec, xattrs)

    # -- leaves ------------------------------------------------------------------

    def leaf(self, ino: _Inode) -> tuple[Leaf, bool]:
        """Decode a non-directory inode; the flag says it is a (restored) whiteout."""
        raw = self.xattrs(ino)
        ftype = ino.mode & S_IFMT
        content: LeafContent
        if ftype != S_IFREG and ino.layout == LAYOUT_CHUNK_BASED:
            raise ErofsError(
                "only regular files can be chunk-based", nid=ino.nid, offset=ino.offset
            )
        if ftype == S_IFREG:
            names = {name for name, _ in raw}
            if self.legacy_rewrites and _ESC_WHITEOUT in names:
                if ino.size != 0:
                    raise ErofsError(
                        "an escaped whiteout has a non-zero size", nid=ino.nid, offset=ino.offset
                    )
                raw = [(n, v) for n, v in raw if n not in (_ESC_WHITEOUT, _USER_WHITEOUT)]
                leaf = Leaf(self.stat(ino, raw), CharDevice(0))
                return leaf, True
            content = self.regular(ino, raw)
        elif ftype == S_IFLNK:
            if not 1 <= ino.size <= SYMLINK_MAX:
                raise ErofsError(
                    f"symlink target of {ino.size} bytes (1 to {SYMLINK_MAX} allowed)",
                    nid=ino.nid,
                    offset=ino.offset,
                )
            target = self.file_data(ino, "symlink target")
            if b"\0" in target:
                raise ErofsError("NUL byte in a symlink target", nid=ino.nid, offset=ino.offset)
            content = Symlink(target)
        elif ftype in (S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK):
            if ino.size != 0:
                raise ErofsError(
                    f"special file with size {ino.size}", nid=ino.nid, offset=ino.offset
                )
            if ftype == S_IFCHR:
                content = CharDevice(ino.u)
            elif ftype == S_IFBLK:
                content = BlockDevice(ino.u)
            elif ftype == S_IFIFO:
                content = Fifo()
            else:
                content = Socket()
        else:
            raise ErofsError(
                f"unknown file type in mode {ino.mode:o}", nid=ino.nid, offset=ino.offset
            )
        return Leaf(self.stat(ino, raw), content), False

    def regular(self, ino: _Inode, raw: list[tuple[bytes, bytes]]) -> InlineFile | ExternalFile:
        metacopy: bytes | None = None
        redirect: bytes | None = None
        for name, value in raw:
            if name == _METACOPY:
                metacopy = value
            elif name == _REDIRECT:
                redirect = value
        if ino.layout != LAYOUT_CHUNK_BASED:
            if metacopy is not None or redirect is not None:
                raise ErofsError(
                    "a file with inline data carries a metacopy or redirect xattr",
                    nid=ino.nid,
                    offset=ino.xattr_start,
                )
            if ino.size > INLINE_CONTENT_MAX:
                raise ErofsError(
                    f"inline file of {ino.size} bytes (composefs inlines at most"
                    f" {INLINE_CONTENT_MAX})",
                    nid=ino.nid,
                    offset=ino.offset,
                )
            return InlineFile(self.file_data(ino, "inline file"))
        if ino.size == 0:
            if metacopy is not None or redirect is not None:
                raise ErofsError(
                    "an empty file carries a metacopy or redirect xattr",
                    nid=ino.nid,
                    offset=ino.xattr_start,
                )
            return InlineFile(b"")
        digest = None if metacopy is None else self.metacopy(metacopy, ino)
        payload: str | None = None
        if redirect is not None:
            if len(redirect) > 1 and redirect[:1] == b"/":
                redirect = redirect[1:]
            if b"\0" in redirect:
                raise ErofsError(
                    "NUL byte in the redirect xattr", nid=ino.nid, offset=ino.xattr_start
                )
            try:
                payload = redirect.decode("utf-8")
            except UnicodeDecodeError:
                raise ErofsError(
                    f"the redirect xattr {redirect[:80]!r} is not UTF-8",
                    nid=ino.nid,
                    offset=ino.xattr_start,
                ) from None
        return ExternalFile(ino.size, digest, payload)

    @staticmethod
    def metacopy(value: bytes, ino: _Inode) -> Digest | None:
        """Decode ``struct ovl_metacopy``; an empty value carries no digest."""
        if not value:
            return None
        if len(value) >= 4 and value[0] == 0 and value[1] == len(value) and value[2] == 0:
            algorithm = _ALGORITHMS.get(value[3])
            if algorithm is not None and len(value) == 4 + algorithm.digest_size:
                return Digest(algorithm, value[4:])
        raise ErofsError(
            f"malformed trusted.overlay.metacopy value {value[:8].hex()}... ({len(value)} bytes)",
            nid=ino.nid,
            offset=ino.xattr_start,
        )

    # -- directories ---------------------------------------------------------------

    def dir_chunks(self, ino: _Inode) -> list[tuple[int, int]]:
        """``(start, length)`` of each dirent chunk: the blocks, then the inline tail."""
        if ino.layout == LAYOUT_CHUNK_BASED:
            raise ErofsError("a directory cannot be chunk-based", nid=ino.nid, offset=ino.offset)
        start, length = self.block_data(ino)
        chunks = [
            (start + off, min(BLOCK_SIZE, length - off)) for off in range(0, length, BLOCK_SIZE)
        ]
        if ino.layout == LAYOUT_FLAT_INLINE and ino.size % BLOCK_SIZE:
            self.inline_tail(ino)  # bounds and block-crossing checks
            chunks.append((ino.xattr_end, ino.size % BLOCK_SIZE))
        return chunks

    def dirents(self, ino: _Inode) -> list[tuple[bytes, int, int]]:
        """All ``(name, nid, file type)`` of a directory, ``.`` and ``..`` included."""
        out: list[tuple[bytes, int, int]] = []
        data = self.data
        for start, length in self.dir_chunks(ino):
            if length < _DIRENT.size:
                raise ErofsError(f"directory chunk of {length} bytes", nid=ino.nid, offset=start)
            first_nameoff = data[start + 8] | data[start + 9] << 8
            count, rem = divmod(first_nameoff, _DIRENT.size)
            if rem or count == 0 or first_nameoff > length:
                raise ErofsError(
                    f"bad first nameoff {first_nameoff} in a {length}-byte directory chunk",
                    nid=ino.nid,
                    offset=start,
                )
            self.dirent_budget -= count
            if self.dirent_budget < 0:
                raise ErofsError(
                    "more directory entries than the image can hold (overlapping directories?)",
                    nid=ino.nid,
                    offset=start,
                )
            ents = [_DIRENT.unpack_from(data, start + 12 * i) for i in range(count)]
            for i, (nid, nameoff, ftype) in enumerate(ents):
                if i + 1 < count:
                    name_end = ents[i + 1][1]
                else:
                    nul = data.find(b"\0", start + nameoff, start + length)
                    name_end = (nul - start) if nul >= 0 else length
                if not first_nameoff <= nameoff < name_end <= length:
                    raise ErofsError(
                        f"bad name offsets {nameoff}..{name_end} in directory entry {i}",
                        nid=ino.nid,
                        offset=start + 12 * i,
                    )
                name = data[start + nameoff : start + name_end]
                if len(name) > NAME_MAX or b"/" in name or b"\0" in name:
                    raise ErofsError(
                        f"invalid name {name[:80]!r} in directory entry {i}",
                        nid=ino.nid,
                        offset=start + nameoff,
                    )
                if out and name <= out[-1][0]:
                    raise ErofsError(
                        f"directory entries not in strictly increasing order at {name[:80]!r}",
                        nid=ino.nid,
                        offset=start + 12 * i,
                    )
                out.append((name, nid, ftype))
        return out

    # -- the tree ------------------------------------------------------------------

    def root(self) -> _Inode:
        root_ino = self.inode(self.header.root_nid)
        if root_ino.mode & S_IFMT != S_IFDIR:
            raise ErofsError(
                "the root is not a directory", nid=root_ino.nid, offset=root_ino.offset
            )
        return root_ino

    def children(
        self, ino: _Inode, parent_nid: int, where: _Where, expanded: set[int]
    ) -> Iterator[tuple[bytes, _Inode]]:
        """Validated ``(name, child inode)`` of a directory, stubs skipped.

        Checks ``.`` and ``..``, that each dirent's type matches its inode, and that no
        directory is reached twice (``expanded`` collects the directories met).
        ``where`` locates the directory, for messages only.
        """
        nid = ino.nid
        seen_dot = seen_dotdot = False
        for name, child_nid, ftype in self.dirents(ino):
            if name == b".":
                if child_nid != nid:
                    raise ErofsError(
                        f"'.' of {_path(where)!r} points to nid {child_nid}",
                        nid=nid,
                        offset=ino.offset,
                    )
                seen_dot = True
                continue
            if name == b"..":
                if child_nid != parent_nid:
                    raise ErofsError(
                        f"'..' of {_path(where)!r} points to nid {child_nid}, not {parent_nid}",
                        nid=nid,
                        offset=ino.offset,
                    )
                seen_dotdot = True
                continue
            child_ino = self.inode(child_nid)
            child_type = child_ino.mode & S_IFMT
            if _DIRENT_TYPES.get(ftype) != child_type:
                raise ErofsError(
                    f"directory entry {_path((where, name))!r} has type {ftype},"
                    f" its inode has mode {child_ino.mode:o}",
                    nid=nid,
                    offset=ino.offset,
                )
            if child_type == S_IFDIR:
                if child_nid in expanded:
                    raise ErofsError(
                        f"directory {_path((where, name))!r} was reached twice (a cycle or a"
                        " hard-linked directory)",
                        nid=child_nid,
                        offset=child_ino.offset,
                    )
                expanded.add(child_nid)
            elif (
                self.legacy_rewrites
                and nid == self.header.root_nid
                and child_type == S_IFCHR
                and child_ino.u == 0
                and _STUB_NAME.fullmatch(name)
            ):
                continue  # one of the 256 stubs 00..ff
            yield name, child_ino
        if not (seen_dot and seen_dotdot):
            raise ErofsError(
                f"directory {_path(where)!r} lacks its '.' or '..' entry",
                nid=nid,
                offset=ino.offset,
            )

    def tree(self) -> FileSystem:
        root_ino = self.root()
        root = Directory(Stat(0))
        expanded: set[int] = {root_ino.nid}
        leaves: dict[int, Leaf] = {}
        # (directory, its decoded inode, its parent's nid, where it is, its depth)
        stack: list[tuple[Directory, _Inode, int, _Where, int]] = [
            (root, root_ino, root_ino.nid, None, 0)
        ]
        while stack:
            directory, ino, parent_nid, where, depth = stack.pop()
            raw = self.xattrs(ino)
            has_whiteout = False
            for name, child_ino in self.children(ino, parent_nid, where, expanded):
                if child_ino.mode & S_IFMT == S_IFDIR:
                    sub = Directory(Stat(0))
                    directory.entries[name] = sub
                    stack.append(
                        (sub, child_ino, ino.nid, _deeper(where, name, depth, child_ino), depth + 1)
                    )
                    continue
                leaf = leaves.get(child_ino.nid)
                if leaf is None:
                    leaf, whiteout = self.leaf(child_ino)
                    leaves[child_ino.nid] = leaf
                else:
                    whiteout = (
                        isinstance(leaf.content, CharDevice) and child_ino.mode & S_IFMT == S_IFREG
                    )
                has_whiteout = has_whiteout or whiteout
                directory.entries[name] = leaf
            if has_whiteout:
                raw = [
                    (n, v)
                    for n, v in raw
                    if n not in _WHITEOUT_DIR_XATTRS
                    or (_WHITEOUT_DIR_XATTRS[n] is not None and _WHITEOUT_DIR_XATTRS[n] != v)
                ]
            directory.stat = self.stat(ino, raw)
        return FileSystem(root)

    def objects(self) -> set[Digest]:
        """The metacopy digests of the external files; the tree is never built.

        Walks the same validated directories as :meth:`tree` but decodes only the
        xattrs of chunk-based regular files, so memory is O(directories + objects).
        """
        root_ino = self.root()
        expanded: set[int] = {root_ino.nid}
        out: set[Digest] = set()
        stack: list[tuple[_Inode, int, _Where, int]] = [(root_ino, root_ino.nid, None, 0)]
        while stack:
            ino, parent_nid, where, depth = stack.pop()
            for name, child_ino in self.children(ino, parent_nid, where, expanded):
                ftype = child_ino.mode & S_IFMT
                if ftype == S_IFDIR:
                    stack.append(
                        (child_ino, ino.nid, _deeper(where, name, depth, child_ino), depth + 1)
                    )
                elif ftype == S_IFREG and child_ino.layout == LAYOUT_CHUNK_BASED:
                    for name, value in self.xattrs(child_ino):
                        if name == _METACOPY:
                            digest = self.metacopy(value, child_ino)
                            if digest is not None:
                                out.add(digest)
        return out


def _as_bytes(image: bytes | bytearray | memoryview) -> bytes:
    return image if isinstance(image, bytes) else bytes(image)


def read_erofs(image: bytes | bytearray | memoryview) -> FileSystem:
    """Read a composefs EROFS image (V0, V1 or composefs-rs V2) back into a tree.

    The result is the tree a writer was given, up to what the image cannot hold
    (see the module docstring): external files come back as
    :class:`~.._tree.ExternalFile` with the metacopy digest and the redirect payload.

    Raises:
        ErofsError: the image is not a composefs EROFS, or is truncated, corrupt or
            hostile; the message names the nid and the byte offset.
    """
    return _Reader(_as_bytes(image)).tree()


def image_objects(image: bytes | bytearray | memoryview) -> set[Digest]:
    """The fs-verity digests of the objects an image references (its metacopy xattrs).

    For gc and fsck: the directories are walked and checked as :func:`read_erofs`
    does, but only the xattrs of external files are decoded and no tree is built
    (memory grows with the directories and the objects, not with the files).

    Raises:
        ErofsError: the image is not a composefs EROFS, or its directories or the
            metacopy xattrs are corrupt (other damage, such as a bad symlink target,
            only :func:`read_erofs` reports).
    """
    return _Reader(_as_bytes(image)).objects()
