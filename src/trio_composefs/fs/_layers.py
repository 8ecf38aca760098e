"""Layers → tree: apply OCI layer entries in order, as composefs-rs does.

Pure (layer L0: no ``os``, no trio). The semantics are composefs-rs's
``composefs-oci/src/image.rs`` (``process_entry``, ``create_filesystem``) and
``generic_tree.rs`` (``transform_for_oci``), so that the same layers give the same tree
and so the same image ID:

* The root starts with mode 0, owner 0:0, mtime 0. An entry for ``/`` must be a
  directory and replaces the root's whole stat (``transform_for_oci`` overwrites it).
* A **whiteout** ``DIR/.wh.NAME`` removes ``DIR/NAME``; ``DIR/.wh..wh..opq`` empties
  ``DIR``. Both act **immediately**, also on entries added earlier in the same layer
  (upstream departs from the OCI ordering rule here; issue #8). Removing a name that
  does not exist does nothing. Any other ``.wh.``-prefixed name removes the rest of its
  name (``.wh..wh.plnk`` removes ``.wh.plnk``), exactly as upstream.
* A **hard link** shares the target's :class:`Leaf` (one inode, ``nlink`` counted). The
  target must already exist and must not be a directory; the link's own metadata is
  ignored. The target is looked up before anything else, even for whiteout names.
* **Merging**: a directory over a directory replaces only the stat (mode, owner, mtime
  and xattrs) and keeps the children; anything else replaces the entry (a file over a
  directory drops the whole subtree).
* Regular files of at most 64 bytes are :class:`InlineFile`; larger ones, stored as
  objects, are :class:`ExternalFile` ``(size, digest)``. Upstream's consistency check is
  kept: inline content over 64 bytes or an external one of 64 or less is an error.
* **Shared metadata**: inodes whose metadata (mode, owner, mtime, xattrs) is equal
  share one :class:`Stat` object (and entries without xattrs one empty xattr dict), and
  empty files one :class:`InlineFile`: a layer of a million files costs a few hundred
  bytes per entry, not a kilobyte. So a tree from this module must not be changed by
  assigning to a stat's fields or its xattr dict: give the inode a new ``Stat``
  (``inode.stat = stat.copy()`` first), as :func:`transform_for_oci` does. The root's
  stat is never shared.
* Names are bytes: ``path.encode("utf-8", "surrogateescape")`` gives back the archive's
  raw bytes. Permission bits are ``mode & 0o7777``. Upstream keeps the raw header
  mode and ORs the type into it when writing: the same result whenever the mode
  field's type bits are absent or match the entry type (old Go ``archive/tar`` writes
  matching ones); a header whose type bits contradict its type gives upstream a
  mangled file type, and us the entry's type.

Where upstream refuses a layer and this module accepts it (documented choice):

* **Missing parent directories** (upstream issue #132: upstream errors with "not
  found"). They are created as directories with mode ``0755``, owner ``0:0``, no
  xattrs, and the mtime (seconds and nanoseconds) of the entry that needed them. GNU
  tar, umoci and containers-storage (podman) all create such parents as ``0755``
  ``root:root`` (umoci and GNU tar: ``0777`` less the usual ``022`` umask), with the
  extraction time as mtime, which is not reproducible; the entry's own mtime is the
  deterministic stand-in (the directory changed when that entry was added). A later
  entry for the directory itself replaces that stat, as for any directory over a
  directory. A whiteout (or opaque marker) whose parent is missing removes nothing and
  creates nothing, as umoci does.
* A ``/run`` that is not a directory is left alone by :func:`transform_for_oci`
  (upstream fails with "not a directory").

Hostile input fails with :class:`~trio_composefs._errors.TreeError` naming the entry
and the layer, never a traceback or recursion: a ``..`` component, a NUL byte, a name
over 255 bytes (``NAME_MAX``), a path through a symlink or another non-directory, a
path deeper than :data:`MAX_DEPTH` components, a hard link to a missing target or a
directory, a root entry that is not a directory.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._errors import TreeError
from ..formats._chunks import ExternalChunk
from ..formats._tarentries import EntryType, TarEntry
from ._tree import (
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    Fifo,
    FileSystem,
    InlineFile,
    Inode,
    Leaf,
    LeafContent,
    Stat,
    Symlink,
)

__all__ = [
    "CONTAINER_XATTR_ALLOWLIST",
    "IMPLICIT_DIR_MODE",
    "INLINE_MAX",
    "MAX_DEPTH",
    "NAME_MAX",
    "TreeBuilder",
    "transform_for_oci",
    "tree_from_layers",
]

#: Files of at most this many bytes are stored in the image (``INLINE_CONTENT_MAX_V0``).
INLINE_MAX = 64
#: The longest name a directory entry can have (Linux ``NAME_MAX``).
NAME_MAX = 255
#: The deepest path accepted, in components: a path of ``PATH_MAX`` (4096) bytes has at
#: most 2048 (``a/a/…``); deeper trees cannot be addressed by any tool in one call.
MAX_DEPTH = 2048
#: Permission bits of a directory created for a missing parent (see the module doc).
NO_USR_ROOT_MODE = 0o755
"""The root's mode in an image that has no ``/usr`` and no root entry."""
IMPLICIT_DIR_MODE = 0o755
#: The xattrs :func:`transform_for_oci` keeps by default (upstream's allowlist).
CONTAINER_XATTR_ALLOWLIST = frozenset({b"security.capability"})

#: How many distinct stats :class:`TreeBuilder` remembers for sharing; past this it
#: starts over (layers list a directory's entries together, and those mostly share
#: their metadata, so a small memory catches almost every repeat).
STAT_CACHE_SIZE = 16384
_EMPTY_FILE = InlineFile(b"")

_WHITEOUT = b".wh."
_OPAQUE = b".wh..opq"  # after the ".wh." prefix: the name is ".wh..wh..opq"


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class TreeBuilder:
    """Applies layers, entry by entry, to one :class:`FileSystem`.

    Usage: ``builder.add_layer(entries, name=diff_id)`` for each layer in config order,
    then ``transform_for_oci(builder.filesystem)``. :func:`tree_from_layers` does both.
    """

    def __init__(self) -> None:
        self.filesystem = FileSystem(Directory(Stat(0)))
        self._layers = 0
        # The parent directory of the last entry, by its raw path: layers list a
        # directory's entries together, so most lookups are this one. Any removal or
        # replacement of a directory forgets it.
        self._cached_key: bytes | None = None
        self._cached_dir = self.filesystem.root
        # Shared stats, by (mode, uid, gid, mtime, mtime_nsec[, xattr items]).
        self._stats: dict[tuple[object, ...], Stat] = {}
        self._no_xattrs: dict[bytes, bytes] = {}  # the one empty dict of shared stats

    def add_layer(self, entries: Iterable[TarEntry], *, name: str | None = None) -> None:
        """Apply every entry of one layer, in order.

        ``name`` labels errors (a diff_id); the default is ``"layer N"``, counting from 1.
        """
        self._layers += 1
        label = name if name is not None else f"layer {self._layers}"
        for entry in entries:
            self.add_entry(entry, layer=label)

    def add_entry(self, entry: TarEntry, *, layer: str | None = None) -> None:
        """Apply one entry (``process_entry`` upstream).

        Raises:
            TreeError: the entry cannot be applied (see the module doc).
        """
        raw = _encode(entry.path)
        parent_key, _, name = raw.rpartition(b"/")
        parent: Directory | None
        if (
            parent_key == self._cached_key
            and name
            and len(name) <= NAME_MAX
            and name not in (b".", b"..")
            and b"\0" not in name
        ):
            parts = None  # fast path: same directory as the last entry
        else:
            parts = self._components(raw, entry.path, layer)
            if not parts:
                self._set_root(entry, layer)
                return
            name = parts[-1]

        inode: Inode
        kind = entry.type
        if kind is EntryType.HARDLINK:
            inode = self._link_target(entry, layer)
        else:
            # _stat(), shared with every earlier entry of the same metadata.
            xattrs = entry.xattrs
            mode = entry.mode & 0o7777
            if xattrs:
                key: tuple[object, ...] = (
                    mode,
                    entry.uid,
                    entry.gid,
                    entry.mtime,
                    entry.mtime_nsec,
                    *xattrs.items(),
                )
            else:
                key = (mode, entry.uid, entry.gid, entry.mtime, entry.mtime_nsec)
            stat = self._stats.get(key)
            if stat is None:
                if len(self._stats) >= STAT_CACHE_SIZE:
                    self._stats.clear()
                stat = _stat(entry)
                if not xattrs:
                    stat.xattrs = self._no_xattrs
                self._stats[key] = stat
            if kind is EntryType.DIRECTORY:
                inode = Directory(stat)
            else:
                inode = Leaf(stat, _content(entry, layer))

        whiteout = name.startswith(_WHITEOUT)
        if parts is None:
            parent = self._cached_dir
        else:
            parent = self._parent(entry, parts, layer, create=not whiteout)
            if parent is None:
                return  # a whiteout in a directory that does not exist: nothing to remove
            normal = len(raw) == len(parts) + sum(map(len, parts)) and raw.startswith(b"/")
            self._cached_key = parent_key if normal else None
            self._cached_dir = parent
        if whiteout:
            self._cached_key = None
            rest = name[len(_WHITEOUT) :]
            if rest == _OPAQUE:
                parent.entries.clear()
            else:
                parent.entries.pop(rest, None)
            return
        old = parent.entries.get(name)
        if isinstance(old, Directory):
            if isinstance(inode, Directory):
                old.stat = inode.stat
                return
            self._cached_key = None  # a directory (maybe the cached one's parent) goes
        parent.entries[name] = inode

    def _set_root(self, entry: TarEntry, layer: str | None) -> None:
        if entry.type is not EntryType.DIRECTORY:
            raise TreeError(
                f"the root must be a directory, not a {entry.type.value}",
                path=entry.path,
                layer=layer,
            )
        self.filesystem.root.stat = _stat(entry)

    @staticmethod
    def _components(raw: bytes, entry: str, layer: str | None) -> list[bytes]:
        parts = [part for part in raw.split(b"/") if part and part != b"."]
        if len(parts) > MAX_DEPTH:
            raise TreeError(
                f"path is {len(parts)} components deep (at most {MAX_DEPTH})",
                path=entry,
                layer=layer,
            )
        for part in parts:
            if part == b"..":
                raise TreeError("path with a '..' component", path=entry, layer=layer)
            if len(part) > NAME_MAX:
                raise TreeError(
                    f"a name of {len(part)} bytes (at most {NAME_MAX})", path=entry, layer=layer
                )
            if b"\0" in part:
                raise TreeError("a name with a NUL byte", path=entry, layer=layer)
        return parts

    def _parent(
        self, entry: TarEntry, parts: list[bytes], layer: str | None, *, create: bool
    ) -> Directory | None:
        """The directory that holds ``parts[-1]``, creating missing ones if ``create``."""
        directory = self.filesystem.root
        for depth, name in enumerate(parts[:-1]):
            child = directory.entries.get(name)
            if child is None:
                if not create:
                    return None
                child = Directory(Stat(IMPLICIT_DIR_MODE, 0, 0, entry.mtime, entry.mtime_nsec))
                directory.entries[name] = child
            elif not isinstance(child, Directory):
                raise TreeError(
                    f"path goes through {_describe(parts[: depth + 1], child)}",
                    path=entry.path,
                    layer=layer,
                )
            directory = child
        return directory

    def _link_target(self, entry: TarEntry, layer: str | None) -> Leaf:
        target = entry.link_target
        if target is None:
            raise TreeError("hard link without a target", path=entry.path, layer=layer)
        parts = self._components(_encode(target), entry.path, layer)
        what = f"hard link to {target!r}"
        if not parts:
            raise TreeError(f"{what}: the target is a directory", path=entry.path, layer=layer)
        directory = self.filesystem.root
        for depth, name in enumerate(parts):
            child = directory.entries.get(name)
            if child is None:
                raise TreeError(f"{what}: the target does not exist", path=entry.path, layer=layer)
            if depth == len(parts) - 1:
                if isinstance(child, Directory):
                    raise TreeError(
                        f"{what}: the target is a directory", path=entry.path, layer=layer
                    )
                return child
            if not isinstance(child, Directory):
                through = _describe(parts[: depth + 1], child)
                raise TreeError(
                    f"{what}: the target's path goes through {through}",
                    path=entry.path,
                    layer=layer,
                )
            directory = child
        raise AssertionError("unreachable")  # pragma: no cover


def _describe(parts: list[bytes], inode: Leaf) -> str:
    kind = "a symlink" if isinstance(inode.content, Symlink) else "a non-directory"
    path = "/" + b"/".join(parts).decode("utf-8", "surrogateescape")
    return f"{kind}, {path!r}"


def _stat(entry: TarEntry) -> Stat:
    xattrs = entry.xattrs
    return Stat(
        entry.mode & 0o7777,
        entry.uid,
        entry.gid,
        entry.mtime,
        entry.mtime_nsec,
        {_encode(name): value for name, value in xattrs.items()} if xattrs else {},
    )


def _content(entry: TarEntry, layer: str | None) -> LeafContent:
    kind = entry.type
    if kind is EntryType.REGULAR:
        content = entry.content
        if isinstance(content, ExternalChunk):
            if content.size <= INLINE_MAX:
                raise TreeError(
                    f"a file of {content.size} bytes stored as an object"
                    f" (at most {INLINE_MAX} are stored inline)",
                    path=entry.path,
                    layer=layer,
                )
            return ExternalFile(content.size, content.digest)
        if len(content) > INLINE_MAX:
            raise TreeError(
                f"a file of {len(content)} bytes stored inline (at most {INLINE_MAX})",
                path=entry.path,
                layer=layer,
            )
        return InlineFile(content) if content else _EMPTY_FILE
    if kind is EntryType.SYMLINK:
        return Symlink(_encode(entry.link_target or ""))
    if kind is EntryType.CHAR:
        return CharDevice(entry.rdev)
    if kind is EntryType.BLOCK:
        return BlockDevice(entry.rdev)
    if kind is EntryType.FIFO:
        return Fifo()
    raise TreeError(f"unsupported entry type {kind.value}", path=entry.path, layer=layer)


def transform_for_oci(fs: FileSystem, *, keep_user_xattrs: bool = False) -> None:
    """Upstream's ``transform_for_oci``, in place, in its order.

    1. The root takes ``/usr``'s mode, owner, mtime (seconds and nanoseconds) and xattrs
       (layers rarely carry a root entry and runtimes ignore it).
    2. If ``/run`` is a directory, it is emptied and takes ``/usr``'s mtime (seconds
       and nanoseconds). A ``/run`` that is not a directory is left alone (upstream
       fails).
    3. Xattrs are filtered on every inode: only ``security.capability`` stays, and
       ``user.*`` too with ``keep_user_xattrs`` (upstream's ``AllowlistOnly`` and
       ``KeepUserXattrs``); host labels such as ``security.selinux`` go.
    4. Orphaned leaves are dropped (upstream ``compact()``): in this model a leaf lives
       only while a directory names it, so there is nothing left to do.

    Where upstream fails, we go on (documented deviation, so that small images and
    images without ``/usr`` still get a filesystem; IDs are equal wherever upstream
    accepts the image): without a ``/usr`` directory, steps 1 and 2 are skipped, the
    root keeps the metadata its layers gave it, and a root that no layer described
    (mode 0) gets mode 0755 (owner 0:0, mtime 0), as Docker extracts it.
    """
    root = fs.root
    usr = root.entries.get(b"usr")
    if isinstance(usr, Directory):
        src = usr.stat
        root.stat = Stat(src.mode, src.uid, src.gid, src.mtime, src.mtime_nsec, dict(src.xattrs))
        run = root.entries.get(b"run")
        if isinstance(run, Directory):
            run.entries.clear()
            run.stat = run.stat.copy()  # it may be shared (see the module doc)
            run.stat.mtime = src.mtime
            run.stat.mtime_nsec = src.mtime_nsec
    elif root.stat.mode == 0:
        # No /usr (upstream refuses the image): the root keeps what its layers gave
        # it; a root no layer described gets Docker's default, 0755 root:root.
        root.stat.mode = NO_USR_ROOT_MODE

    def keep(name: bytes) -> bool:
        return name in CONTAINER_XATTR_ALLOWLIST or (keep_user_xattrs and name.startswith(b"user."))

    # Stats are shared (see the module doc): each one is filtered once, into a new
    # Stat given to every inode that had it (the old one is kept alive meanwhile, so
    # that its id is not reused).
    filtered: dict[int, tuple[Stat, Stat]] = {}

    def filter_stat(inode: Inode) -> None:
        stat = inode.stat
        done = filtered.get(id(stat))
        if done is None:
            new = stat
            if not all(keep(name) for name in stat.xattrs):
                new = stat.copy()
                new.xattrs = {k: v for k, v in stat.xattrs.items() if keep(k)}
            done = filtered[id(stat)] = (stat, new)
        inode.stat = done[1]

    stack = [root]
    while stack:
        directory = stack.pop()
        if directory.stat.xattrs:
            filter_stat(directory)
        for inode in directory.entries.values():
            if isinstance(inode, Directory):
                stack.append(inode)
            elif inode.stat.xattrs:
                filter_stat(inode)


def tree_from_layers(
    layers: Iterable[Iterable[TarEntry]], *, keep_user_xattrs: bool = False
) -> FileSystem:
    """The tree of an image: every layer in config order, then :func:`transform_for_oci`.

    Errors name layers ``"layer N"`` (from 1); use :class:`TreeBuilder` to name them by
    diff_id.
    """
    builder = TreeBuilder()
    for entries in layers:
        builder.add_layer(entries)
    transform_for_oci(builder.filesystem, keep_user_xattrs=keep_user_xattrs)
    return builder.filesystem
