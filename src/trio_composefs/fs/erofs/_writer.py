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
written in that order, about 64 KiB at a time: the image is never held whole. The plan
kept between passes is flat arrays indexed by inode number plus one record per
distinct xattr set (about 300 bytes per inode on a tree where a third of the files
are external: measured 29 MiB for 100,000 entries).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from ..._errors import ErofsWriteError, InternalError
from ...formats._fsverity import Algorithm, Digest, FsVerityHasher
from .._tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    S_IFSOCK,
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
    NULL_ADDR,
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
_NULL_CHUNK = NULL_ADDR.to_bytes(4, "little")  # an unmapped chunk: ff ff ff ff

# Tail kinds: what the inline tail (or the promoted block) holds.
_T_NONE = 0
_T_DIR = 1
_T_DATA = 2  # inline file bytes or symlink target
_T_CHUNKS = 3  # null chunk index


class _Xattrs:
    """One distinct set of xattrs, shared by every inode that has exactly this set.

    Real trees repeat a few sets (an SELinux label, a capability) over most inodes, so
    the plan keeps one of these per set, not per inode.
    """

    __slots__ = ("body", "filter", "inline", "pairs", "refs", "size", "users")

    def __init__(self, pairs: tuple[tuple[bytes, bytes], ...]) -> None:
        self.pairs = pairs  # sorted by name
        self.users = 0  # how many inodes have this set
        self.refs: tuple[int, ...] = ()  # byte offsets in the shared table, in ref order
        self.inline = pairs  # the pairs stored in the inode itself
        self.size = 0  # the inode's xattr area: header, refs, inline entries
        self.filter = 0
        self.body: bytes | None = None  # built on first use, once the layout is known


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
    """The plan of one image: per-inode facts in flat arrays indexed by BFS number.

    Arrays of machine integers instead of an object per inode keep the plan at about
    80 bytes per inode (plus one record per distinct xattr set), so a tree of a
    million entries costs far less than its image.
    """

    def __init__(self, fs: FileSystem, version: int) -> None:
        if version not in (0, 1):
            raise ErofsWriteError(f"composefs EROFS version {version} is not supported (0 or 1)")
        self.fs = fs
        self.version = version
        # Per inode, by BFS index (= i_ino).
        self.inodes: list[Inode] = []
        self.parent = array("q")  # BFS index of the parent; -1 for the root
        self.names: list[bytes] = []  # the inode's (canonical) name, for messages
        self.kind = bytearray()  # S_IFMT >> 12 of the image inode (whiteouts: S_IFREG)
        self.nlink = array("Q")
        self.size = array("Q")  # st_size of files and symlinks
        self.xattrs: list[_Xattrs | None] = []
        self.first_child = array("q")  # directories: BFS index of the first queued child
        self.blocks = array("Q")  # data blocks
        self.tail = array("I")  # inline tail bytes
        self.tail_kind = bytearray()
        self.chunk_format = bytearray()
        self.compact = bytearray()
        self.ipad = array("I")  # zero bytes before the inode
        self.nid = array("Q")
        # Hard-linked leaves only: their canonical (directory id, name) and BFS index.
        self.canonical: dict[int, tuple[int, bytes]] = {}
        self.linked: dict[int, int] = {}
        self.xattr_sets: dict[tuple[tuple[bytes, bytes], ...], _Xattrs] = {}
        self.stubs: dict[bytes, Leaf] = {}
        self.stub_ids: set[int] = set()
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

    def path_of(self, index: int) -> str:
        """The absolute path of a planned inode, for error messages."""
        parts: list[bytes] = []
        while self.parent[index] != -1:
            parts.append(self.names[index])
            index = self.parent[index]
        return "/" + b"/".join(reversed(parts)).decode(errors="backslashreplace")

    def _entries(self, index: int) -> list[tuple[bytes, Inode]]:
        """A directory's entries as the image lists them: sorted, with ``.``, ``..``
        and, in the root, the stubs."""
        directory = self.inodes[index]
        assert isinstance(directory, Directory)
        entries = dict(directory.entries)
        parent = self.parent[index]
        if parent == -1:
            for name, stub in self.stubs.items():
                entries.setdefault(name, stub)
            entries[b".."] = directory
        else:
            entries[b".."] = self.inodes[parent]
        entries[b"."] = directory
        return sorted(entries.items())

    def _targets(self, index: int, entries: list[tuple[bytes, Inode]]) -> list[int]:
        """The BFS index each entry of directory ``index`` points at.

        Children were queued in this same order, so the queued ones (directories, stubs,
        leaves at their canonical name) take consecutive indexes from ``first_child``;
        other names of a hard-linked leaf point at its canonical inode.
        """
        directory = self.inodes[index]
        parent = self.parent[index]
        canonical = self.canonical
        next_child = self.first_child[index]
        out = []
        for name, child in entries:
            if child is directory and name == b".":
                out.append(index)
            elif name == b"..":
                out.append(index if parent == -1 else parent)
            elif isinstance(child, Directory):
                out.append(next_child)
                next_child += 1
            else:
                where = canonical.get(id(child))
                if where is None or where == (id(directory), name):
                    out.append(next_child)
                    next_child += 1
                else:
                    out.append(self.linked[id(child)])
        return out

    # -- pass 1: rewrites and BFS numbering --------------------------------------------

    def _scan(self) -> tuple[dict[int, int], set[int]]:
        """Depth first: name counts and canonical names of hard-linked leaves,
        directories holding user whiteouts."""
        nlinks: dict[int, int] = {}
        first: dict[int, tuple[int, bytes]] = {}
        whiteout_dirs: set[int] = set()
        # Depth first, pre-order, children in byte order: the dumpfile's line order.
        root = self.fs.root
        stack: list[tuple[Directory, Iterator[tuple[bytes, Inode]]]] = [
            (root, iter(root.sorted_entries()))
        ]
        seen_dirs = {id(root)}
        while stack:
            directory, children = stack[-1]
            for name, child in children:
                if isinstance(child, Directory):
                    if id(child) in seen_dirs:
                        raise ErofsWriteError(
                            f"directory {name!r} appears twice in the tree (a directory"
                            " cannot be hard-linked, and a tree has no cycles)"
                        )
                    seen_dirs.add(id(child))
                    stack.append((child, iter(child.sorted_entries())))
                    break
                key = id(child)
                count = nlinks.get(key, 0)
                nlinks[key] = count + 1
                if count == 0:
                    first[key] = (id(directory), name)
                    content = child.content
                    if isinstance(content, CharDevice) and content.rdev == 0:
                        whiteout_dirs.add(id(directory))
            else:
                stack.pop()
        # Only hard-linked leaves need their canonical name, and only they keep a count.
        multi = {key: count for key, count in nlinks.items() if count > 1}
        del nlinks
        self.canonical = {key: first[key] for key in multi}
        return multi, whiteout_dirs

    def _intern(self, xattrs: dict[bytes, bytes]) -> _Xattrs:
        pairs = tuple(sorted(xattrs.items()))
        found = self.xattr_sets.get(pairs)
        if found is None:
            found = self.xattr_sets[pairs] = _Xattrs(pairs)
            if _ACL_ACCESS in xattrs or _ACL_DEFAULT in xattrs:
                self.has_acl = True
        found.users += 1
        return found

    def _plan_tree(self) -> None:
        root = self.fs.root
        nlinks, whiteout_dirs = self._scan()
        canonical = self.canonical
        self.stubs = {name: _stub(root.stat) for name in _STUB_NAMES if name not in root.entries}
        self.stub_ids = {id(stub) for stub in self.stubs.values()}
        queue: list[tuple[Inode, int, bytes] | None] = [(root, -1, b"")]
        min_mtime = (root.stat.mtime, root.stat.mtime_nsec)
        index = 0
        while index < len(queue):
            item = queue[index]
            assert item is not None
            queue[index] = None  # let the queue's items go as it advances
            inode, parent_index, name = item
            self.inodes.append(inode)
            self.parent.append(parent_index)
            self.names.append(name)
            stat = inode.stat
            if (stat.mtime, stat.mtime_nsec) < min_mtime:
                min_mtime = (stat.mtime, stat.mtime_nsec)
            if stat.uid > _U32 or stat.gid > _U32 or not 0 <= stat.mtime_nsec <= _U32:
                raise ErofsWriteError(
                    f"{self.path_of(index)}: uid, gid or mtime_nsec out of range"
                    f" ({stat.uid}, {stat.gid}, {stat.mtime_nsec})"
                )
            xattrs = _escape_xattrs(stat.xattrs) if stat.xattrs else {}
            self.first_child.append(len(queue))
            if isinstance(inode, Directory):
                children = inode.sorted_entries()
                if parent_index == -1:
                    children = sorted([*children, *self.stubs.items()])
                subdirs = 0
                for child_name, child in children:
                    if isinstance(child, Directory):
                        subdirs += 1
                        queue.append((child, index, child_name))
                    else:
                        where = canonical.get(id(child))
                        if where is None or where == (id(inode), child_name):
                            queue.append((child, index, child_name))
                if id(inode) in whiteout_dirs:
                    xattrs.update(_WHITEOUTS_DIR_XATTRS)
                    if self.version >= 1:
                        xattrs.update(_OPAQUE_DIR_XATTRS)
                if parent_index == -1:
                    xattrs[_OPAQUE] = b"y"
                self.kind.append(S_IFDIR >> 12)
                self.nlink.append(2 + subdirs)
                self.size.append(0)
                self.blocks.append(0)
                self.tail.append(0)
                self.tail_kind.append(_T_DIR)
                self.chunk_format.append(0)
            else:
                count = nlinks.get(id(inode), 1)
                if count > 1:
                    self.linked[id(inode)] = index
                if count > _U32:
                    raise ErofsWriteError(f"{self.path_of(index)}: {count} links")
                self.nlink.append(count)
                # The stubs are added after the rewrites: they stay char devices.
                self._plan_leaf(index, inode, xattrs, stub=id(inode) in self.stub_ids)
            self.xattrs.append(self._intern(xattrs) if xattrs else None)
            index += 1
        self.min_mtime = min_mtime

    def _plan_leaf(self, index: int, leaf: Leaf, xattrs: dict[bytes, bytes], *, stub: bool) -> None:
        content = leaf.content
        kind = leaf.file_type
        size = 0
        if isinstance(content, ExternalFile):
            size = content.size
            if size > 0:
                xattrs[_METACOPY] = metacopy_xattr(content.digest)
                if content.payload:
                    xattrs[_REDIRECT] = b"/" + content.payload.encode()
        elif isinstance(content, InlineFile):
            size = len(content.data)
        elif isinstance(content, Symlink):
            size = len(content.target)
        elif isinstance(content, CharDevice) and content.rdev == 0 and not stub:
            # A user whiteout becomes an empty regular file with escaped whiteout xattrs.
            kind = S_IFREG
            xattrs.update(_WHITEOUT_XATTRS)
        # Blocks and tail (C's compute_erofs_inode_size).
        blocks = tail = chunk_format = 0
        tail_kind = _T_NONE
        if kind == S_IFLNK:
            tail = size
            tail_kind = _T_DATA
        elif kind == S_IFREG and size > 0:
            if isinstance(content, InlineFile):
                blocks, tail = divmod(size, BLOCK_SIZE)
                if tail > BLOCK_SIZE // 2:
                    blocks += 1
                    tail = 0
                tail_kind = _T_DATA
            else:
                bits = chunk_bits(size)
                chunks = -(-size // (1 << bits))
                if chunks > MAX_NONINLINE_CHUNKS or size > _U64:
                    raise ErofsWriteError(
                        f"{self.path_of(index)}: a file of {size} bytes is too big for a"
                        f" composefs image ({chunks} chunks of 2**{bits} bytes, at most"
                        f" {MAX_NONINLINE_CHUNKS})"
                    )
                chunk_format = bits - 12
                tail = 4 * chunks
                tail_kind = _T_CHUNKS
        self.kind.append(kind >> 12)
        self.size.append(size)
        self.blocks.append(blocks)
        self.tail.append(tail)
        self.tail_kind.append(tail_kind)
        self.chunk_format.append(chunk_format)

    # -- pass 2: shared xattrs ---------------------------------------------------------

    def _plan_shared(self) -> None:
        counts: dict[tuple[bytes, bytes], int] = {}
        for xs in self.xattr_sets.values():
            for pair in xs.pairs:
                counts[pair] = counts.get(pair, 0) + xs.users
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
        filter_bits: dict[bytes, int] = {}
        for xs in self.xattr_sets.values():
            if offsets:
                refs: list[int] = []
                inline: list[tuple[bytes, bytes]] = []
                for pair in xs.pairs:
                    where = offsets.get(pair)
                    if where is not None and len(refs) < MAX_SHARED_XATTRS:
                        refs.append(where)
                    else:
                        inline.append(pair)
                xs.refs = tuple(refs)
                xs.inline = tuple(inline)
            xs.size = (
                XATTR_IBODY_HEADER.size
                + 4 * len(xs.refs)
                + sum(_entry_size(pair) for pair in xs.inline)
            )
            if (xs.size - XATTR_IBODY_HEADER.size) // 4 + 1 > _U16:
                raise ErofsWriteError(
                    f"{xs.size} bytes of xattrs do not fit an EROFS inode"
                    f" ({len(xs.pairs)} xattrs, the first {xs.pairs[0][0]!r})"
                )
            bits = 0
            for key, _value in xs.pairs:
                bit = filter_bits.get(key)
                if bit is None:
                    index, suffix = xattr_prefix(key)
                    bit = filter_bits[key] = 1 << (xxh32(suffix, XATTR_FILTER_SEED + index) & 31)
                bits |= bit
            xs.filter = _U32 & ~bits

    # -- pass 3: layout ----------------------------------------------------------------

    def _plan_layout(self) -> None:
        min_mtime = self.min_mtime
        pos = SUPERBLOCK_OFFSET + SUPERBLOCK.size
        n_data_blocks = 0
        kinds = self.kind
        blocks = self.blocks
        tails = self.tail
        dir_kind = S_IFDIR >> 12
        for index, inode in enumerate(self.inodes):
            kind = kinds[index]
            if kind == dir_kind:
                self._plan_dir(index)
                size = blocks[index] * BLOCK_SIZE + tails[index]
            else:
                size = self.size[index]
            stat = inode.stat
            compact = (
                (stat.mtime, stat.mtime_nsec) == min_mtime
                and self.nlink[index] <= _U16
                and stat.uid <= _U16
                and stat.gid <= _U16
                and size <= _U32
            )
            self.compact.append(compact)
            inode_size = COMPACT_INODE.size if compact else EXTENDED_INODE.size
            xs = self.xattrs[index]
            xattr_size = xs.size if xs is not None else 0
            start = pos
            pos = (pos + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
            pos += self._tail_padding(index, pos, inode_size + xattr_size)
            self.ipad.append(pos - start)
            self.nid.append(pos // SLOT_SIZE)
            n_data_blocks += blocks[index]
            pos += inode_size + xattr_size + tails[index]
        self.inodes_end = (pos + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
        self.n_data_blocks = n_data_blocks
        self.data_start = -(-(self.inodes_end + self.shared_size) // BLOCK_SIZE) * BLOCK_SIZE
        if self.nid[0] > _U16:
            raise InternalError(f"root nid {self.nid[0]} does not fit 16 bits")
        if self.data_start // BLOCK_SIZE + n_data_blocks > _U32:
            raise ErofsWriteError("the image is too big: block addresses exceed 32 bits")

    def _plan_dir(self, index: int) -> None:
        """Full dirent blocks and the inline tail (C's ``compute_erofs_dir_size``)."""
        blocks = 0
        used = 0
        for name, _child in self._entries(index):
            length = DIRENT.size + len(name)
            if used + length > BLOCK_SIZE:
                blocks += 1
                used = 0
            used += length
        if used > BLOCK_SIZE // 2:  # never inline more than half a block
            blocks += 1
            used = 0
        self.blocks[index] = blocks
        self.tail[index] = used

    def _tail_padding(self, index: int, pos: int, head: int) -> int:
        """Zero bytes before the inode so that its inline tail stays in one block.

        ``head`` is the inode plus its xattrs. May move the tail to a data block.
        """
        tail = self.tail[index]
        if self.kind[index] == S_IFLNK >> 12:
            total = head + tail
            if total >= BLOCK_SIZE:  # the target goes to a data block
                self.blocks[index] += 1
                self.tail[index] = 0
            if pos // BLOCK_SIZE != (pos + total - 1) // BLOCK_SIZE:
                return -pos % BLOCK_SIZE  # (checked with the size before promotion)
            return 0
        remainder = BLOCK_SIZE - (pos + head) % BLOCK_SIZE
        if remainder < tail:
            pad = (remainder + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
            if tail <= BLOCK_SIZE - (pos + head + pad) % BLOCK_SIZE:
                return pad
            self.blocks[index] += 1
            self.tail[index] = 0
            return -pos % BLOCK_SIZE
        return 0

    # -- emit --------------------------------------------------------------------------

    def _dirents(self, entries: list[tuple[bytes, Inode]], targets: list[int]) -> bytes:
        nid = self.nid
        kind = self.kind
        heads = []
        nameoff = DIRENT.size * len(entries)
        for (name, _child), target in zip(entries, targets, strict=True):
            heads.append(DIRENT.pack(nid[target], nameoff, _FILE_TYPES[kind[target] << 12]))
            nameoff += len(name)
        return b"".join(heads) + b"".join(name for name, _child in entries)

    def _dir_chunks(self, index: int, *, blocks_wanted: bool) -> tuple[list[bytes], bytes]:
        """The directory's full blocks (each padded to 4096) and its inline tail.

        Blocks are built only if ``blocks_wanted``; the tail only if not.
        """
        entries = self._entries(index)
        targets = self._targets(index, entries)
        blocks: list[bytes] = []
        n_blocks = 0
        first = 0
        used = 0
        for i, (name, _child) in enumerate(entries):
            length = DIRENT.size + len(name)
            if used + length > BLOCK_SIZE:
                if blocks_wanted:
                    chunk = self._dirents(entries[first:i], targets[first:i])
                    blocks.append(chunk.ljust(BLOCK_SIZE, b"\0"))
                n_blocks += 1
                first = i
                used = 0
            used += length
        if n_blocks < self.blocks[index]:
            if blocks_wanted:
                chunk = self._dirents(entries[first:], targets[first:])
                blocks.append(chunk.ljust(BLOCK_SIZE, b"\0"))
            first = len(entries)
        tail = b""
        if not blocks_wanted and first < len(entries):
            tail = self._dirents(entries[first:], targets[first:])
        return blocks, tail

    def _inode(self, index: int, blkaddr: int) -> bytes:
        kind = self.kind[index] << 12
        inode = self.inodes[index]
        stat = inode.stat
        blocks = self.blocks[index]
        tail = self.tail[index]
        size = blocks * BLOCK_SIZE + tail if kind == S_IFDIR else self.size[index]
        if self.tail_kind[index] == _T_CHUNKS:
            layout = LAYOUT_CHUNK_BASED
        else:
            layout = LAYOUT_FLAT_INLINE if tail else LAYOUT_FLAT_PLAIN
        i_u = 0
        if kind in (S_IFCHR, S_IFBLK):
            assert isinstance(inode, Leaf)
            i_u = inode.rdev & _U32
        elif blocks:
            i_u = blkaddr
        if layout == LAYOUT_CHUNK_BASED:
            i_u = (i_u & 0xFFFF0000) | self.chunk_format[index]
        xs = self.xattrs[index]
        icount = 0 if xs is None else (xs.size - XATTR_IBODY_HEADER.size) // 4 + 1
        mode = kind | (stat.mode & 0o7777)
        nlink = self.nlink[index]
        if self.compact[index]:
            return COMPACT_INODE.pack(
                layout << 1, icount, mode, nlink, size, i_u, index, stat.uid, stat.gid
            )
        return EXTENDED_INODE.pack(
            layout << 1 | 1,
            icount,
            mode,
            size,
            i_u,
            index,
            stat.uid,
            stat.gid,
            stat.mtime & _U64,
            stat.mtime_nsec,
            nlink,
        )

    def _xattr_body(self, xs: _Xattrs) -> bytes:
        body = xs.body
        if body is None:
            refs_base = self.inodes_end % BLOCK_SIZE
            parts = [XATTR_IBODY_HEADER.pack(xs.filter, len(xs.refs))]
            parts.extend(((refs_base + offset) >> 2).to_bytes(4, "little") for offset in xs.refs)
            parts.extend(_entry(pair) for pair in xs.inline)
            body = b"".join(parts)
            if xs.users > 1:
                xs.body = body
        return body

    def _inode_tail(self, index: int) -> bytes:
        tail = self.tail[index]
        tail_kind = self.tail_kind[index]
        if tail_kind == _T_DIR:
            return self._dir_chunks(index, blocks_wanted=False)[1]
        if tail_kind == _T_CHUNKS:
            return _NULL_CHUNK * (tail // 4)
        return self._content(index)[self.size[index] - tail :]

    def _content(self, index: int) -> bytes:
        inode = self.inodes[index]
        assert isinstance(inode, Leaf)
        content = inode.content
        if isinstance(content, Symlink):
            return content.target
        assert isinstance(content, InlineFile)
        return content.data

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
            self.nid[0],
            len(self.inodes),
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
        blocks = self.blocks
        ipad = self.ipad
        tails = self.tail
        xattrs = self.xattrs
        for index in range(len(self.inodes)):
            blkaddr = 0
            if blocks[index]:
                blkaddr = current_end // BLOCK_SIZE
                current_end += blocks[index] * BLOCK_SIZE
            if ipad[index]:
                buf += bytes(ipad[index])
            buf += self._inode(index, blkaddr)
            xs = xattrs[index]
            if xs is not None:
                buf += self._xattr_body(xs)
            if tails[index]:
                buf += self._inode_tail(index)
            if len(buf) >= _FLUSH:
                pos += len(buf)
                yield bytes(buf)
                buf.clear()
        buf += bytes(self.inodes_end - pos - len(buf))
        for pair in self.shared_table:
            buf += _entry(pair)
        buf += bytes(self.data_start - self.inodes_end - self.shared_size)
        dir_kind = S_IFDIR >> 12
        for index in range(len(self.inodes)):
            n_blocks = blocks[index]
            if not n_blocks:
                continue
            if self.kind[index] == dir_kind:
                for block in self._dir_chunks(index, blocks_wanted=True)[0]:
                    buf += block
            elif self.tail_kind[index] == _T_CHUNKS:
                buf += _NULL_CHUNK * MAX_NONINLINE_CHUNKS  # C always writes a whole block
            else:
                data = self._content(index)[: self.size[index] - tails[index]]
                buf += data
                buf += bytes(n_blocks * BLOCK_SIZE - len(data))
            if len(buf) >= _FLUSH:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)


def iter_erofs(fs: FileSystem, *, version: int = 1) -> Iterator[bytes]:
    """The composefs EROFS image of ``fs``, as a stream of byte strings.

    Byte-identical to C ``mkcomposefs --min-version=V --max-version=V --from-file`` 1.0.8
    given our dumpfile of the same tree, and so to composefs-rs's V1 writer. ``version``
    1 (the default) or 0; 0 is exactly that, as C's ``--max-version=0``: user whiteouts
    are still converted but their directories get no ``opaque=x`` (C's option-less
    default would raise such an image to version 1).

    The whole layout is planned here, before the iterator is returned, so errors come
    from this call: :class:`ErofsWriteError` for a tree the format cannot hold (a file
    over 1024 chunks, i.e. > 8 PiB; too many xattrs; a directory met twice). The image
    is then yielded in pieces of about 64 KiB and never held whole. The tree must not
    change until the iterator is exhausted.
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
