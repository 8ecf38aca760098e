"""The composefs EROFS writer (V1, and V0 on request), byte-identical to C mkcomposefs 1.0.8.

Pure (layer L0). The image is computed in three passes over the tree, then emitted as
a stream of byte strings:

1. **Rewrites and order.** One pass over every directory (any order) counts the names
   of every leaf (a set of all leaves, dropped at its end; only hard-linked leaves are
   remembered) and finds the user whiteouts; if there are hard links, a second finds
   the canonical name of each hard-linked leaf (its first name in depth-first,
   byte-sorted order: the non-``@`` line of our dumpfile, which C takes as canonical).
   A breadth-first pass then numbers the
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
written in that order, about 64 KiB at a time: the image is never held whole, nor a
directory's dirents (built a block at a time). The plan kept between passes is flat
arrays indexed by inode number (about 60 bytes per inode), each directory's sorted
names (8 bytes per entry) and one record per distinct xattr set. An external file's
``metacopy`` and ``redirect`` xattrs, unique to it unless another file has the same
object, are not kept: only which digests occur more than once (those values go to the
shared table), and the xattrs are computed again for the layout and the image.
Measured on 200,000 synthetic entries in one directory, a third of them external: the
tree costs about 310 bytes per entry and writing adds about 95 (1,070 at the peak
before this plan, when per-file xattr sets were interned like shared ones).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence

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

_FT_BY_KIND = bytes(_FILE_TYPES.get(kind << 12, 0) for kind in range(16))

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


def _filter_bit(name: bytes) -> int:
    """The bit of ``name`` in an inode's xattr name filter (``xxh32`` of the suffix)."""
    index, suffix = xattr_prefix(name)
    return 1 << (xxh32(suffix, XATTR_FILTER_SEED + index) & 31)


_FILE_XATTR_BITS = {name: _filter_bit(name) for name in (_METACOPY, _REDIRECT)}
# The metacopy entry's size, by digest size (0: no digest, an empty value).
_METACOPY_ENTRY = {n: _entry_size((_METACOPY, bytes(4 + n if n else 0))) for n in (0, 32, 64)}
_TRUSTED, _REDIRECT_SUFFIX = xattr_prefix(_REDIRECT)
_REDIRECT_SUFFIX_LEN = len(_REDIRECT_SUFFIX)
# The head (entry header and name suffix) of a metacopy entry, by value length.
_METACOPY_HEAD = {
    n: XATTR_ENTRY.pack(len(xattr_prefix(_METACOPY)[1]), _TRUSTED, n) + xattr_prefix(_METACOPY)[1]
    for n in (0, 36, 68)
}
_FILE_HEADER_METACOPY = XATTR_IBODY_HEADER.pack(_U32 & ~_FILE_XATTR_BITS[_METACOPY], 0)
_FILE_HEADER_BOTH = XATTR_IBODY_HEADER.pack(
    _U32 & ~(_FILE_XATTR_BITS[_METACOPY] | _FILE_XATTR_BITS[_REDIRECT]), 0
)


def _check_xattr_size(size: int, pairs: Sequence[tuple[bytes, bytes]]) -> None:
    if (size - XATTR_IBODY_HEADER.size) // 4 + 1 > _U16:
        raise ErofsWriteError(
            f"{size} bytes of xattrs do not fit an EROFS inode"
            f" ({len(pairs)} xattrs, the first {pairs[0][0]!r})"
        )


def _entry(pair: tuple[bytes, bytes]) -> bytes:
    index, suffix = xattr_prefix(pair[0])
    raw = XATTR_ENTRY.pack(len(suffix), index, len(pair[1])) + suffix + pair[1]
    return raw + b"\0" * (-len(raw) % 4)


class _Dir:
    """What the plan keeps of one directory (directories only, by BFS index)."""

    __slots__ = ("first_child", "links", "name", "names")

    def __init__(self, name: bytes, names: list[bytes], first_child: int) -> None:
        self.name = name  # its own name, for messages
        self.names = names  # the image's entry names, sorted, with "." and ".."
        self.first_child = first_child  # BFS index of the first queued child
        # Names of hard-linked leaves queued under another name (rare).
        self.links: dict[bytes, Leaf] | None = None


class _Writer:
    """The plan of one image: per-inode facts in flat arrays indexed by BFS number.

    Arrays of machine integers instead of an object per inode keep the plan at about
    60 bytes per inode (plus a record per directory, holding its sorted names, and one
    per distinct xattr set), so that a tree of a million entries costs far less than
    the tree itself. Per-file xattrs (``metacopy``, ``redirect``) are never stored:
    they are computed from the file's digest when the layout and the image need them.
    """

    def __init__(self, fs: FileSystem, version: int) -> None:
        if version not in (0, 1):
            raise ErofsWriteError(f"composefs EROFS version {version} is not supported (0 or 1)")
        self.fs = fs
        self.version = version
        # Per inode, by BFS index (= i_ino).
        self.inodes: list[Inode] = []
        self.parent = array("q")  # BFS index of the parent; -1 for the root
        self.kind = bytearray()  # S_IFMT >> 12 of the image inode (whiteouts: S_IFREG)
        self.nlink = array("I")
        self.size = array("Q")  # st_size of files and symlinks
        self.xattrs: list[_Xattrs | None] = []  # the inode's own (escaped) xattrs
        self.xattr_size = array("I")  # the whole xattr area, with per-file xattrs
        self.blocks = array("I")  # data blocks
        self.tail = array("I")  # inline tail bytes
        self.tail_kind = bytearray()
        self.chunk_format = bytearray()
        self.compact = bytearray()
        self.ipad = array("H")  # zero bytes before the inode (< 4096)
        self.nid = array("Q")
        self.dirs: dict[int, _Dir] = {}
        # Hard-linked leaves only: their name count and BFS index.
        self.link_counts: dict[Leaf, int] = {}
        self.canonical: dict[Leaf, tuple[Directory, bytes]] = {}
        self.linked: dict[Leaf, int] = {}
        self.xattr_sets: dict[tuple[tuple[bytes, bytes], ...], _Xattrs] = {}
        self.stubs: dict[bytes, Leaf] = {}
        self.has_acl = False
        self.min_mtime = (0, 0)
        self.inodes_end = 0
        # Per-file xattrs: whether any payload is not the digest's path (then redirect
        # values are compared as strings), and the values more than one inode has.
        self.explicit_payloads = False
        self.shared_metacopy: dict[bytes | None, Digest | None] = {}
        self.shared_redirect: set[bytes | str] = set()
        self.shared_offsets: dict[tuple[bytes, bytes], int] = {}
        self.shared_table: list[tuple[bytes, bytes]] = []
        self.shared_size = 0
        self.n_data_blocks = 0
        self.data_start = 0
        self._plan_tree()
        self._plan_shared()
        self._plan_layout()

    # -- messages ----------------------------------------------------------------------

    def path_of(self, index: int, name: bytes | None = None) -> str:
        """The absolute path of a planned inode (or of ``name`` in directory ``index``)."""
        parts: list[bytes] = [] if name is None else [name]
        while True:
            parent = self.parent[index]
            if parent == -1:
                break
            found = self.dirs.get(index)
            parts.append(found.name if found is not None else self._leaf_name(index))
            index = parent
        return "/" + b"/".join(reversed(parts)).decode(errors="backslashreplace")

    def _leaf_name(self, index: int) -> bytes:
        parent = self.parent[index]
        for name, target in self._targets(parent):
            if target == index and name not in (b".", b".."):
                return name
        raise InternalError(f"inode {index} is not in its directory")  # pragma: no cover

    # -- directories -------------------------------------------------------------------

    def _targets(self, index: int) -> Iterator[tuple[bytes, int]]:
        """Each entry of directory ``index`` as the image lists it, with its BFS index.

        Children were queued in this same order, so the queued ones (directories, stubs,
        leaves at their canonical name) take consecutive indexes from ``first_child``;
        other names of a hard-linked leaf point at its canonical inode.
        """
        record = self.dirs[index]
        parent = self.parent[index]
        links = record.links
        linked = self.linked
        next_child = record.first_child
        for name in record.names:
            if name == b".":
                yield name, index
            elif name == b"..":
                yield name, index if parent == -1 else parent
            elif links is not None and name in links:
                yield name, linked[links[name]]
            else:
                yield name, next_child
                next_child += 1

    # -- pass 1: rewrites and BFS numbering --------------------------------------------

    def _scan(self) -> set[int]:
        """Name counts and canonical names of hard-linked leaves; the directories (by
        id) holding the canonical name of a user whiteout.

        A leaf's canonical name is its first in depth-first, byte-sorted order (the
        dumpfile's order). Only leaves named more than once are remembered past this
        pass; finding them takes one set of all leaves, dropped at the end.
        """
        root = self.fs.root
        seen: set[Leaf] = set()
        counts: dict[Leaf, int] = {}
        whiteouts: list[tuple[Directory, Leaf]] = []
        seen_dirs = {id(root)}
        stack = [root]
        while stack:
            directory = stack.pop()
            for name, child in directory.entries.items():
                if isinstance(child, Directory):
                    if id(child) in seen_dirs:
                        raise ErofsWriteError(
                            f"directory {name!r} appears twice in the tree (a directory"
                            " cannot be hard-linked, and a tree has no cycles)"
                        )
                    seen_dirs.add(id(child))
                    stack.append(child)
                    continue
                content = child.content
                if type(content) is ExternalFile:
                    if not content.default_payload:
                        self.explicit_payloads = True
                elif isinstance(content, CharDevice) and content.rdev == 0:
                    whiteouts.append((directory, child))  # every name: see below
                elif isinstance(content, ExternalFile) and not content.default_payload:
                    self.explicit_payloads = True
                if child in seen:
                    counts[child] = counts.get(child, 1) + 1
                else:
                    seen.add(child)
        del seen, seen_dirs
        self.link_counts = counts
        if not counts:
            return {id(directory) for directory, _leaf in whiteouts}
        # The first name of each hard-linked leaf: the smallest path, as a tuple of
        # components (tuple order is depth-first pre-order with sorted children).
        best: dict[Leaf, tuple[tuple[bytes, ...], Directory, bytes]] = {}
        paths: list[tuple[Directory, tuple[bytes, ...]]] = [(root, ())]
        while paths:
            directory, path = paths.pop()
            for name, child in directory.entries.items():
                if isinstance(child, Directory):
                    paths.append((child, (*path, name)))
                elif child in counts:
                    here = (*path, name)
                    found = best.get(child)
                    if found is None or here < found[0]:
                        best[child] = (here, directory, name)
        self.canonical = {leaf: (where[1], where[2]) for leaf, where in best.items()}
        return {
            id(directory)
            for directory, leaf in whiteouts
            if leaf not in counts or self.canonical[leaf][0] is directory
        }

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
        whiteout_dirs = self._scan()
        link_counts = self.link_counts
        canonical = self.canonical
        stubs = self.stubs = {
            name: _stub(root.stat) for name in _STUB_NAMES if name not in root.entries
        }
        stub_set = set(stubs.values())
        inodes = self.inodes
        parents = self.parent
        kinds = self.kind
        nlinks = self.nlink
        sizes = self.size
        xattr_list = self.xattrs
        blocks_list = self.blocks
        tails = self.tail
        tail_kinds = self.tail_kind
        chunk_formats = self.chunk_format
        intern = self._intern
        explicit = self.explicit_payloads
        metacopy_seen: set[bytes | None] = set()
        metacopy_dup: dict[bytes | None, Digest | None] = {}
        redirect_seen: set[bytes | str] = set()
        redirect_dup: set[bytes | str] = set()
        dir_kind = S_IFDIR >> 12
        reg_kind = S_IFREG >> 12
        lnk_kind = S_IFLNK >> 12

        min_mtime = (root.stat.mtime, root.stat.mtime_nsec)

        def check_stat(stat: Stat, index: int, name: bytes | None) -> None:
            nonlocal min_mtime
            if (stat.mtime, stat.mtime_nsec) < min_mtime:
                min_mtime = (stat.mtime, stat.mtime_nsec)
            if stat.uid > _U32 or stat.gid > _U32 or not 0 <= stat.mtime_nsec <= _U32:
                raise ErofsWriteError(
                    f"{self.path_of(index, name)}: uid, gid or mtime_nsec out of range"
                    f" ({stat.uid}, {stat.gid}, {stat.mtime_nsec})"
                )

        def add_dir(directory: Directory, parent: int) -> None:
            stat = directory.stat
            xattrs = _escape_xattrs(stat.xattrs) if stat.xattrs else {}
            if id(directory) in whiteout_dirs:
                xattrs.update(_WHITEOUTS_DIR_XATTRS)
                if self.version >= 1:
                    xattrs.update(_OPAQUE_DIR_XATTRS)
            if parent == -1:
                xattrs[_OPAQUE] = b"y"
            inodes.append(directory)
            parents.append(parent)
            kinds.append(dir_kind)
            nlinks.append(2)  # + subdirectories, counted when it is numbered
            sizes.append(0)
            xattr_list.append(intern(xattrs) if xattrs else None)
            blocks_list.append(0)
            tails.append(0)
            tail_kinds.append(_T_DIR)
            chunk_formats.append(0)

        add_dir(root, -1)
        check_stat(root.stat, 0, None)
        self.dirs[0] = _Dir(b"", [], 0)
        index = 0  # the directory being numbered
        dir_queue = [0]
        dir_names: dict[int, bytes] = {0: b""}
        position = 0
        while position < len(dir_queue):
            index = dir_queue[position]
            position += 1
            directory = inodes[index]
            assert isinstance(directory, Directory)
            entries = directory.entries
            if b"." in entries or b".." in entries:
                raise ErofsWriteError(f"{self.path_of(index)}: an entry named '.' or '..'")
            names = [*entries, b".", b".."]
            if index == 0:
                names.extend(stubs)
            names.sort()
            record = self.dirs[index] = _Dir(dir_names.pop(index), names, len(inodes))
            subdirs = 0
            for name in names:
                child = entries.get(name)
                if child is None:
                    if name == b"." or name == b"..":
                        continue
                    child = stubs[name]
                stat = child.stat
                if isinstance(child, Directory):
                    subdirs += 1
                    check_stat(stat, index, name)
                    dir_queue.append(len(inodes))
                    dir_names[len(inodes)] = name
                    add_dir(child, index)
                    continue
                count = 1
                if link_counts and child in link_counts:
                    where = canonical[child]
                    if where[0] is not directory or where[1] != name:
                        if record.links is None:
                            record.links = {}
                        record.links[name] = child
                        continue
                    count = link_counts[child]
                    if count > _U32:
                        raise ErofsWriteError(f"{self.path_of(index, name)}: {count} links")
                    self.linked[child] = len(inodes)
                check_stat(stat, index, name)
                # The leaf (C's compute_erofs_inode_size).
                content = child.content
                ctype = type(content)
                xattrs = _escape_xattrs(stat.xattrs) if stat.xattrs else None
                blocks = tail = chunk_format = 0
                tail_kind = _T_NONE
                if ctype is InlineFile:
                    assert isinstance(content, InlineFile)
                    kind = reg_kind
                    size = len(content)
                    if size:
                        blocks, tail = divmod(size, BLOCK_SIZE)
                        if tail > BLOCK_SIZE // 2:
                            blocks += 1
                            tail = 0
                        tail_kind = _T_DATA
                elif ctype is ExternalFile:
                    assert isinstance(content, ExternalFile)
                    kind = reg_kind
                    size = content.size
                    if size > 0:
                        digest = content.digest
                        key = digest.raw if digest is not None else None
                        if key in metacopy_seen:
                            metacopy_dup[key] = digest
                        else:
                            metacopy_seen.add(key)
                        if explicit and content.payload:
                            payload = content.payload
                            if payload in redirect_seen:
                                redirect_dup.add(payload)
                            else:
                                redirect_seen.add(payload)
                        bits = chunk_bits(size)
                        chunks = -(-size // (1 << bits))
                        if chunks > MAX_NONINLINE_CHUNKS or size > _U64:
                            raise ErofsWriteError(
                                f"{self.path_of(index, name)}: a file of {size} bytes is too"
                                f" big for a composefs image ({chunks} chunks of 2**{bits}"
                                f" bytes, at most {MAX_NONINLINE_CHUNKS})"
                            )
                        chunk_format = bits - 12
                        tail = 4 * chunks
                        tail_kind = _T_CHUNKS
                else:
                    assert isinstance(child, Leaf)
                    kind = child.file_type >> 12
                    size = 0
                    if kind == lnk_kind:
                        assert isinstance(content, Symlink)
                        size = tail = len(content.target)
                        tail_kind = _T_DATA
                    elif (
                        isinstance(content, CharDevice)
                        and content.rdev == 0
                        and child not in stub_set
                    ):
                        # A user whiteout: an empty regular file with escaped whiteout
                        # xattrs (the root stubs stay char devices).
                        kind = reg_kind
                        xattrs = xattrs or {}
                        xattrs.update(_WHITEOUT_XATTRS)
                inodes.append(child)
                parents.append(index)
                kinds.append(kind)
                nlinks.append(count)
                sizes.append(size)
                xattr_list.append(intern(xattrs) if xattrs else None)
                blocks_list.append(blocks)
                tails.append(tail)
                tail_kinds.append(tail_kind)
                chunk_formats.append(chunk_format)
            nlinks[index] = 2 + subdirs
        self.min_mtime = min_mtime
        if len(inodes) > 1 << 62:  # pragma: no cover
            raise ErofsWriteError("too many inodes")
        self.shared_metacopy = metacopy_dup
        if explicit:
            self.shared_redirect = redirect_dup
        else:  # every redirect is its digest's path: shared when the digest is
            self.shared_redirect = {key for key in metacopy_dup if key is not None}

    # -- per-file xattrs ---------------------------------------------------------------

    def _file_pairs(self, content: ExternalFile) -> list[tuple[bytes, bytes]]:
        """The ``metacopy`` and ``redirect`` xattrs of an external file (size > 0)."""
        pairs = [(_METACOPY, metacopy_xattr(content.digest))]
        payload = content.payload
        if payload:
            pairs.append((_REDIRECT, b"/" + payload.encode()))
        return pairs

    def _file_shared(self, content: ExternalFile) -> bool:
        """Whether either per-file xattr of ``content`` is in the shared table."""
        digest = content.digest
        key = digest.raw if digest is not None else None
        if key in self.shared_metacopy:
            return True
        if self.explicit_payloads:
            return bool(content.payload) and content.payload in self.shared_redirect
        return key in self.shared_redirect

    def _split(
        self, pairs: Iterable[tuple[bytes, bytes]]
    ) -> tuple[list[int], list[tuple[bytes, bytes]]]:
        """Shared-table offsets (at most 128, in name order) and inline pairs."""
        refs: list[int] = []
        inline: list[tuple[bytes, bytes]] = []
        offsets = self.shared_offsets
        for pair in pairs:
            where = offsets.get(pair)
            if where is not None and len(refs) < MAX_SHARED_XATTRS:
                refs.append(where)
            else:
                inline.append(pair)
        return refs, inline

    def _file_xattrs(
        self, xs: _Xattrs | None, content: ExternalFile
    ) -> tuple[int, list[int], list[tuple[bytes, bytes]]]:
        """An external file's whole xattr set: filter, shared refs, inline pairs."""
        pairs = self._file_pairs(content)
        bits = 0
        for key, _value in pairs:
            bits |= _FILE_XATTR_BITS[key]
        if xs is not None:
            pairs = sorted([*xs.pairs, *pairs])
            bits |= ~xs.filter & _U32
        refs, inline = self._split(pairs)
        return _U32 & ~bits, refs, inline

    def _file_body(self, xs: _Xattrs | None, content: ExternalFile) -> bytes:
        """An external file's xattr area (header, refs, entries)."""
        if xs is None and not self._file_shared(content):  # the usual case: 2 entries
            digest = content.digest
            meta = metacopy_xattr(digest)
            parts = [b"", _METACOPY_HEAD[len(meta)], meta, bytes(-len(meta) % 4)]
            if content.default_payload:
                payload = b"/" + digest.object_path().encode() if digest is not None else b""
            else:
                payload = b"/" + content.payload.encode() if content.payload else b""
            if payload:
                parts[0] = _FILE_HEADER_BOTH
                parts.append(XATTR_ENTRY.pack(_REDIRECT_SUFFIX_LEN, _TRUSTED, len(payload)))
                parts.append(_REDIRECT_SUFFIX)
                parts.append(payload)
                parts.append(bytes(-(_REDIRECT_SUFFIX_LEN + len(payload)) % 4))
            else:
                parts[0] = _FILE_HEADER_METACOPY
            return b"".join(parts)
        return self._body(*self._file_xattrs(xs, content))

    def _file_xattr_size(self, xs: _Xattrs | None, content: ExternalFile) -> int:
        if xs is None and not self._file_shared(content):  # the usual case
            digest = content.digest
            size = _METACOPY_ENTRY[0 if digest is None else len(digest.raw)]
            payload_len = 0
            if content.default_payload:
                if digest is not None:
                    payload_len = 2 * len(digest.raw) + 1
            else:
                payload_len = len(content.payload.encode()) if content.payload else 0
            if payload_len:
                size += (XATTR_ENTRY.size + _REDIRECT_SUFFIX_LEN + 1 + payload_len + 3) & ~3
            return XATTR_IBODY_HEADER.size + size
        _filter, refs, inline = self._file_xattrs(xs, content)
        return XATTR_IBODY_HEADER.size + 4 * len(refs) + sum(_entry_size(p) for p in inline)

    # -- pass 2: shared xattrs ---------------------------------------------------------

    def _plan_shared(self) -> None:
        counts: dict[tuple[bytes, bytes], int] = {}
        for xs in self.xattr_sets.values():
            for pair in xs.pairs:
                counts[pair] = counts.get(pair, 0) + xs.users
        shared = [pair for pair, count in counts.items() if count > 1]
        del counts
        for digest in self.shared_metacopy.values():
            shared.append((_METACOPY, metacopy_xattr(digest)))
        for key in self.shared_redirect:
            if isinstance(key, str):
                shared.append((_REDIRECT, b"/" + key.encode()))
            else:
                digest = self.shared_metacopy[key]
                assert digest is not None
                shared.append((_REDIRECT, b"/" + digest.object_path().encode()))
        # Descending by name, then value length, then value bytes (C's xattrs_ht_sort).
        shared.sort(key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
        offsets = self.shared_offsets
        offset = 0
        for pair in shared:
            offsets[pair] = offset
            offset += _entry_size(pair)
        self.shared_table = shared
        self.shared_size = offset
        filter_bits: dict[bytes, int] = {}
        for xs in self.xattr_sets.values():
            if offsets:
                refs, inline = self._split(xs.pairs)
                xs.refs = tuple(refs)
                xs.inline = tuple(inline)
            xs.size = (
                XATTR_IBODY_HEADER.size
                + 4 * len(xs.refs)
                + sum(_entry_size(pair) for pair in xs.inline)
            )
            _check_xattr_size(xs.size, xs.pairs)
            bits = 0
            for key, _value in xs.pairs:
                bit = filter_bits.get(key)
                if bit is None:
                    bit = filter_bits[key] = _filter_bit(key)
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
        tail_kinds = self.tail_kind
        sizes = self.size
        nlinks = self.nlink
        xattrs = self.xattrs
        xattr_sizes = self.xattr_size
        compacts = self.compact
        ipads = self.ipad
        nids = self.nid
        dir_kind = S_IFDIR >> 12
        last_stat: Stat | None = None
        stat_compact = False
        for index, inode in enumerate(self.inodes):
            kind = kinds[index]
            if kind == dir_kind:
                self._plan_dir(index)
                size = blocks[index] * BLOCK_SIZE + tails[index]
            else:
                size = sizes[index]
            stat = inode.stat
            if stat is not last_stat:  # stats are often shared: check each once
                last_stat = stat
                stat_compact = (
                    stat.mtime == min_mtime[0]
                    and stat.mtime_nsec == min_mtime[1]
                    and stat.uid <= _U16
                    and stat.gid <= _U16
                )
            compact = stat_compact and nlinks[index] <= _U16 and size <= _U32
            compacts.append(compact)
            inode_size = COMPACT_INODE.size if compact else EXTENDED_INODE.size
            xs = xattrs[index]
            if tail_kinds[index] == _T_CHUNKS:  # an external file: per-file xattrs
                assert isinstance(inode, Leaf)
                assert isinstance(inode.content, ExternalFile)
                xattr_size = self._file_xattr_size(xs, inode.content)
                if xs is not None:
                    _check_xattr_size(xattr_size, xs.pairs)
            else:
                xattr_size = xs.size if xs is not None else 0
            xattr_sizes.append(xattr_size)
            start = pos
            pos = (pos + SLOT_SIZE - 1) & ~(SLOT_SIZE - 1)
            if tails[index]:
                pos += self._tail_padding(index, pos, inode_size + xattr_size)
            ipads.append(pos - start)
            nids.append(pos // SLOT_SIZE)
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
        dirent = DIRENT.size
        for name in self.dirs[index].names:
            length = dirent + len(name)
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
        if not tail:
            return 0
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

    def _dir_pieces(self, index: int, *, blocks_wanted: bool) -> Iterator[bytes]:
        """The directory's full blocks (each padded to 4096), or else its inline tail.

        One block is built at a time: a directory of a million entries costs a block.
        """
        n_blocks = self.blocks[index]
        made = 0
        targets: list[int] = []
        names: list[bytes] = []
        used = 0
        dirent = DIRENT.size
        for name, target in self._targets(index):
            length = dirent + len(name)
            if used + length > BLOCK_SIZE:
                if blocks_wanted:
                    yield self._dirents(targets, names).ljust(BLOCK_SIZE, b"\0")
                made += 1
                targets.clear()
                names.clear()
                used = 0
            used += length
            targets.append(target)
            names.append(name)
        if made < n_blocks:  # the last piece went to a block too
            if blocks_wanted:
                yield self._dirents(targets, names).ljust(BLOCK_SIZE, b"\0")
        elif not blocks_wanted and names:
            yield self._dirents(targets, names)

    def _dirents(self, targets: list[int], names: list[bytes]) -> bytes:
        nid = self.nid
        kind = self.kind
        pack = DIRENT.pack
        heads = []
        nameoff = DIRENT.size * len(names)
        for target, name in zip(targets, names, strict=True):
            heads.append(pack(nid[target], nameoff, _FT_BY_KIND[kind[target]]))
            nameoff += len(name)
        return b"".join(heads) + b"".join(names)

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
        xattr_size = self.xattr_size[index]
        icount = (xattr_size - XATTR_IBODY_HEADER.size) // 4 + 1 if xattr_size else 0
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
            body = self._body(xs.filter, xs.refs, xs.inline)
            if xs.users > 1:
                xs.body = body
        return body

    def _body(
        self, filter_: int, refs: Sequence[int], inline: Sequence[tuple[bytes, bytes]]
    ) -> bytes:
        refs_base = self.inodes_end % BLOCK_SIZE
        parts = [XATTR_IBODY_HEADER.pack(filter_, len(refs))]
        parts.extend(((refs_base + offset) >> 2).to_bytes(4, "little") for offset in refs)
        parts.extend(_entry(pair) for pair in inline)
        return b"".join(parts)

    def _inode_tail(self, index: int) -> bytes:
        tail = self.tail[index]
        tail_kind = self.tail_kind[index]
        if tail_kind == _T_DIR:
            return b"".join(self._dir_pieces(index, blocks_wanted=False))
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
        return content  # an InlineFile is its bytes

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
        inodes = self.inodes
        blocks = self.blocks
        ipad = self.ipad
        tails = self.tail
        tail_kinds = self.tail_kind
        xattrs = self.xattrs
        for index in range(len(inodes)):
            blkaddr = 0
            if blocks[index]:
                blkaddr = current_end // BLOCK_SIZE
                current_end += blocks[index] * BLOCK_SIZE
            if ipad[index]:
                buf += bytes(ipad[index])
            buf += self._inode(index, blkaddr)
            xs = xattrs[index]
            if tail_kinds[index] == _T_CHUNKS:
                content = inodes[index].content  # type: ignore[union-attr]
                assert isinstance(content, ExternalFile)
                buf += self._file_body(xs, content)
            elif xs is not None:
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
        for index in range(len(inodes)):
            n_blocks = blocks[index]
            if not n_blocks:
                continue
            if self.kind[index] == dir_kind:
                for block in self._dir_pieces(index, blocks_wanted=True):
                    buf += block
                    if len(buf) >= _FLUSH:
                        yield bytes(buf)
                        buf.clear()
            elif tail_kinds[index] == _T_CHUNKS:
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
