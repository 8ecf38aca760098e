"""The on-disk structures of a composefs EROFS image (V0/V1), byte by byte.

Pure (layer L0). All integers are little-endian; a block is 4096 bytes. These are the
layouts C composefs 1.0.8 (``lcfs-erofs.h``, ``erofs_fs.h``) writes and composefs-rs
reproduces for V1.

Image regions (V1 and V0 share them; only the header's ``composefs_version`` differs):

====================  =====================================================
offset                content
====================  =====================================================
0                     composefs header (:data:`HEADER`, 32 bytes), zeros to 1024
1024                  EROFS superblock (:data:`SUPERBLOCK`, 128 bytes)
1152                  inodes in BFS order, each at a 32-byte slot: nid = offset / 32
inodes_end            (last inode end rounded up to 32) the shared xattr table
next 4096 boundary    data blocks in inode order: directory blocks, then the one
                      block of a promoted file tail, symlink or chunk index
====================  =====================================================
"""

from __future__ import annotations

import struct

__all__ = [
    "BLOCK_BITS",
    "BLOCK_SIZE",
    "COMPACT_INODE",
    "COMPOSEFS_MAGIC",
    "DIRENT",
    "EROFS_MAGIC",
    "EXTENDED_INODE",
    "FEATURE_COMPAT_MTIME",
    "FEATURE_COMPAT_XATTR_FILTER",
    "FT_BLKDEV",
    "FT_CHRDEV",
    "FT_DIR",
    "FT_FIFO",
    "FT_REG_FILE",
    "FT_SOCK",
    "FT_SYMLINK",
    "HEADER",
    "HEADER_FLAG_HAS_ACL",
    "INLINE_CONTENT_MAX",
    "LAYOUT_CHUNK_BASED",
    "LAYOUT_FLAT_INLINE",
    "LAYOUT_FLAT_PLAIN",
    "MAX_CHUNK_BITS",
    "MAX_NONINLINE_CHUNKS",
    "MAX_SHARED_XATTRS",
    "NULL_ADDR",
    "SLOT_SIZE",
    "SUPERBLOCK",
    "SUPERBLOCK_OFFSET",
    "XATTR_ENTRY",
    "XATTR_FILTER_SEED",
    "XATTR_IBODY_HEADER",
    "XATTR_INDEX_POSIX_ACL_ACCESS",
    "XATTR_INDEX_POSIX_ACL_DEFAULT",
    "XATTR_INDEX_SECURITY",
    "XATTR_INDEX_TRUSTED",
    "XATTR_INDEX_USER",
    "XATTR_PREFIXES",
    "chunk_bits",
    "xattr_prefix",
    "xxh32",
]

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
SLOT_SIZE = 32  # inodes start on 32-byte slots; nid = offset / 32 (meta_blkaddr is 0)

# --- composefs header, offset 0 -------------------------------------------------------
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1
HEADER_FLAG_HAS_ACL = 1  # some inode has system.posix_acl_access/default

#: magic u32, version u32 (= 1), flags u32, composefs_version u32 (0, 1), 16 zero bytes.
HEADER = struct.Struct("<IIII16x")

# --- EROFS superblock, offset 1024 ----------------------------------------------------
SUPERBLOCK_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4

#: 0 magic u32, 4 checksum u32 (0), 8 feature_compat u32, 12 blkszbits u8,
#: 13 sb_extslots u8, 14 root_nid u16, 16 inos u64, 24 build_time u64,
#: 32 build_time_nsec u32, 36 blocks u32, 40 meta_blkaddr u32, 44 xattr_blkaddr u32,
#: 48 uuid[16], 64 volume_name[16], 80 feature_incompat u32, 84..127 zero (compression,
#: devices, dirblkbits, xattr prefixes, packed_nid, xattr_filter_reserved, reserved).
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sI44x")

# --- inodes ---------------------------------------------------------------------------
#: i_format = layout << 1 | extended.
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4

#: Compact inode, 32 bytes: 0 i_format u16, 2 i_xattr_icount u16, 4 i_mode u16,
#: 6 i_nlink u16, 8 i_size u32, 12 reserved u32 (mtime offset in newer kernels: 0),
#: 16 i_u u32, 20 i_ino u32, 24 i_uid u16, 26 i_gid u16, 28 reserved u32.
COMPACT_INODE = struct.Struct("<HHHHI4xIIHH4x")

#: Extended inode, 64 bytes: 0 i_format u16, 2 i_xattr_icount u16, 4 i_mode u16,
#: 6 reserved u16, 8 i_size u64, 16 i_u u32, 20 i_ino u32, 24 i_uid u32, 28 i_gid u32,
#: 32 i_mtime u64, 40 i_mtime_nsec u32, 44 i_nlink u32, 48..63 reserved.
EXTENDED_INODE = struct.Struct("<HHH2xQIIIIQII16x")

# --- chunk-based (external) files -----------------------------------------------------
NULL_ADDR = 0xFFFFFFFF  # an unmapped chunk: every chunk of a composefs file
MAX_CHUNK_BITS = 12 + 31  # the chunk format's 5 bits: 2**43-byte chunks at most
MAX_NONINLINE_CHUNKS = 1024  # C's limit: the index fits one block (EFBIG beyond)


def chunk_bits(size: int) -> int:
    """log2 of the chunk size C uses for an external file of ``size`` (> 0) bytes.

    As few chunks as possible: ``bit_length(size - 1)``, at least 12, at most 43.
    """
    return min(max((size - 1).bit_length(), BLOCK_BITS), MAX_CHUNK_BITS)


# --- inline content -------------------------------------------------------------------
INLINE_CONTENT_MAX = 5000  # C's LCFS_INLINE_CONTENT_MAX; composefs-rs inlines <= 64

# --- directories ----------------------------------------------------------------------
#: nid u64, nameoff u16 (from the chunk start), file_type u8, reserved u8.
DIRENT = struct.Struct("<QHBx")
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

# --- xattrs ---------------------------------------------------------------------------
#: h_name_filter u32 (complement of the xxh32 bits), h_shared_count u8, 7 reserved.
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
#: e_name_len u8, e_name_index u8, e_value_size u16; then suffix and value, padded to 4.
XATTR_ENTRY = struct.Struct("<BBH")
MAX_SHARED_XATTRS = 128  # EROFS_XATTR_LONG_PREFIX: refs beyond this are stored inline
XATTR_FILTER_SEED = 0x25BBE08F

XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6

#: C 1.0.8's prefix table, tried in this order; ``lustre.`` (5) is not used, and a name
#: no prefix matches is stored whole with index 0.
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", XATTR_INDEX_USER),
    (b"system.posix_acl_access", XATTR_INDEX_POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", XATTR_INDEX_POSIX_ACL_DEFAULT),
    (b"trusted.", XATTR_INDEX_TRUSTED),
    (b"security.", XATTR_INDEX_SECURITY),
)


def xattr_prefix(name: bytes) -> tuple[int, bytes]:
    """``(e_name_index, suffix)`` for a full xattr name, as C 1.0.8 splits it."""
    for prefix, index in XATTR_PREFIXES:
        if name.startswith(prefix):
            return index, name[len(prefix) :]
    return 0, name


# --- xxh32 (for the xattr name filter) ------------------------------------------------
_P1 = 2654435761
_P2 = 2246822519
_P3 = 3266489917
_P4 = 668265263
_P5 = 374761393
_M = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M, 13) * _P1) & _M


def xxh32(data: bytes, seed: int = 0) -> int:
    """The 32-bit xxHash of ``data`` (XXH32, as in the kernel's ``xxhash.c``)."""
    n = len(data)
    p = 0
    if n >= 16:
        v1 = (seed + _P1 + _P2) & _M
        v2 = (seed + _P2) & _M
        v3 = seed & _M
        v4 = (seed - _P1) & _M
        limit = n - 16
        while p <= limit:
            a, b, c, d = struct.unpack_from("<IIII", data, p)
            v1 = _round(v1, a)
            v2 = _round(v2, b)
            v3 = _round(v3, c)
            v4 = _round(v4, d)
            p += 16
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while p + 4 <= n:
        (lane,) = struct.unpack_from("<I", data, p)
        h = (_rotl((h + lane * _P3) & _M, 17) * _P4) & _M
        p += 4
    while p < n:
        h = (_rotl((h + data[p] * _P5) & _M, 11) * _P1) & _M
        p += 1
    h ^= h >> 15
    h = (h * _P2) & _M
    h ^= h >> 13
    h = (h * _P3) & _M
    h ^= h >> 16
    return h
