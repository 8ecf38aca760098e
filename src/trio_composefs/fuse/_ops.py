"""The pyfuse3 request handlers: a read-only composefs tree, verified objects (L2).

Every handler answers from the table (:class:`~._image_table.ImageTable` or
:class:`~._inodes.InodeTable`; no I/O) except ``open`` of an external file (open the
object and check it, off the event loop: see :mod:`._verify`) and ``read`` of one
(``pread`` in a worker thread; for a large object not covered by the kernel's
fs-verity, whole 512 KiB groups read and checked against the first open's level-1
digests, the last one cached in the open file). Errors
reach the kernel as errno values only (:class:`pyfuse3.FUSEError`):

* ENOENT: no such name; ENOTDIR, EISDIR, EINVAL: the wrong kind of inode;
* EROFS: an open for writing (the mount is read-only anyway);
* EIO: an object that is missing, unreadable or corrupt (its fs-verity digest is
  not the image's), for the open and every later open of any file backed by it;
* ENODATA: no such xattr. As on the kernel mount, a caller without root sees no
  ``trusted.*`` xattr.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
import pyfuse3
import trio

from .._errors import ComposefsError
from ..formats import Digest
from ..formats._fsverity import level1_group_size
from ..fs import Directory, ExternalFile, InlineFile, Inode, Leaf, Symlink
from ._inodes import Table
from ._objects import ObjectOpener, OpenedObject
from ._verify import SMALL, Verifier, read_small

__all__ = ["ComposefsOperations"]

log = logging.getLogger("trio_composefs.fuse")

BLOCK_SIZE = 4096
#: How long the kernel may cache names and attributes: the tree never changes.
CACHE_SECONDS = 3600.0
_TRUSTED = b"trusted."


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _guarded(method: _F) -> _F:
    """Answer EIO for an unexpected exception: pyfuse3 would end the session on one."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ComposefsError as e:  # a corrupt image: that request fails, the rest is served
            log.error("%s: %s", method.__name__, e)
            raise _fail(errno.EIO) from None
        except Exception:
            log.exception("internal error in the FUSE handler %s (please report)", method.__name__)
            raise _fail(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


@attrs.define(eq=False)
class _OpenFile:
    """An open regular file: bytes in memory, or an object fd (checked per group)."""

    fd: int  # -1: ``data`` holds the whole (inline, or small and checked) file
    data: bytes
    size: int
    inode: int = 0
    content: ExternalFile | None = None
    level1: bytes | None = None  # None: not checked per read (inline, kernel-verified)
    group: int = -1  # the group held in ``cache``, checked
    cache: bytes = b""
    bad: bool = False


class ComposefsOperations(pyfuse3.Operations):
    """pyfuse3 handlers serving one composefs tree read-only.

    Args:
        table: the numbered tree.
        objects: opens the objects of external files.
        verifier: checks objects the kernel does not verify.
        limiter: the worker-thread limiter for opens and reads.
        image_size: the EROFS image's size in bytes (for ``statfs``).
        check_reads: check every read of a large object against the level-1
            digests of its first open (else only the first open is checked).
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        table: Table,
        objects: ObjectOpener,
        verifier: Verifier,
        limiter: trio.CapacityLimiter,
        image_size: int = 0,
        check_reads: bool = True,
    ) -> None:
        super().__init__()
        self.check_reads = check_reads
        self.table = table
        self.objects = objects
        self.verifier = verifier
        self.limiter = limiter
        self.image_size = image_size
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._handles = itertools.count(1)
        self.opens = 0
        self.bytes_read = 0
        self.open_failures = 0

    # -- attributes ---------------------------------------------------------------

    def _node(self, ino: int) -> Inode:
        node = self.table.get(ino)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        """The ``stat`` of inode ``ino`` as the kernel mount shows it."""
        node = self._node(ino)
        attr = pyfuse3.EntryAttributes()
        stat = node.stat
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = CACHE_SECONDS
        attr.attr_timeout = CACHE_SECONDS
        attr.st_mode = node.st_mode
        attr.st_nlink = self.table.nlink(ino)
        attr.st_uid = stat.uid
        attr.st_gid = stat.gid
        attr.st_rdev = node.rdev if isinstance(node, Leaf) else 0
        size = self.table.size(ino)
        attr.st_size = size
        attr.st_blksize = BLOCK_SIZE
        attr.st_blocks = (size + 511) // 512
        ns = stat.mtime * 1_000_000_000 + stat.mtime_nsec
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
        return attr

    @_guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not isinstance(parent, Directory):
            raise _fail(errno.ENOTDIR)
        if name == b".":
            return self.attributes(parent_inode)
        if name == b"..":
            return self.attributes(self.table.parent(parent_inode))
        child = self.table.lookup(parent_inode, name)
        if child is None:
            raise _fail(errno.ENOENT)
        return self.attributes(child)

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attributes(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Nothing to free: the whole table lives as long as the mount."""

    @_guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not (isinstance(node, Leaf) and isinstance(node.content, Symlink)):
            raise _fail(errno.EINVAL)
        return node.content.target

    # -- directories --------------------------------------------------------------

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not isinstance(self._node(inode), Directory):
            raise _fail(errno.ENOTDIR)
        fh = next(self._handles)
        self._dirs[fh] = self.table.children(inode)
        return fh

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise _fail(errno.EBADF)
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self.attributes(ino), i + 1):
                break

    @_guarded
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files --------------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, Directory):
            raise _fail(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _fail(errno.EROFS)
        content = node.content
        if isinstance(content, InlineFile):
            handle = _OpenFile(-1, content.data, content.size)
        elif isinstance(content, ExternalFile):
            handle = await self._open_external(inode, content)
        else:
            raise _fail(errno.EINVAL)  # the kernel opens devices and fifos itself
        fh = next(self._handles)
        self._files[fh] = handle
        self.opens += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _open_blocking(
        self, content: ExternalFile
    ) -> tuple[OpenedObject, tuple[bytes, Digest] | str | None]:
        """Open the object; a small one the kernel does not verify is also read, hashed
        and closed here: one thread hop per small file."""
        opened = self.objects.open(content)
        if opened.kernel_verified or content.size > SMALL or content.digest is None:
            return opened, None
        try:
            return OpenedObject(-1, False), read_small(opened.fd, content.size, content.digest)
        finally:
            os.close(opened.fd)

    async def _open_external(self, inode: int, content: ExternalFile) -> _OpenFile:
        try:
            opened, small = await trio.to_thread.run_sync(
                self._open_blocking, content, limiter=self.limiter
            )
        except (OSError, ComposefsError) as e:
            self.open_failures += 1
            log.error(
                "cannot open object %s for %s: %s",
                self.objects.describe(content),
                self.table.path(inode).decode("utf-8", "backslashreplace"),
                e,
            )
            raise _fail(errno.EIO) from None
        try:
            if opened.kernel_verified:
                self.verifier.kernel_verified()
                return _OpenFile(opened.fd, b"", content.size)
            digest = content.digest
            assert digest is not None  # the openers refuse files without one
            where, path = self.objects.describe(content), self.table.path(inode)
            if small is not None:
                data = self.verifier.check_small(digest, small, where, path)
                if data is None:
                    self.open_failures += 1
                    raise _fail(errno.EIO)
                return _OpenFile(-1, data, content.size)
            level1 = await self.verifier.check_large(digest, opened.fd, content.size, where, path)
            if level1 is None:
                self.open_failures += 1
                raise _fail(errno.EIO)
        except BaseException:
            if opened.fd >= 0:
                os.close(opened.fd)
            raise
        if not self.check_reads:
            return _OpenFile(opened.fd, b"", content.size)
        return _OpenFile(opened.fd, b"", content.size, inode, content, level1)

    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise _fail(errno.EBADF)
        if off >= handle.size:
            return b""
        size = min(size, handle.size - off)
        if handle.fd < 0:
            data = handle.data[off : off + size]
        elif handle.level1 is None:
            data = await self._pread(handle.fd, size, off)
        else:
            data = await self._read_checked(handle, off, size)
        self.bytes_read += len(data)
        return data

    async def _pread(self, fd: int, size: int, off: int) -> bytes:
        try:
            return await trio.to_thread.run_sync(os.pread, fd, size, off, limiter=self.limiter)
        except OSError as e:
            raise _fail(e.errno or errno.EIO) from None

    async def _read_checked(self, handle: _OpenFile, off: int, size: int) -> bytes:
        """Read whole level-1 groups, check each against the first open's digests."""
        content = handle.content
        assert content is not None
        assert content.digest is not None
        assert handle.level1 is not None
        digest = content.digest
        group_size = level1_group_size(digest.algorithm)
        pieces = []
        end = off + size
        for group in range(off // group_size, (end - 1) // group_size + 1):
            if handle.bad or self.verifier.is_refused(digest):
                handle.bad = True
                raise _fail(errno.EIO)
            if group != handle.group:
                start = group * group_size
                length = min(group_size, handle.size - start)
                data = await self._pread(handle.fd, length, start)
                ok = len(data) == length and await self.verifier.check_group(
                    digest,
                    handle.level1,
                    group,
                    data,
                    self.objects.describe(content),
                    self.table.path(handle.inode),
                )
                if not ok:
                    handle.bad = True
                    raise _fail(errno.EIO)
                handle.group, handle.cache = group, data
            base = group * group_size
            pieces.append(handle.cache[max(off, base) - base : min(end, base + group_size) - base])
        return b"".join(pieces)

    @_guarded
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None and handle.fd >= 0:
            os.close(handle.fd)

    def close_all(self) -> None:
        """Close every object still open (the mount is going away)."""
        for handle in self._files.values():
            if handle.fd >= 0:
                os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()

    # -- xattrs and statfs --------------------------------------------------------

    def _xattrs(self, inode: int, ctx: pyfuse3.RequestContext) -> dict[bytes, bytes]:
        xattrs = self._node(inode).stat.xattrs
        if ctx.uid == 0:
            return xattrs
        return {k: v for k, v in xattrs.items() if not k.startswith(_TRUSTED)}

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(inode, ctx).get(name)
        if value is None:
            raise _fail(pyfuse3.ENOATTR)
        return value

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self._xattrs(inode, ctx))

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = -(-(self.image_size + self.table.total_bytes) // BLOCK_SIZE)
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.table)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data
