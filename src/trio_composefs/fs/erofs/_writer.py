"""The composefs EROFS writer (V1, and V0 on request), byte-identical to C mkcomposefs 1.0.8.

Pure (layer L0). The image is computed in three passes over the tree, then emitted as
a stream of byte strings:

1. **Rewrites and order.** One depth-first pass counts the names of every leaf, finds
   the canonical name of each hard-linked leaf (its first name in depth-first,
   byte-sorted order: the non-``@`` line of our dumpfile, which C takes as canonical)
   and the directories holding user whiteouts. A breadth-first pass then numbers the
   inodes (``i_ino`` = BFS index; children in byte order with ``.`` and ``..``; a
   hard-linked leaf only at its canonical name; the 256 ``00``..``ff`` stubs are root
   children) and applies composefs's rewrites in C order: ``trusted.overlay.*`` is
   escaped to ``trusted.overlay.overlay.*``; external files get
   ``trusted.overlay.metacopy`` (and ``trusted.overlay.redirect`` = ``/`` + payload);
   a char device 0/0 becomes an empty regular file with whiteout xattrs and marks its
   parent; the root gets ``trusted.overlay.opaque=y``.
2. **Sharing.** A (name, value) pair used by more than one inode goes to the shared
   table, sorted descending by name, value length, value; an inode refers to at most
   128 of them (in name order), the rest stay inline.
3. **Layout.** Compact (32-byte) inodes for those with the image's minimum mtime,
   nlink, uid, gid <= 65535 and a size that fits in 32 bits; extended (64 bytes)
   otherwise. Inline tails never cross a block: padding goes before the inode
   (C's ``compute_erofs_inode_padding_for_tail``); symlinks whose inode, xattrs and
   target reach 4096 bytes get a data block, and a symlink that would straddle a
   block starts on the next one.

Then the header, superblock, inodes, the shared xattr table and the data blocks are
written in that order, a few tens of KiB at a time: nothing is held twice, and the
per-inode plan is all that lives between passes.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..._errors import ErofsWriteError, InternalError
from ...fsverity import Algorithm, Digest, FsVerityHasher
from .._tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    S_IFSOCK,
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    FileSystem,
    InlineFile,
    Inode,
    Leaf,
    Stat,
    Symlink,
)
from ._format import (
    BLOCK_SIZE,
    COMPACT_INODE,
    COMPOSEFS_HEADER_VERSION,
    COMPOSEFS_MAGIC,
    DIRENT,
    EROFS_MAGIC,
    EXTENDED_INODE,
    FEATURE_COMPAT_MTIME,
    FEATURE_COMPAT_XATTR_FILTER,
    FT_BLKDEV,
    FT_CHRDEV,
    FT_DIR,
    FT_FIFO,
    FT_REG_FILE,
    FT_SOCK,
    FT_SYMLINK,
    HEADER,
    HEADER_FLAG_HAS_ACL,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    MAX_NONINLINE_CHUNKS,
    MAX_SHARED_XATTRS,
    SLOT_SIZE,
    SUPERBLOCK,
    SUPERBLOCK_OFFSET,
    XATTR_ENTRY,
    XATTR_FILTER_SEED,
    XATTR_IBODY_HEADER,
    chunk_bits,
    xattr_prefix,
    xxh32,
)

__all__ = ["compute_image_id", "iter_erofs", "metacopy_xattr", "write_erofs"]

_OVERLAY = b"trusted.overlay."
_ESCAPED = b"trusted.overlay.overlay."
_METACOPY = b"trusted.overlay.metacopy"
_REDIRECT = b"trusted.overlay.redirect"
_OPAQUE = b"trusted.overlay.opaque"
_ACL_ACCESS = b"system.posix_acl_access"
_ACL_DEFAULT = b"system.posix_acl_default"
_SELINUX = b"security.selinux"

_WHITEOUT_XATTRS = ((b"trusted.overlay.overlay.whiteout", b""), (b"user.overlay.whiteout", b""))
_WHITEOUTS_DIR_XATTRS = (
    (b"trusted.overlay.overlay.whiteouts", b""),
    (b"user.overlay.whiteouts", b""),
)
_OPAQUE_DIR_XATTRS = ((b"trusted.overlay.overlay.opaque", b"x"), (b"user.overlay.opaque", b"x"))

_STUB_NAMES = [b"%02x" % i for i in range(256)]

_FILE_TYPES = {
    S_IFREG: FT_REG_FILE,
    S_IFDIR: FT_DIR,
    S_IFCHR: FT_CHRDEV,
    S_IFBLK: FT_BLKDEV,
    S_IFIFO: FT_FIFO,
    S_IFSOCK: FT_SOCK,
    S_IFLNK: FT_SYMLINK,
}

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_FLUSH = 1 << 16  # emit in pieces of about this size

# Tail kinds: what the inline tail (or the promoted block) holds.
_T_NONE = 0
_T_DIR = 1
_T_DATA = 2  # inline file bytes or symlink target
_T_CHUNKS = 3  # null chunk index


class _Node:
    """The plan for one inode: everything the emit pass needs, nothing more."""

    __slots__ = (
        "blocks",
        "chunk_format",
        "compact",
        "data",
        "entries",
        "gid",
        "inline",
        "ipad",
        "kind",
        "mode",
        "mtime",
        "mtime_nsec",
        "name",
        "nid",
        "nlink",
        "parent",
        "rdev",
        "shared",
        "size",
        "tail",
        "tail_kind",
        "uid",
        "xattr_size",
        "xattrs",
    )

    def __init__(self, parent: int, name: bytes) -> None:
        self.parent = parent  # BFS index of the parent (the root is its own parent)
        self.name = name  # for error messages
        self.kind = 0
        self.mode = 0
        self.nlink = 1
        self.uid = 0
        self.gid = 0
        self.mtime = 0
        self.mtime_nsec = 0
        self.rdev = 0
        self.size = 0  # st_size of files and symlinks
        self.xattrs: list[tuple[bytes, bytes]] = []  # all, sorted by name
        self.shared: list[int] = []  # refs: byte offsets in the shared table
        self.inline: list[tuple[bytes, bytes]] = []  # the pairs stored in the inode
        self.entries: list[tuple[bytes, Inode]] | None = None  # directories, sorted
        self.data = b""  # inline file content or symlink target
        self.blocks = 0
        self.tail = 0
        self.tail_kind = _T_NONE
        self.chunk_format = 0
        self.compact = False
        self.xattr_size = 0
        self.ipad = 0
        self.nid = 0


def _stub(root: Stat) -> Leaf:
    """A ``00``..``ff`` root stub: char device 0/0, 0644, the root's owner and mtime."""
    xattrs = {_SELINUX: root.xattrs[_SELINUX]} if _SELINUX in root.xattrs else {}
    return Leaf(Stat(0o644, root.uid, root.gid, root.mtime, root.mtime_nsec, xattrs), CharDevice(0))


def _escape_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """``trusted.overlay.X`` → ``trusted.overlay.overlay.X``; other names unchanged."""
    out: dict[bytes, bytes] = {}
    for key, value in xattrs.items():
        if key.startswith(_OVERLAY):
            key = _ESCAPED + key[len(_OVERLAY) :]
        out[key] = value
    return out


def metacopy_xattr(digest: Digest | None) -> bytes:
    """The ``trusted.overlay.metacopy`` value: overlayfs's ``struct ovl_metacopy``.

    Byte 0 version 0, byte 1 length (4 + digest size: 36 for SHA-256, 68 for SHA-512),
    byte 2 flags 0, byte 3 the fs-verity algorithm (1 SHA-256, 2 SHA-512), then the
    digest. A file with no digest gets an empty value.
    """
    if digest is None:
        return b""
    raw = digest.raw
    return bytes((0, 4 + len(raw), 0, digest.algorithm.kernel_id)) + raw


def _entry_size(pair: tuple[bytes, bytes]) -> int:
    _index, suffix = xattr_prefix(pair[0])
    return (XATTR_ENTRY.size + len(suffix) + len(pair[1]) + 3) & ~3


def _entry(pair: tuple[bytes, bytes]) -> bytes:
    index, suffix = xattr_prefix(pair[0])
    raw = XATTR_ENTRY.pack(len(suffix), index, len(pair[1])) + suffix + pair[1]
    return raw + b"\0" * (-len(raw) % 4)


class _Writer:
    def __init__(self, fs: FileSystem, version: int) -> None:
        if version not in (0, 1):
            raise ErofsWriteError(f"composefs EROFS version {version} is not supported (0 or 1)")
        self.fs = fs
        self.version = version
        self.nodes: list[_Node] = []
        self.by_id: dict[int, _Node] = {}
        self.filter_bits: dict[bytes, int] = {}
        self.has_acl = False
        self.min_mtime = (0, 0)
        self.inodes_end = 0
        self.shared_table: list[tuple[bytes, bytes]] = []
        self.shared_size = 0
        self.n_data_blocks = 0
        self.data_start = 0
        self._plan_tree()
        self._plan_shared()
        self._plan_layout()

    def path_of(self, node: _Node) -> str:
        """The absolute path of a planned inode, for error messages."""
        parts: list[bytes] = []
        while node.parent != -1:
            parts.append(node.name)
            node = self.nodes[node.parent]
        return "/" + b"/".join(reversed(parts)).decode(errors="backslashreplace")

    # -- pass 1: rewrites and BFS numbering --------------------------------------------

    def _scan(self) -> tuple[dict[int, int], dict[int, tuple[int, bytes]], set[int]]:
        """Depth first: name counts, canonical names of linked leaves, whiteout dirs."""
        nlinks: dict[int, int] = {}
        canonical: dict[int, tuple[int, bytes]] = {}
        whiteout_dirs: set[int] = set()
        stack: list[Directory] = [self.fs.root]
        while stack:
            directory = stack.pop()
            children = directory.sorted_entries()
            for name, child in children:
                if isinstance(child, Leaf):
                    key = id(child)
                    count = nlinks.get(key, 0)
                    nlinks[key] = count + 1
                    if count == 0:
                        canonical[key] = (id(directory), name)
                        content = child.content
                        if isinstance(content, CharDevice) and content.rdev == 0:
                            whiteout_dirs.add(id(directory))
            # Depth first in byte order: push in reverse so the smallest name pops first.
            stack.extend(
                child for _name, child in reversed(children) if isinstance(child, Directory)
            )
        return nlinks, canonical, whiteout_dirs

    def _plan_tree(self) -> None:
        root = self.fs.root
        nlinks, canonical, whiteout_dirs = self._scan()
        queue: list[tuple[Inode, Directory, int, bytes]] = [(root, root, -1, b"")]
        nodes = self.nodes
        by_id = self.by_id
        min_mtime = (root.stat.mtime, root.stat.mtime_nsec)
        has_acl = False
        stubs: set[int] = set()
        index = 0
        while index < len(queue):
            inode, parent, parent_index, name = queue[index]
            queue[index] = None  # type: ignore[call-overload]  # let the queue shrink
            node = _Node(parent_index, name)
            nodes.append(node)
            by_id[id(inode)] = node
            stat = inode.stat
            node.uid = stat.uid
            node.gid = stat.gid
            node.mtime = stat.mtime
            node.mtime_nsec = stat.mtime_nsec
            if (stat.mtime, stat.mtime_nsec) < min_mtime:
                min_mtime = (stat.mtime, stat.mtime_nsec)
            xattrs = _escape_xattrs(stat.xattrs) if stat.xattrs else {}
            if isinstance(inode, Directory):
                node.kind = S_IFDIR
                node.mode = S_IFDIR | (stat.mode & 0o7777)
                entries = dict(inode.entries)
                if inode is root:
                    for stub_name in _STUB_NAMES:
                        if stub_name not in entries:
                            entries[stub_name] = new_stub = _stub(stat)
                            stubs.add(id(new_stub))
                subdirs = 0
                for child_name, child in sorted(entries.items()):
                    if isinstance(child, Directory):
                        subdirs += 1
                        queue.append((child, inode, index, child_name))
                    elif nlinks.get(id(child), 1) == 1 or canonical[id(child)] == (
                        id(inode),
                        child_name,
                    ):
                        queue.append((child, inode, index, child_name))
                entries[b"."] = inode
                entries[b".."] = parent
                node.entries = sorted(entries.items())
                node.nlink = 2 + subdirs
                if id(inode) in whiteout_dirs:
                    xattrs.update(_WHITEOUTS_DIR_XATTRS)
                    if self.version >= 1:
                        xattrs.update(_OPAQUE_DIR_XATTRS)
                if inode is root:
                    xattrs[_OPAQUE] = b"y"
            else:
                # The stubs are added after the rewrites: they stay char devices.
                stub = id(inode) in stubs
                self._plan_leaf(node, inode, xattrs, stub=stub)
                node.nlink = nlinks.get(id(inode), 1)
            if xattrs:
                node.xattrs = sorted(xattrs.items())
                if _ACL_ACCESS in xattrs or _ACL_DEFAULT in xattrs:
                    has_acl = True
            index += 1
        self.min_mtime = min_mtime
        self.has_acl = has_acl

    def _plan_leaf(
        self, node: _Node, leaf: Leaf, xattrs: dict[bytes, bytes], *, stub: bool
    ) -> None:
        content = leaf.content
        perms = leaf.stat.mode & 0o7777
        if isinstance(content, ExternalFile):
            node.kind = S_IFREG
            node.size = content.size
            if content.size > 0:
                xattrs[_METACOPY] = metacopy_xattr(content.digest)
                if content.payload:
                    xattrs[_REDIRECT] = b"/" + content.payload.encode()
        elif isinstance(content, InlineFile):
            node.kind = S_IFREG
            node.size = len(content.data)
            node.data = content.data
        elif isinstance(content, Symlink):
            node.kind = S_IFLNK
            node.size = len(content.target)
            node.data = content.target
        elif isinstance(content, CharDevice) and content.rdev == 0 and not stub:
            # A user whiteout becomes an empty regular file with escaped whiteout xattrs.
            node.kind = S_IFREG
            xattrs.update(_WHITEOUT_XATTRS)
        else:
            node.kind = leaf.file_type
            if isinstance(content, CharDevice | BlockDevice):
                node.rdev = content.rdev & _U32
        node.mode = node.kind | perms
        # Blocks and tail (C's compute_erofs_inode_size).
        if node.kind == S_IFLNK:
            node.tail = node.size
            node.tail_kind = _T_DATA
        elif node.kind == S_IFREG and node.size > 0:
            if node.data:
                node.blocks, node.tail = divmod(node.size, BLOCK_SIZE)
                if node.tail > BLOCK_SIZE // 2:
                    node.blocks += 1
                    node.tail = 0
                node.tail_kind = _T_DATA
            else:
                bits = chunk_bits(node.size)
                chunks = -(-node.size // (1 << bits))
                if chunks > MAX_NONINLINE_CHUNKS:
                    raise ErofsWriteError(
                        f"{self.path_of(node)}: a file of {node.size} bytes is too big for a"
                        f" composefs image ({chunks} chunks of 2**{bits} bytes, at most"
                        f" {MAX_NONINLINE_CHUNKS})"
                    )
                node.chunk_format = bits - 12
                node.tail = 4 * chunks
                node.tail_kind = _T_CHUNKS

    # -- pass 2: shared xattrs ---------------------------------------------------------

    def _plan_shared(self) -> None:
        counts: dict[tuple[bytes, bytes], int] = {}
        for node in self.nodes:
            for pair in node.xattrs:
                counts[pair] = counts.get(pair, 0) + 1
        shared = [pair for pair, count in counts.items() if count > 1]
        del counts
        # Descending by name, then value length, then value bytes (C's xattrs_ht_sort).
        shared.sort(key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
        offsets: dict[tuple[bytes, bytes], int] = {}
        offset = 0
        for pair in shared:
            offsets[pair] = offset
            offset += _entry_size(pair)
        self.shared_table = shared
        self.shared_size = offset
        for node in self.nodes:
            if not offsets:
                node.inline = node.xattrs
                continue
            refs = node.shared
            inline = node.inline
            for pair in node.xattrs:
                where = offsets.get(pair)
                if where is not None and len(refs) < MAX_SHARED_XATTRS:
                    refs.append(where)
                else:
                    inline.append(pair)

    # -- pass 3: layout ----------------------------------------------------------------

    def _plan_layout(self) -> None:
        min_mtime = self.min_mtime
        pos = SUPERBLOCK_OFFSET + SUPERBLOCK.size
        n_data_blocks = 0
        for node in self.nodes:
            if node.kind == S_IFDIR:
                self._plan_dir(node)
                size = node.blocks * BLOCK_SIZE + node.tail
            else:
                size = node.size
            node.compact = (
                (node.mtime, node.mtime_nsec) == min_mtime
                and node.nlink <= _U16
                and node.uid <= _U16
                and node.gid <= _U16
                and size <= _U32
            )
            inode_size = COMPACT_INODE.size if node.compact else EXTENDED_INODE.size
            xattr_size = 0
            if node.xattrs:
                inline = sum(_entry_size(pair) for pair in node.inline)
                xattr_size = XATTR_IBODY_HEADER.size + 4 * len(node.shared) + inline
                if (xattr_size - XATTR_IBODY_HEADER.size) // 4 + 1 > _U16:
                    raise ErofsWriteError(
                        f"{self.path_of(node)}: {xattr_size} bytes of xattrs do not fit"
                        " an EROFS inode"
                    )
            node.xattr_size = xattr_size
            start = pos
            pos = (pos + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
            pos += self._tail_padding(node, pos, inode_size + xattr_size)
            node.ipad = pos - start
            node.nid = pos // SLOT_SIZE
            n_data_blocks += node.blocks
            pos += inode_size + xattr_size + node.tail
        self.inodes_end = (pos + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
        self.n_data_blocks = n_data_blocks
        self.data_start = -(-(self.inodes_end + self.shared_size) // BLOCK_SIZE) * BLOCK_SIZE
        if self.nodes[0].nid > _U16:
            raise InternalError(f"root nid {self.nodes[0].nid} does not fit 16 bits")

    @staticmethod
    def _plan_dir(node: _Node) -> None:
        """Full dirent blocks and the inline tail (C's ``compute_erofs_dir_size``)."""
        assert node.entries is not None
        blocks = 0
        used = 0
        for name, _child in node.entries:
            length = DIRENT.size + len(name)
            if used + length > BLOCK_SIZE:
                blocks += 1
                used = 0
            used += length
        if used > BLOCK_SIZE // 2:  # never inline more than half a block
            blocks += 1
            used = 0
        node.blocks = blocks
        node.tail = used
        node.tail_kind = _T_DIR

    @staticmethod
    def _tail_padding(node: _Node, pos: int, head: int) -> int:
        """Zero bytes before the inode so that its inline tail stays in one block.

        ``head`` is the inode plus its xattrs. May move the tail to a data block.
        """
        if node.kind == S_IFLNK:
            total = head + node.tail
            if total >= BLOCK_SIZE:  # the target goes to a data block
                node.blocks += 1
                node.tail = 0
            if pos // BLOCK_SIZE != (pos + total - 1) // BLOCK_SIZE:
                return -pos % BLOCK_SIZE  # (checked with the size before promotion)
            return 0
        remainder = BLOCK_SIZE - (pos + head) % BLOCK_SIZE
        if remainder < node.tail:
            pad = (remainder + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
            if node.tail <= BLOCK_SIZE - (pos + head + pad) % BLOCK_SIZE:
                return pad
            node.blocks += 1
            node.tail = 0
            return -pos % BLOCK_SIZE
        return 0

    # -- emit --------------------------------------------------------------------------

    def _filter(self, node: _Node) -> int:
        bits = 0
        cache = self.filter_bits
        for key, _value in node.xattrs:
            bit = cache.get(key)
            if bit is None:
                index, suffix = xattr_prefix(key)
                bit = cache[key] = 1 << (xxh32(suffix, XATTR_FILTER_SEED + index) & 31)
            bits |= bit
        return _U32 & ~bits

    def _dirents(self, entries: list[tuple[bytes, Inode]]) -> bytes:
        by_id = self.by_id
        heads = []
        nameoff = DIRENT.size * len(entries)
        for name, child in entries:
            target = by_id[id(child)]
            heads.append(DIRENT.pack(target.nid, nameoff, _FILE_TYPES[target.kind]))
            nameoff += len(name)
        return b"".join(heads) + b"".join(name for name, _child in entries)

    def _dir_chunks(self, node: _Node, *, blocks_wanted: bool) -> tuple[list[bytes], bytes]:
        """The directory's full blocks (each padded to 4096) and its inline tail.

        Blocks are built only if ``blocks_wanted``; the tail only if not.
        """
        assert node.entries is not None
        entries = node.entries
        blocks: list[bytes] = []
        n_blocks = 0
        first = 0
        used = 0
        for i, (name, _child) in enumerate(entries):
            length = DIRENT.size + len(name)
            if used + length > BLOCK_SIZE:
                if blocks_wanted:
                    blocks.append(self._dirents(entries[first:i]).ljust(BLOCK_SIZE, b"\0"))
                n_blocks += 1
                first = i
                used = 0
            used += length
        if n_blocks < node.blocks:
            if blocks_wanted:
                blocks.append(self._dirents(entries[first:]).ljust(BLOCK_SIZE, b"\0"))
            first = len(entries)
        tail = b""
        if not blocks_wanted and first < len(entries):
            tail = self._dirents(entries[first:])
        return blocks, tail

    def _inode(self, node: _Node, ino: int, blkaddr: int) -> bytes:
        kind = node.kind
        size = node.blocks * BLOCK_SIZE + node.tail if kind == S_IFDIR else node.size
        if node.tail_kind == _T_CHUNKS:
            layout = LAYOUT_CHUNK_BASED
        else:
            layout = LAYOUT_FLAT_INLINE if node.tail else LAYOUT_FLAT_PLAIN
        i_u = 0
        if kind in (S_IFCHR, S_IFBLK):
            i_u = node.rdev
        elif node.blocks:
            i_u = blkaddr
        if layout == LAYOUT_CHUNK_BASED:
            i_u = (i_u & 0xFFFF0000) | node.chunk_format
        icount = 0 if not node.xattr_size else (node.xattr_size - XATTR_IBODY_HEADER.size) // 4 + 1
        if node.compact:
            raw = COMPACT_INODE.pack(
                layout << 1,
                icount,
                node.mode & _U16,
                node.nlink,
                size,
                i_u,
                ino,
                node.uid,
                node.gid,
            )
        else:
            raw = EXTENDED_INODE.pack(
                layout << 1 | 1,
                icount,
                node.mode & _U16,
                size,
                i_u,
                ino,
                node.uid,
                node.gid,
                node.mtime & _U64,
                node.mtime_nsec,
                node.nlink,
            )
        return raw

    def _xattr_body(self, node: _Node) -> bytes:
        refs_base = self.inodes_end % BLOCK_SIZE
        parts = [XATTR_IBODY_HEADER.pack(self._filter(node), len(node.shared))]
        parts.extend(((refs_base + offset) >> 2).to_bytes(4, "little") for offset in node.shared)
        parts.extend(_entry(pair) for pair in node.inline)
        return b"".join(parts)

    def _inode_tail(self, node: _Node, dir_tail: bytes) -> bytes:
        if not node.tail:
            return b""
        if node.tail_kind == _T_DIR:
            return dir_tail
        if node.tail_kind == _T_CHUNKS:
            return b"\xff" * node.tail
        return node.data[len(node.data) - node.tail :]

    def header(self) -> bytes:
        """The composefs header and the EROFS superblock: the first 1152 bytes."""
        flags = HEADER_FLAG_HAS_ACL if self.has_acl else 0
        head = HEADER.pack(COMPOSEFS_MAGIC, COMPOSEFS_HEADER_VERSION, flags, self.version)
        sec, nsec = self.min_mtime
        superblock = SUPERBLOCK.pack(
            EROFS_MAGIC,
            0,  # no checksum
            FEATURE_COMPAT_MTIME | FEATURE_COMPAT_XATTR_FILTER,
            12,  # blkszbits
            0,  # sb_extslots
            self.nodes[0].nid,
            len(self.nodes),
            sec & _U64,
            nsec,
            self.data_start // BLOCK_SIZE + self.n_data_blocks,
            0,  # meta_blkaddr: nids count from the image start
            self.inodes_end // BLOCK_SIZE,
            b"",
            b"",
            0,  # feature_incompat: none (not even CHUNKED_FILE, as C)
        )
        return head.ljust(SUPERBLOCK_OFFSET, b"\0") + superblock

    def chunks(self) -> Iterator[bytes]:
        """The image, in pieces of about 64 KiB."""
        buf = bytearray(self.header())
        pos = 0  # bytes yielded so far
        current_end = self.data_start
        for ino, node in enumerate(self.nodes):
            blkaddr = 0
            if node.blocks and node.kind in (S_IFDIR, S_IFREG, S_IFLNK):
                blkaddr = current_end // BLOCK_SIZE
                current_end += node.blocks * BLOCK_SIZE
            if blkaddr > _U32:
                raise ErofsWriteError("the image is too big: block addresses exceed 32 bits")
            dir_tail = b""
            if node.kind == S_IFDIR and node.tail:
                dir_tail = self._dir_chunks(node, blocks_wanted=False)[1]
            buf += bytes(node.ipad)
            buf += self._inode(node, ino, blkaddr)
            if node.xattr_size:
                buf += self._xattr_body(node)
            buf += self._inode_tail(node, dir_tail)
            if len(buf) >= _FLUSH:
                pos += len(buf)
                yield bytes(buf)
                buf.clear()
        buf += bytes(self.inodes_end - pos - len(buf))
        for pair in self.shared_table:
            buf += _entry(pair)
        buf += bytes(self.data_start - self.inodes_end - self.shared_size)
        for node in self.nodes:
            if not node.blocks:
                continue
            if node.kind == S_IFDIR:
                for block in self._dir_chunks(node, blocks_wanted=True)[0]:
                    buf += block
            elif node.tail_kind == _T_CHUNKS:
                buf += b"\xff" * BLOCK_SIZE
            else:
                data = node.data[: len(node.data) - node.tail]
                buf += data
                buf += bytes(node.blocks * BLOCK_SIZE - len(data))
            if len(buf) >= _FLUSH:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)


def iter_erofs(fs: FileSystem, *, version: int = 1) -> Iterator[bytes]:
    """The composefs EROFS image of ``fs``, as a stream of byte strings.

    Byte-identical to C ``mkcomposefs --min-version=V --max-version=V`` 1.0.8 given our
    dumpfile of the same tree (V1, the default, or V0). The layout is planned before the
    first piece is yielded (errors such as :class:`ErofsWriteError` come then); the
    image itself is never held whole. The tree must not change while this runs.
    """
    writer = _Writer(fs, version)
    return writer.chunks()


def write_erofs(fs: FileSystem, *, version: int = 1) -> bytes:
    """The composefs EROFS image of ``fs`` (see :func:`iter_erofs`), as one ``bytes``."""
    return b"".join(iter_erofs(fs, version=version))


def compute_image_id(
    fs: FileSystem, algorithm: Algorithm = Algorithm.SHA256, *, version: int = 1
) -> Digest:
    """The image ID: the fs-verity digest of the image of ``fs`` in ``algorithm``.

    This is the name composefs-rs and ``mkcomposefs --print-digest`` give the image
    (``images/<hex>`` in a repository). Hashes the image as it streams.
    """
    hasher = FsVerityHasher(algorithm)
    for piece in iter_erofs(fs, version=version):
        hasher.update(piece)
    return hasher.digest()
