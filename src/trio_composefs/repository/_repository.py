"""The composefs repository: a blocking object store over a directory fd.

On-disk format of composefs-rs 0.9::

    meta.json                      format metadata (fs-verity on it = secure repository)
    objects/XX/<rest>              content named by its fs-verity digest
    streams/<content-id>           -> ../objects/XX/<rest>
    streams/refs/<name...>         -> ../<content-id> (one ``..`` per directory level)
    images/<hex>                   -> ../objects/XX/<rest> (composefs EROFS images)
    images/refs/<name...>          -> ../<hex> (one ``..`` per directory level)

Objects are written to an anonymous ``O_TMPFILE`` in ``objects/`` and linked
under their digest only once complete, so ``objects/XX/`` never holds a partial
file. There is no per-object fsync: :meth:`Repository.publish_stream` calls
``syncfs`` once before naming a stream, so after a crash a named stream has all
its objects.

Nothing here imports trio. :meth:`Repository.begin_object`,
:meth:`Repository.store_object` and the read methods may be called from many
threads at once; one :class:`ObjectTmpfile` must be used by one thread at a
time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import posixpath
import secrets
import stat
import string
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import attrs

from .._errors import (
    ComposefsError,
    DigestError,
    DigestMismatchError,
    InternalError,
    InvalidNameError,
    LockTimeoutError,
    ObjectNotFoundError,
    RepositoryError,
    UnsafeLayoutError,
    VerityUnsupportedError,
)
from ..formats._fsverity import Algorithm, Digest, FsVerityHasher
from ..hashing._fd import digest_fd
from ..hashing._objstore import link_tmpfile
from ._layout import (
    IMAGES,
    LAYOUT,
    META_JSON,
    OBJECTS,
    STREAMS,
    TMP_OBJECT_PREFIX,
    TMP_SPOOL_PREFIX,
    TMP_SYMLINK_PREFIX,
    object_entry_path,
    stream_ref_path,
)
from ._meta import MAX_META_BYTES, RepoMetadata
from ._verity import EnableResult, VerityOps
from ._writing import write_object

__all__ = ["ObjectEntry", "ObjectTmpfile", "RefEntry", "Repository"]

_ALNUM = string.ascii_letters + string.digits
_READ_CHUNK = 1 << 20
_NO_TMPFILE_ERRNOS = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)
RENAME_NOREPLACE = 1


def _random_name(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(12))


def _proc_fd(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _reopen_readonly(fd: int) -> int:
    """A new O_RDONLY fd for the file behind ``fd`` (works for O_TMPFILE files)."""
    return os.open(_proc_fd(fd), os.O_RDONLY | os.O_CLOEXEC)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no dynamic libc
        return None


_LIBC = _libc()


def _renameat2_noreplace(dirfd: int, src: str, dst: str) -> bool:
    """``renameat2(RENAME_NOREPLACE)`` within ``dirfd``.

    Returns False when the call or the flag is unavailable (the caller falls
    back to link + unlink). Raises :class:`OSError` (``EEXIST`` among others).
    """
    func = getattr(_LIBC, "renameat2", None)
    if func is None:
        return False
    rc = func(dirfd, os.fsencode(src), dirfd, os.fsencode(dst), RENAME_NOREPLACE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), dst)


def _syncfs(fd: int) -> None:
    func = getattr(_LIBC, "syncfs", None)
    if func is None:  # pragma: no cover - glibc has had syncfs since 2.14
        os.sync()
        return
    if func(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _copy_fd(src: int, dst: int) -> None:
    offset = 0
    while chunk := os.pread(src, _READ_CHUNK, offset):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
        offset += len(chunk)


#: The longest name (in bytes) accepted for a stream, ref or image ref: far below
#: ``PATH_MAX`` once ``streams/refs/`` and the repository path are added.
MAX_NAME_BYTES = 1024
#: The most path components a name may have (directories under ``refs/`` plus one).
MAX_NAME_DEPTH = 32


def _check_name(kind: str, name: str) -> None:
    """Refuse names that could escape their directory, collide with our temporary
    files (any component starting with ``.``), or are too long or too deep.

    Checked before any work, so an import never fails after the fact on its name.
    """
    if not name or "\0" in name or name.startswith("/"):
        raise InvalidNameError(f"invalid {kind} name {name!r}")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise InvalidNameError(
            f"invalid {kind} name {name[:64]!r}...: {size} bytes long"
            f" (the limit is {MAX_NAME_BYTES})"
        )
    parts = name.split("/")
    if len(parts) > MAX_NAME_DEPTH:
        raise InvalidNameError(
            f"invalid {kind} name {name[:64]!r}...: {len(parts)} path components"
            f" (the limit is {MAX_NAME_DEPTH})"
        )
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidNameError(
                f"invalid {kind} name {name!r}: empty, '.' or '..' path component"
            )
        if part.startswith("."):
            raise InvalidNameError(
                f"invalid {kind} name {name!r}: a path component starts with '.'"
                " (reserved for the repository's temporary files)"
            )
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise InvalidNameError(
                f"invalid {kind} name {name!r}: a path component is longer than 255 bytes"
            )


def check_ref_name(name: str) -> None:
    """Refuse a ref name (``streams/refs/<name>``) that could not be published.

    Raises:
        InvalidNameError: empty, absolute, with ``.``/``..``/empty components,
            a component starting with ``.``, a NUL, a component longer than a
            file name may be, more than :data:`MAX_NAME_BYTES` bytes or
            :data:`MAX_NAME_DEPTH` components.
    """
    _check_name("ref", name)


def _flock(
    fd: int,
    op: int,
    path: str,
    what: str,
    on_wait: Callable[[], object] | None,
    timeout: float | None,
) -> None:
    """``flock(fd, op)``; if busy, call ``on_wait`` once, then wait (polling every
    50 ms when there is a ``timeout``, raising :class:`LockTimeoutError` after it)."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        if on_wait is not None:
            on_wait()
    if timeout is None:
        fcntl.flock(fd, op)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeoutError(
                    f"{path}: the repository's {what} lock is still held by another process"
                    f" after {timeout:g} s (--lock-timeout)"
                ) from None
            time.sleep(min(0.05, left))


@attrs.define(eq=False)
class Repository:
    """An open composefs repository. Close it (or use ``with``) to release the lock.

    Build one with :meth:`init` or :meth:`open`. Holds an ``O_RDONLY`` fd on
    the repository directory with a shared ``flock`` (garbage collection takes
    it exclusively).

    Attributes:
        path: the repository directory, as given.
        dirfd: the directory fd (owned).
        algorithm: the fs-verity algorithm naming objects.
        insecure: when false (secure), every object must have fs-verity with
            the right digest.
        read_only: opened read-only because of unknown read-only-compatible
            features; writes are refused.
        metadata: the parsed ``meta.json``.
        verity_ops: the fs-verity ioctls (injectable for tests).
        force_named_tmpfile: write objects through named temporary files, as
            on filesystems without ``O_TMPFILE`` (for tests).
    """

    path: str
    _dirfd: int = attrs.field(alias="dirfd")
    algorithm: Algorithm
    insecure: bool
    read_only: bool
    metadata: RepoMetadata
    verity_ops: VerityOps = attrs.field(factory=VerityOps)
    force_named_tmpfile: bool = False
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)
    _probe_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)
    _objects: int | None = attrs.field(default=None, init=False, repr=False)
    _verity_supported: bool | None = attrs.field(default=None, init=False, repr=False)
    _closed: bool = attrs.field(default=False, init=False, repr=False)

    # ---------------------------------------------------------------- opening

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        algorithm: Algorithm = Algorithm.SHA512,
        insecure: bool = False,
        verity_ops: VerityOps | None = None,
    ) -> Repository:
        """Create a repository (or open an identical existing one) and open it.

        Creates the directory (mode 0700) if needed, writes ``meta.json``
        exactly as ``cfsctl init`` does and creates the directory layout.
        Unless ``insecure``, fs-verity is enabled on ``meta.json``, which makes
        the repository secure: every object must then carry fs-verity. As
        upstream, the returned repository's mode is inferred from the
        ``meta.json`` on disk (an identical existing one is kept as it is).

        Raises:
            VerityUnsupportedError: secure mode on a filesystem without fs-verity.
            RepositoryError: ``meta.json`` exists with a different configuration,
                or the directory cannot be created or written.
        """
        ops = verity_ops if verity_ops is not None else VerityOps()
        spath = os.fspath(path)
        meta = RepoMetadata.new(algorithm)
        created = False
        try:
            os.mkdir(spath, 0o700)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise RepositoryError(f"cannot create repository directory {spath}: {e}") from e
        try:
            dirfd = os.open(spath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise RepositoryError(f"cannot open repository directory {spath}: {e}") from e
        try:
            try:
                _write_meta(dirfd, meta, enable_verity=not insecure, ops=ops)
            except (OSError, ComposefsError) as e:
                existing = _read_meta(dirfd, spath)
                if existing is None:
                    if isinstance(e, OSError):
                        raise RepositoryError(
                            f"cannot write {posixpath.join(spath, META_JSON)}: {e}"
                        ) from e
                    if isinstance(e, VerityUnsupportedError):
                        raise VerityUnsupportedError(
                            f"the filesystem holding {spath} lacks fs-verity support, which a"
                            " secure repository requires; use --insecure (insecure=True) to"
                            " create a repository without fs-verity"
                        ) from e
                    raise
                unknown = existing.features.unknown_incompatible()
                if unknown:
                    raise RepositoryError(
                        f"{spath}: repository requires unknown incompatible features"
                        f" {unknown}: this tool can neither use nor re-initialize it"
                    ) from None
                if existing != meta:
                    raise RepositoryError(
                        f"repository {spath} already exists with a different configuration"
                        f" (algorithm {existing.algorithm}, EROFS format"
                        f" {existing.erofs_version()}); cannot re-initialize it with"
                        f" (algorithm {meta.algorithm}, EROFS format {meta.erofs_version()})"
                    ) from None
            for sub in LAYOUT:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sub, 0o755, dir_fd=dirfd)
        except BaseException as e:
            os.close(dirfd)
            if created:  # leave nothing behind when init fails on a new directory
                with contextlib.suppress(OSError):
                    os.rmdir(spath)
            if isinstance(e, OSError):
                raise RepositoryError(f"cannot initialize repository {spath}: {e}") from e
            raise
        os.close(dirfd)
        return cls.open(spath, verity_ops=ops)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        insecure: bool | None = None,
        verity_ops: VerityOps | None = None,
        on_wait: Callable[[], object] | None = None,
        lock_timeout: float | None = None,
    ) -> Repository:
        """Open an existing repository, taking a shared lock.

        The shared lock waits while garbage collection holds the exclusive one.

        Args:
            path: the repository directory.
            insecure: ``None`` infers the mode (``meta.json`` with fs-verity →
                secure); ``True`` forces insecure; ``False`` forces secure.
            verity_ops: the fs-verity ioctl layer (tests inject a simulation).
            on_wait: called once, before waiting, if the shared lock is busy.
            lock_timeout: give up waiting for the shared lock after this many
                seconds (default: wait as long as it takes).

        Raises:
            LockTimeoutError: the lock stayed busy for ``lock_timeout`` seconds.
            RepositoryError: not a repository, a newer format, or unknown
                incompatible features.
            FormatError: ``meta.json`` is not a composefs metadata file.
        """
        ops = verity_ops if verity_ops is not None else VerityOps()
        spath = os.fspath(path)
        try:
            dirfd = os.open(spath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise RepositoryError(f"cannot open repository {spath}: {e}") from e
        try:
            _flock(dirfd, fcntl.LOCK_SH, spath, "shared", on_wait, lock_timeout)
            meta_fd = _open_meta(dirfd, spath)
            if meta_fd is None:
                if _exists(dirfd, "objects"):
                    raise RepositoryError(
                        f"{spath}: {META_JSON} not found; this looks like an old-format"
                        " repository (upgrade it with `cfsctl init`)"
                    ) from None
                raise RepositoryError(
                    f"{spath} is not a composefs repository: {META_JSON} not found"
                    " (create one with `init`)"
                ) from None
            try:
                meta = RepoMetadata.from_json(
                    _read_meta_bytes(meta_fd, spath), source=posixpath.join(spath, META_JSON)
                )
                try:
                    meta_verity = ops.measure(meta_fd, meta.algorithm) is not None
                except VerityUnsupportedError:
                    meta_verity = False
                except DigestMismatchError:
                    meta_verity = True  # verity with another algorithm: still secure
            finally:
                os.close(meta_fd)
            unknown = meta.features.unknown_incompatible()
            if unknown:
                raise RepositoryError(
                    f"{spath}: repository requires unknown incompatible features {unknown}"
                )
            read_only = bool(meta.features.unknown_read_only_compatible())
            repo = cls(
                path=spath,
                dirfd=dirfd,
                algorithm=meta.algorithm,
                insecure=(not meta_verity) if insecure is None else insecure,
                read_only=read_only,
                metadata=meta,
                verity_ops=ops,
            )
            if meta_verity:
                repo._verity_supported = True
            return repo
        except BaseException:
            os.close(dirfd)
            raise

    def close(self) -> None:
        """Close the directory fds, releasing the lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._objects is not None:
                os.close(self._objects)
                self._objects = None
            os.close(self._dirfd)
            self._dirfd = -1

    @property
    def dirfd(self) -> int:
        """The repository directory's fd.

        Raises:
            RepositoryError: the repository is closed (its old descriptor number may
                name another file by now, so no call may use it).
        """
        if self._closed:
            raise RepositoryError(f"repository {self.path} is closed")
        return self._dirfd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @contextlib.contextmanager
    def exclusive_lock(
        self, *, on_wait: Callable[[], object] | None = None, timeout: float | None = None
    ) -> Iterator[None]:
        """Hold the repository's ``flock`` exclusively, then go back to shared.

        Blocks while any other open repository (in this process or another)
        holds its shared lock, e.g. a running import. As with ``flock(2)``,
        the conversion is not atomic: the shared lock is dropped while
        waiting, so two processes upgrading at once cannot deadlock.

        Args:
            on_wait: called once, before blocking, if the lock is busy.
            timeout: give up after this many seconds (``None``: wait as long
                as it takes; ``0``: do not wait). The lock is polled every
                50 ms while a timeout runs.

        Raises:
            LockTimeoutError: the lock was still busy after ``timeout`` seconds
                (the shared lock is held again).
        """
        try:
            _flock(self.dirfd, fcntl.LOCK_EX, self.path, "exclusive", on_wait, timeout)
        except BaseException:
            fcntl.flock(self.dirfd, fcntl.LOCK_SH)  # a failed conversion dropped it
            raise
        try:
            yield
        finally:
            fcntl.flock(self.dirfd, fcntl.LOCK_SH)

    def __enter__(self) -> Repository:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ properties

    @property
    def verity_supported(self) -> bool:
        """Whether the kernel can enable fs-verity on this filesystem (probed once)."""
        cached = self._verity_supported
        if cached is not None:
            return cached
        with self._probe_lock:
            if self._verity_supported is None:
                self._verity_supported = self._probe_verity()
            return self._verity_supported

    def _probe_verity(self) -> bool:
        try:
            fd, name, objects = self._create_tmp()
        except (OSError, RepositoryError):
            return False  # cannot write here: nothing to enable verity on
        ro = -1
        try:
            os.write(fd, b"fs-verity probe")
            ro = _reopen_readonly(fd)
            os.close(fd)
            fd = -1
            result = self.verity_ops.enable(ro, self.algorithm)
        except (OSError, RepositoryError):
            return False
        finally:
            for f in (fd, ro):
                if f >= 0:
                    os.close(f)
            if name is not None:
                _unlink_quietly(objects, name)
        return result is not EnableResult.NOT_SUPPORTED

    def ensure_writable(self) -> None:
        """Fail early, with a clear message, if objects cannot be written.

        Raises:
            RepositoryError: read-only repository, read-only filesystem, or no
                write permission.
        """
        if self.read_only:
            raise RepositoryError(
                f"repository {self.path} is read-only for this tool: {META_JSON} lists unknown"
                f" read-only-compatible features"
                f" {self.metadata.features.unknown_read_only_compatible()}"
            )
        st = os.fstatvfs(self.dirfd)
        if st.f_flag & os.ST_RDONLY:
            raise RepositoryError(f"repository {self.path} is not writable: read-only file system")
        if not os.access(".", os.W_OK, dir_fd=self.dirfd):
            raise RepositoryError(f"repository {self.path} is not writable: permission denied")

    # --------------------------------------------------------------- objects

    def _objects_fd(self, *, create: bool) -> int | None:
        fd = self._objects
        if fd is not None:
            return fd
        with self._lock:
            if self._closed:
                raise RepositoryError(f"repository {self.path} is closed")
            if self._objects is None:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir("objects", 0o755, dir_fd=self.dirfd)
                try:
                    self._objects = os.open(
                        "objects", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dirfd
                    )
                except FileNotFoundError:
                    return None
            return self._objects

    def _writable_objects_fd(self) -> int:
        if self.read_only:
            self.ensure_writable()
        try:
            fd = self._objects_fd(create=True)
        except OSError as e:
            raise RepositoryError(f"cannot create {self.path}/objects: {e}") from e
        if fd is None:  # pragma: no cover - created just above
            raise InternalError("objects/ vanished after mkdir")
        return fd

    def _create_tmp(self) -> tuple[int, str | None, int]:
        """A new writable temporary file in ``objects/``: ``(fd, name or None, objects fd)``."""
        objects = self._writable_objects_fd()
        if not self.force_named_tmpfile:
            try:
                fd = os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=objects)
                return fd, None, objects
            except OSError as e:
                if e.errno not in _NO_TMPFILE_ERRNOS:
                    raise RepositoryError(
                        f"cannot create a temporary file in {self.path}/objects: {e}"
                    ) from e
        for _ in range(16):
            name = _random_name(TMP_OBJECT_PREFIX)
            try:
                fd = os.open(
                    name,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o644,
                    dir_fd=objects,
                )
            except FileExistsError:
                continue
            except OSError as e:
                raise RepositoryError(
                    f"cannot create a temporary file in {self.path}/objects: {e}"
                ) from e
            return fd, name, objects
        raise RepositoryError(f"cannot find a free temporary name in {self.path}/objects")

    def find_stray_tmpfiles(self) -> list[str]:
        """Names (relative to ``objects/``) of leftover named temporary object files.

        These appear only on filesystems without ``O_TMPFILE``, after a crash;
        they are never valid objects and may be removed when no writer runs.
        """
        fd = self._objects_fd(create=False)
        if fd is None:
            return []
        with os.scandir(fd) as it:
            return sorted(e.name for e in it if e.name.startswith(TMP_OBJECT_PREFIX))

    # ------------------------------------------------- safe layout walking

    def open_owned_dir(self, rel: str) -> int | None:
        """Open a directory of the layout (``objects/ab``, ``streams/refs``...) safely.

        Each component is opened with ``O_NOFOLLOW|O_DIRECTORY`` relative to the
        previous one, so a symlink anywhere on the way is never followed. The
        caller closes the returned fd; ``None`` when a component is absent.

        Raises:
            UnsafeLayoutError: a component is a symlink or not a directory.
        """
        return _open_dir_nofollow(self.dirfd, rel, f"{self.path}/")

    def scan_owned_dir(self, rel: str) -> list[tuple[str, int]] | None:
        """``(name, st_mode)`` of each entry of a layout directory (sorted, never followed).

        ``None`` when it is absent. Raises :class:`UnsafeLayoutError` as
        :meth:`open_owned_dir`.
        """
        fd = self.open_owned_dir(rel)
        if fd is None:
            return None
        try:
            with os.scandir(fd) as it:
                return sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in it)
        finally:
            os.close(fd)

    def object_dirs(self) -> tuple[list[str], list[str]]:
        """``(prefixes, unsafe)``: the real ``objects/XX`` directories, and the
        ``objects/XX`` entries that are not (symlinks, files), which no walk follows."""
        prefixes: list[str] = []
        unsafe: list[str] = []
        for name, mode in self.scan_owned_dir("objects") or []:
            if len(name) == 2 and all(c in "0123456789abcdef" for c in name):
                if stat.S_ISDIR(mode):
                    prefixes.append(name)
                else:
                    unsafe.append(f"objects/{name}")
        return prefixes, unsafe

    def iter_objects(self) -> Iterator[ObjectEntry]:
        """Every entry of every real ``objects/XX/`` directory (symlinked ones are skipped).

        Entries whose name is not an object name come with ``digest=None``.
        """
        prefixes, _unsafe = self.object_dirs()
        for prefix in prefixes:
            yield from self.object_entries(prefix)

    def object_entries(self, prefix: str) -> list[ObjectEntry]:
        """The entries of one ``objects/<prefix>/`` directory, sorted by name.

        ``[]`` when it is absent or not a real directory (never followed). Entries
        whose name is not an object name come with ``digest=None``.
        """
        out = []
        for name, mode, size in self._scan_objects(prefix):
            try:
                digest: Digest | None = Digest.from_object_path(f"{prefix}/{name}", self.algorithm)
            except DigestError:
                digest = None
            out.append(ObjectEntry(f"{prefix}/{name}", digest, mode, size))
        return out

    def open_object_entry(self, entry: ObjectEntry) -> int:
        """Open an entry of :meth:`object_entries` read-only as it is (no fs-verity check,
        the last component never followed); the caller closes the fd.

        Raises:
            OSError: it cannot be opened (a symlink: ``ELOOP``).
        """
        return os.open(
            object_entry_path(entry.path),
            os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
            dir_fd=self.dirfd,
        )

    def open_objects_dir(self) -> int:
        """Open ``objects/`` read-only (to hand to the kernel); the caller closes the fd.

        Raises:
            OSError: it is missing or unreadable.
        """
        return os.open(OBJECTS, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dirfd)

    def _scan_objects(self, prefix: str) -> list[tuple[str, int, int]]:
        try:
            fd = self.open_owned_dir(f"{OBJECTS}/{prefix}")
        except UnsafeLayoutError:
            return []
        if fd is None:
            return []
        try:
            with os.scandir(fd) as it:
                out = []
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    out.append((e.name, st.st_mode, st.st_size))
                return sorted(out)
        finally:
            os.close(fd)

    def remove_object(self, digest: Digest) -> int:
        """Unlink ``objects/XX/rest`` (never through a symlinked directory); its size.

        Raises:
            ObjectNotFoundError: no such object.
            UnsafeLayoutError: ``objects`` or ``objects/XX`` is not a real directory.
        """
        self._check_algorithm(digest)
        prefix, rest = digest.object_path().split("/")
        fd = self.open_owned_dir(f"objects/{prefix}")
        if fd is None:
            raise ObjectNotFoundError(f"object {digest} not found in {self.path}/objects")
        try:
            size = os.stat(rest, dir_fd=fd, follow_symlinks=False).st_size
            os.unlink(rest, dir_fd=fd)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {digest} not found in {self.path}/objects") from None
        finally:
            os.close(fd)
        return size

    def walk_refs(self, top: str) -> list[RefEntry]:
        """Every non-directory entry under ``<top>/refs`` (``top``: streams or images).

        Iterative (no depth limit from recursion) and never following a symlink:
        a symlink to a directory is reported as a ref entry like any other.
        ``.symlink-*`` leftovers are included (check ``RefEntry.is_tmp``).

        Raises:
            UnsafeLayoutError: ``top`` or ``top/refs`` (or a directory below) is
                not a real directory.
        """
        out: list[RefEntry] = []
        stack = [f"{top}/refs"]
        while stack:
            rel = stack.pop()
            fd = self.open_owned_dir(rel)
            if fd is None:
                continue
            try:
                with os.scandir(fd) as it:
                    entries = sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in it)
                for name, mode in entries:
                    path = f"{rel}/{name}"
                    if stat.S_ISDIR(mode):
                        stack.append(path)
                        continue
                    target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(mode) else None
                    out.append(RefEntry(path, mode, target))
            finally:
                os.close(fd)
        out.sort(key=lambda r: r.path)
        return out

    def resolve_path(self, path: str) -> Digest:
        """The object a layout symlink (``streams/refs/x``, ``images/<hex>``...) leads to.

        Followed link by link, never outside the repository.

        Raises:
            ObjectNotFoundError: a link of the chain or the object is missing (dangling).
            RepositoryError: not a symlink, a loop, an absolute or escaping target,
                or a target that is not an object.
        """
        top, _, name = path.partition("/")
        return self._resolve_link(top, name, path)

    # ----------------------------------------- maintenance: layout, links, leftovers

    def read_metadata(self) -> RepoMetadata | None:
        """``meta.json`` as it is on disk now (``None`` if missing), read without following
        a symlink; :attr:`metadata` is what :meth:`open` read.

        Raises:
            ComposefsError: it does not parse. OSError: it cannot be read.
        """
        return _read_meta(self.dirfd, self.path)

    def layout_errors(self) -> list[UnsafeLayoutError]:
        """The directories of the layout that are symlinks or files (never followed),
        in :data:`LAYOUT` order; a damaged parent may be reported again for its child."""
        errors = []
        for rel in LAYOUT:
            try:
                fd = self.open_owned_dir(rel)
            except UnsafeLayoutError as e:
                errors.append(e)
                continue
            if fd is not None:
                os.close(fd)
        return errors

    def linked_objects(self, top: str) -> dict[str, Digest]:
        """``{name: object}`` for the first-level symlinks of ``top`` (:data:`STREAMS` or
        :data:`IMAGES`) whose target ends in an object path; ``.symlink-*`` leftovers skipped.

        Raises:
            UnsafeLayoutError: ``top`` is not a real directory.
        """
        out: dict[str, Digest] = {}
        fd = self.open_owned_dir(top)
        if fd is None:
            return out
        try:
            with os.scandir(fd) as it:
                names = [e.name for e in it if e.is_symlink()]
            n = 2 * self.algorithm.digest_size + 1
            for name in names:
                if name.startswith(TMP_SYMLINK_PREFIX):
                    continue
                target = os.readlink(name, dir_fd=fd)
                with contextlib.suppress(DigestError):
                    out[name] = Digest.from_object_path(target[-n:], self.algorithm)
        finally:
            os.close(fd)
        return out

    def read_link(self, path: str) -> str:
        """The target of the layout symlink ``path`` (repository-relative).

        Raises:
            OSError: it is missing or not a symlink.
        """
        return os.readlink(path, dir_fd=self.dirfd)

    def link_error(self, path: str) -> str | None:
        """``None`` when the symlink ``path`` resolves (followed by the kernel) to an
        existing file; ``""`` when it dangles; else the error text."""
        try:
            os.stat(path, dir_fd=self.dirfd)
        except FileNotFoundError:
            return ""
        except OSError as e:
            return e.strerror or str(e)
        return None

    def link_is_alive(self, path: str, gone: set[str]) -> bool:
        """Whether the symlink ``path`` leads, link by link, to an existing file whose
        repository-relative path is not in ``gone`` (``False`` for a loop)."""
        current = path
        for _ in range(40):
            try:
                st = os.stat(current, dir_fd=self.dirfd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return False
            if not stat.S_ISLNK(st.st_mode):
                return current not in gone
            target = os.readlink(current, dir_fd=self.dirfd)
            if target.startswith("/"):
                return os.path.exists(target)
            current = _link_target_path(current, target)
            if current == ".." or current.startswith("../"):
                return os.path.exists(os.path.join(self.path, current))
        return False  # a loop

    def remove_link(self, path: str) -> None:
        """Unlink the layout entry ``path`` (its directory opened without following
        symlinks); nothing when it or its directory is gone."""
        parent, _, base = path.rpartition("/")
        fd = self.open_owned_dir(parent)
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base, dir_fd=fd)
        finally:
            os.close(fd)

    def stray_tmpfiles(self) -> list[str]:
        """Repository-relative paths of temporary files interrupted writers left behind.

        ``objects/.tmp-object-*`` (named object files, only on filesystems without
        ``O_TMPFILE``), ``.tmp-spool-*`` (splitstream spool files) and
        ``.symlink-*`` (symlinks about to replace a stream name or ref). Right
        after a crash they are garbage; while an import runs they may be in use.
        Directories that are symlinks are never entered.
        """
        out = [object_entry_path(n) for n in self.find_stray_tmpfiles()]
        out += [n for n, _ in self._scan_quietly(".") if n.startswith(TMP_SPOOL_PREFIX)]
        for top in (STREAMS, IMAGES):
            out += [
                f"{top}/{n}" for n, _ in self._scan_quietly(top) if n.startswith(TMP_SYMLINK_PREFIX)
            ]
            with contextlib.suppress(UnsafeLayoutError):
                out += [r.path for r in self.walk_refs(top) if r.is_tmp]
        return sorted(out)

    def _scan_quietly(self, rel: str) -> list[tuple[str, int]]:
        try:
            return self.scan_owned_dir(rel) or []
        except UnsafeLayoutError:
            return []

    def remove_stray_tmpfile(self, path: str, *, dry_run: bool = False) -> int | None:
        """Remove one path of :meth:`stray_tmpfiles`: its size in bytes (0 for a
        symlink), or ``None`` when it is gone or is neither a file nor a symlink
        (then it is kept). With ``dry_run`` only the size is read."""
        try:
            st = os.stat(path, dir_fd=self.dirfd, follow_symlinks=False)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                return None
            if not dry_run:
                os.unlink(path, dir_fd=self.dirfd)
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def begin_object(self) -> ObjectTmpfile:
        """Start writing one object (thread-safe). Use the result as a context manager."""
        fd, name, objects = self._create_tmp()
        return ObjectTmpfile(repo=self, fd=fd, name=name, objects_fd=objects)

    def helper_store_target(self) -> tuple[int, bool] | None:
        """What a helper process needs to store objects here itself: ``(objects fd, named)``.

        ``objects fd`` is this repository's open ``objects/`` directory (still owned
        by the repository: send it, do not close it); ``named`` says to write
        named temporary files instead of ``O_TMPFILE`` ones (``force_named_tmpfile``).
        The helper (:meth:`~trio_composefs.hashing.HashPool.store_objects`) names
        each object by the fs-verity digest it computes in userspace, as
        :meth:`ObjectTmpfile.finish` does with a caller's digest in an insecure
        repository.

        Returns ``None`` where the kernel measures objects (fs-verity enabled on
        each): those go through :meth:`begin_object`.

        Raises:
            VerityUnsupportedError: a secure repository on a filesystem without
                fs-verity (it cannot store objects at all).
        """
        if self.verity_supported:
            return None
        if not self.insecure:
            raise VerityUnsupportedError(
                f"the filesystem holding {self.path} lacks fs-verity support, which this"
                " secure repository requires (use --insecure)"
            )
        return self._writable_objects_fd(), self.force_named_tmpfile

    def store_object(self, data: bytes) -> Digest:
        """Store ``data`` (held in memory) as an object and return its digest.

        If the object already exists, nothing is written; in a secure
        repository (or where the kernel supports fs-verity) the existing
        object's measured digest is checked first.
        """
        digest = _digest_of(data, self.algorithm)
        objects = self._objects_fd(create=False)
        if objects is not None and _exists(objects, digest.object_path()):
            if not self.insecure or self.verity_supported:
                os.close(self.open_object(digest))
            return digest
        write_object(self, [data], size=len(data), digester=lambda _fd, _size: digest)
        return digest

    def has_object(self, digest: Digest) -> bool:
        """Whether ``objects/XX/rest`` exists."""
        self._check_algorithm(digest)
        objects = self._objects_fd(create=False)
        return objects is not None and _exists(objects, digest.object_path())

    def object_size(self, digest: Digest) -> int:
        """The size in bytes of an object.

        Raises:
            ObjectNotFoundError: no such object.
        """
        self._check_algorithm(digest)
        objects = self._objects_fd(create=False)
        try:
            if objects is None:
                raise FileNotFoundError
            return os.stat(digest.object_path(), dir_fd=objects).st_size
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {digest} not found in {self.path}/objects") from None

    def open_object(self, digest: Digest, *, verify: bool = False) -> int:
        """Open an object read-only; the caller closes the returned fd.

        A secure repository requires the measured fs-verity digest to match;
        in an insecure one a file without fs-verity is accepted. With
        ``verify``, the content is also re-hashed in userspace.

        Raises:
            ObjectNotFoundError: no such object.
            DigestMismatchError: the object's digest is not its name.
            RepositoryError: a secure repository's object lacks fs-verity.
        """
        self._check_algorithm(digest)
        rel = digest.object_path()
        objects = self._objects_fd(create=False)
        try:
            if objects is None:
                raise FileNotFoundError
            fd = os.open(rel, os.O_RDONLY | os.O_CLOEXEC, dir_fd=objects)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {digest} not found in {self.path}/objects") from None
        try:
            self._check_measured(fd, digest)
            if verify:
                actual = digest_fd(fd, None, self.algorithm)
                if actual != digest:
                    raise DigestMismatchError(
                        f"object {self.path}/objects/{rel} is corrupt: its content has"
                        f" fs-verity digest {actual}"
                    )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_measured(self, fd: int, digest: Digest) -> None:
        where = f"{self.path}/objects/{digest.object_path()}"
        try:
            measured = self.verity_ops.measure(fd, self.algorithm)
        except VerityUnsupportedError:
            if self.insecure:
                return
            raise VerityUnsupportedError(
                f"cannot check {where}: the filesystem lacks fs-verity support, which this"
                " secure repository requires (open it with --insecure to skip the check)"
            ) from None
        except DigestMismatchError as e:
            raise DigestMismatchError(f"object {where}: {e}") from None
        if measured is None:
            if self.insecure:
                return
            raise RepositoryError(
                f"object {where} has no fs-verity, but this repository requires it"
            )
        if measured != digest:
            raise DigestMismatchError(
                f"object {where} has measured fs-verity digest {measured}, not its name"
            )

    def read_object(self, digest: Digest) -> bytes:
        """The whole content of a (small) object, checked like :meth:`open_object`."""
        fd = self.open_object(digest)
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    def read_object_head(self, digest: Digest, size: int) -> bytes:
        """The first ``size`` bytes of an object (fewer if it is shorter), unchecked:
        for telling what kind of object it is, not for trusting its content."""
        fd = self.open_object(digest)
        try:
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def add_object_from(self, source: Repository, digest: Digest) -> str:
        """Add object ``digest`` of repository ``source`` to this one, verified first.

        The source object is opened (measured, where ``source`` checks fs-verity)
        and hashed again in userspace; only if its content has the digest ``digest``
        is anything linked. Where both repositories are on one filesystem, the very
        inode that was hashed is hard-linked (through ``/proc/self/fd``); across
        filesystems (``EXDEV``), where the kernel refuses the link (``EPERM``:
        ``protected_hardlinks``; ``EMLINK``), or where this repository would need
        fs-verity the source file lacks, the bytes are copied into a new object (with
        fs-verity enabled where supported), hashed again as they are copied. Not
        synced: :meth:`sync` before naming anything that relies on it.

        Returns:
            ``"present"`` (already here: nothing done), ``"linked"`` or ``"copied"``.

        Raises:
            ObjectNotFoundError: ``source`` has no such object.
            DigestMismatchError: its content does not match ``digest`` (nothing is
                added), naming the source file.
        """
        self._check_algorithm(digest)
        source._check_algorithm(digest)
        self.ensure_writable()
        objects = self._objects_fd(create=True)
        assert objects is not None
        path = digest.object_path()
        if _exists(objects, path):
            return "present"
        where = f"{source.path}/objects/{path}"
        fd = source.open_object(digest)
        try:
            actual = digest_fd(fd, None, self.algorithm)
            if actual != digest:
                raise DigestMismatchError(
                    f"object {where} is corrupt: its content has fs-verity digest {actual};"
                    f" not copied to {self.path}"
                )
            linkable = True
            if self.verity_supported or not self.insecure:
                try:
                    linkable = self.verity_ops.measure(fd, self.algorithm) == digest
                except ComposefsError:
                    linkable = False
            if linkable:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path[:2], 0o755, dir_fd=objects)
                try:
                    os.link(_proc_fd(fd), path, dst_dir_fd=objects, follow_symlinks=True)
                except FileExistsError:
                    return "present"
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise RepositoryError(
                            f"cannot link {where} into {self.path}/objects: {e.strerror}"
                        ) from e
                else:
                    return "linked"
            with self.begin_object() as tmp:
                hasher = FsVerityHasher(self.algorithm)
                offset = 0
                while chunk := os.pread(fd, _READ_CHUNK, offset):
                    hasher.update(chunk)
                    tmp.write(chunk)
                    offset += len(chunk)
                copied = hasher.digest()
                if copied != digest:
                    raise DigestMismatchError(
                        f"object {where} changed while it was copied: the copy has fs-verity"
                        f" digest {copied}; not copied to {self.path}"
                    )
                _, present = tmp.finish(digest)
            return "present" if present else "copied"
        finally:
            os.close(fd)

    def _check_algorithm(self, digest: Digest) -> None:
        if digest.algorithm is not self.algorithm:
            raise DigestError(
                f"digest {digest} is {digest.algorithm}, but repository {self.path}"
                f" uses {self.algorithm}"
            )

    def sync(self) -> None:
        """``syncfs`` on the repository's filesystem: everything written so far is durable."""
        try:
            _syncfs(self.dirfd)
        except OSError as e:
            raise RepositoryError(f"syncfs on {self.path} failed: {e}") from e

    # --------------------------------------------------------------- streams

    def publish_stream(
        self, content_id: str, digest: Digest, ref: str | None = None, *, sync: bool = True
    ) -> None:
        """Name a stored splitstream object, and optionally add a ref to it.

        First (unless ``sync`` is false) ``syncfs``, so the name never exists
        without its objects after a crash. Then ``streams/<content_id>`` ->
        ``../objects/XX/rest`` and, with ``ref``, ``streams/refs/<ref>`` ->
        the stream, both relative and atomically replaced.

        Raises:
            RepositoryError: an invalid name, or a read-only repository.
        """
        _check_name("stream", content_id)
        if content_id.split("/", 1)[0] == "refs":
            raise RepositoryError(f"invalid stream name {content_id!r}: 'refs' is reserved")
        if ref is not None:
            _check_name("ref", ref)
        self._check_algorithm(digest)
        self.ensure_writable()
        if sync:
            self.sync()
        stream_path = f"streams/{content_id}"
        try:
            if ref is not None:  # the ref's directories first: no stream without its ref
                self._make_parents(f"streams/refs/{ref}")
            self._symlink(stream_path, f"objects/{digest.object_path()}")
            if ref is not None:
                self._symlink(f"streams/refs/{ref}", stream_path)
        except OSError as e:
            raise RepositoryError(
                f"cannot publish stream {content_id!r} in {self.path}: {e}"
            ) from e

    def _make_parents(self, name: str) -> None:
        """Create the directories above ``name`` (before anything is published, so a
        stream is never named when its ref cannot be), never following a symlink.

        Raises:
            UnsafeLayoutError: one of them is a symlink or not a directory.
        """
        os.close(self._open_parents(name))

    def _open_parents(self, name: str) -> int:
        """Open (creating) the directory that holds ``name``, directory by directory,
        never following a symlink (a symlinked ``streams/refs/oci`` must not put the
        link outside the repository). The caller closes the returned fd."""
        parent = name.split("/")[:-1]
        fd = os.dup(self.dirfd)
        try:
            for i, part in enumerate(parent):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    nxt = os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
                except OSError as e:
                    where = "/".join(parent[: i + 1])
                    raise UnsafeLayoutError(
                        f"cannot create {self.path}/{name}: {self.path}/{where} is"
                        f" {_entry_kind(fd, part)}, not a directory (not followed)",
                        path=where,
                    ) from e
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _symlink(self, name: str, target: str) -> None:
        """``name`` -> ``target`` (repository-relative paths), computed like upstream."""
        parent = name.split("/")[:-1]
        target_parts = target.split("/")
        common = 0
        while (
            common < len(parent)
            and common < len(target_parts)
            and parent[common] == target_parts[common]
        ):
            common += 1
        relative = "/".join([".."] * (len(parent) - common) + target_parts[common:])
        fd = self._open_parents(name)
        try:
            _replace_symlink(fd, relative, name.rsplit("/", 1)[-1])
        finally:
            os.close(fd)

    def has_stream(self, content_id: str) -> Digest | None:
        """The object digest behind ``streams/<content_id>``, or ``None``."""
        _check_name("stream", content_id)
        try:
            target = os.readlink(f"streams/{content_id}", dir_fd=self.dirfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RepositoryError(f"{self.path}/streams/{content_id}: {e}") from e
        return self._parse_stream_target(content_id, target)

    def _parse_stream_target(self, content_id: str, target: str) -> Digest:
        n = 2 * self.algorithm.digest_size + 1
        if not target.startswith("../") or len(target) < n:
            raise RepositoryError(
                f"{self.path}/streams/{content_id}: symlink target {target!r} is not an object"
            )
        try:
            return Digest.from_object_path(target[-n:], self.algorithm)
        except DigestError as e:
            raise RepositoryError(
                f"{self.path}/streams/{content_id}: symlink target {target!r} is not an object"
            ) from e

    def resolve_stream(self, name: str) -> Digest:
        """The object digest of a stream named by content id or ``refs/...``.

        Raises:
            ObjectNotFoundError: the name, a link in its chain, or the object is missing.
        """
        _check_name("stream", name)
        return self._resolve_link("streams", name, "stream")

    def _resolve_link(self, top: str, name: str, kind: str) -> Digest:
        """Follow ``<top>/<name>`` link by link (never outside the repository) to an object."""
        current = f"{top}/{name}"
        for _ in range(40):
            try:
                target = os.readlink(current, dir_fd=self.dirfd)
            except (FileNotFoundError, NotADirectoryError):
                raise ObjectNotFoundError(f"{kind} {name!r} not found in {self.path}") from None
            except OSError as e:
                raise RepositoryError(f"{self.path}/{current}: {e}") from e
            if target.startswith("/"):
                raise RepositoryError(f"{self.path}/{current}: absolute symlink {target!r}")
            resolved = _link_target_path(current, target)
            if resolved.startswith("../") or resolved == "..":
                raise RepositoryError(
                    f"{self.path}/{current}: symlink {target!r} leaves the repository"
                )
            if resolved.startswith("objects/"):
                try:
                    digest = Digest.from_object_path(resolved[len("objects/") :], self.algorithm)
                except DigestError as e:
                    raise RepositoryError(
                        f"{self.path}/{current}: symlink target {target!r} is not an object"
                    ) from e
                if not self.has_object(digest):
                    raise ObjectNotFoundError(
                        f"{kind} {name!r} in {self.path} is dangling: object {digest} is missing"
                    )
                return digest
            current = resolved
        raise RepositoryError(f"{kind} {name!r} in {self.path}: too many levels of symlinks")

    def list_streams(self) -> dict[str, Digest]:
        """Every ``streams/<content-id>`` symlink whose target is an object path."""
        out: dict[str, Digest] = {}
        for entry_name, target in _symlinks_in(self.dirfd, "streams", recursive=False):
            if entry_name.startswith("."):
                continue
            try:
                out[entry_name] = self._parse_stream_target(entry_name, target)
            except RepositoryError:
                continue
        return out

    def list_stream_refs(self) -> dict[str, str]:
        """Every ref under ``streams/refs/``: ``{ref: content id}`` (raw target if not a stream)."""
        return self._list_refs("streams")

    def read_stream_ref(self, ref: str) -> str | None:
        """The raw target of ``streams/refs/<ref>``, ``None`` when there is no such ref.

        Raises:
            OSError: it cannot be read (not a symlink, a file on the way).
        """
        try:
            return os.readlink(stream_ref_path(ref), dir_fd=self.dirfd)
        except FileNotFoundError:
            return None

    def remove_stream_ref(self, ref: str) -> bool:
        """Unlink ``streams/refs/<ref>`` (the stream stays until gc); ``False`` if absent.

        Raises:
            RepositoryError: a read-only repository.
            OSError: it cannot be removed.
        """
        self.ensure_writable()
        try:
            os.unlink(stream_ref_path(ref), dir_fd=self.dirfd)
        except FileNotFoundError:
            return False
        return True

    def _list_refs(self, top: str) -> dict[str, str]:
        """``{ref: first-level name under top}`` for ``<top>/refs/**`` (raw target otherwise)."""
        out: dict[str, str] = {}
        for ref, target in _symlinks_in(self.dirfd, f"{top}/refs", recursive=True):
            if posixpath.basename(ref).startswith(TMP_SYMLINK_PREFIX):
                continue
            resolved = _link_target_path(f"{top}/refs/{ref}", target)
            head, sep, rest = resolved.partition("/")
            out[ref] = rest if head == top and sep and "/" not in rest else target
        return out

    # ---------------------------------------------------------------- images

    def publish_image(self, digest: Digest, ref: str | None = None, *, sync: bool = True) -> None:
        """Name a stored EROFS image object ``images/<hex>``, and optionally ``images/refs/<ref>``.

        As :meth:`publish_stream`: ``syncfs`` first (unless ``sync`` is false), then
        relative symlinks, atomically replaced.

        Raises:
            RepositoryError: an invalid ref name, or a read-only repository.
        """
        if ref is not None:
            _check_name("image ref", ref)
        self._check_algorithm(digest)
        self.ensure_writable()
        if sync:
            self.sync()
        image_path = f"images/{digest.hex()}"
        try:
            if ref is not None:
                self._make_parents(f"images/refs/{ref}")
            self._symlink(image_path, f"objects/{digest.object_path()}")
            if ref is not None:
                self._symlink(f"images/refs/{ref}", image_path)
        except OSError as e:
            raise RepositoryError(f"cannot publish image {digest} in {self.path}: {e}") from e

    def has_image(self, digest: Digest) -> bool:
        """Whether ``images/<hex>`` names this object (and the object exists)."""
        self._check_algorithm(digest)
        try:
            return self._resolve_link("images", digest.hex(), "image") == digest
        except (ObjectNotFoundError, RepositoryError):
            return False

    def resolve_image(self, name: str) -> Digest:
        """The object digest of an image named by its hex digest, ``refs/<ref>`` or a ref name.

        As composefs-rs: a name without ``/`` that is a digest in the repository's
        algorithm names ``images/<hex>``; ``refs/...`` names ``images/refs/...``; any
        other name is tried as ``images/refs/<name>``.

        Raises:
            ObjectNotFoundError: no such image (or its object is missing).
        """
        _check_name("image", name)
        if "/" not in name and len(name) == 2 * self.algorithm.digest_size:
            try:
                Digest.from_hex(name, self.algorithm)
            except DigestError:
                pass
            else:
                return self._resolve_link("images", name, "image")
        if not name.startswith("refs/"):
            name = f"refs/{name}"
        return self._resolve_link("images", name, "image")

    def open_image(self, name: str) -> tuple[Digest, int]:
        """Resolve an image name and open its object read-only: ``(digest, fd)``.

        An image named by its digest in a secure repository is measured first (the
        kernel's fs-verity digest must equal the name), as composefs-rs does.
        """
        digest = self.resolve_image(name)
        by_digest = "/" not in name and name == digest.hex()
        return digest, self.open_object(digest, verify=by_digest and not self.insecure)

    def list_images(self) -> dict[str, Digest]:
        """Every ``images/<hex>`` link that names an object: ``{hex: digest}``."""
        out: dict[str, Digest] = {}
        n = 2 * self.algorithm.digest_size + 1
        for entry_name, target in _symlinks_in(self.dirfd, "images", recursive=False):
            if entry_name.startswith(".") or not target.startswith("../objects/"):
                continue
            try:
                digest = Digest.from_object_path(target[-n:], self.algorithm)
            except DigestError:
                continue
            if digest.hex() == entry_name:
                out[entry_name] = digest
        return out

    def list_image_refs(self) -> dict[str, str]:
        """Every ref under ``images/refs/``: ``{ref: image hex}`` (raw target if not an image)."""
        return self._list_refs("images")


@attrs.define(eq=False)
class ObjectTmpfile:
    """One object being written: an anonymous (or, as a fallback, named) temporary file.

    :meth:`write` the content, then :meth:`finish` to link it under its
    digest; leaving the ``with`` block without finishing discards it. Use
    from one thread at a time.

    Attributes:
        fd: the file descriptor (``O_RDWR`` until :meth:`finish`).
        name: the temporary name in ``objects/`` on the fallback path, else ``None``.
        size: bytes written so far.
    """

    repo: Repository = attrs.field(repr=False)
    fd: int
    name: str | None
    objects_fd: int = attrs.field(repr=False)
    size: int = 0
    _done: bool = attrs.field(default=False, init=False)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append all of ``data`` (loops over short writes)."""
        if self._done:
            raise InternalError("ObjectTmpfile.write() after finish() or abort()")
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view)
            self.size += n
            view = view[n:]

    def finish(self, digest: Digest | None = None) -> tuple[Digest, bool]:
        """Name the object by its digest and link it into ``objects/``.

        Where the kernel supports fs-verity, verity is enabled and the digest
        measured (``digest``, if given, must agree). Otherwise the repository
        must be insecure and ``digest`` (computed by the caller) is trusted, or
        the file is hashed here.

        Returns:
            ``(digest, already_present)``; when already present the new copy is
            discarded.

        Raises:
            DigestMismatchError: the measured digest differs from ``digest``.
            VerityUnsupportedError: a secure repository on a filesystem without
                fs-verity.
        """
        if self._done:
            raise InternalError("ObjectTmpfile.finish() after finish() or abort()")
        repo = self.repo
        try:
            if digest is not None:
                repo._check_algorithm(digest)
            if repo.verity_supported:
                actual = self._enable_and_measure()
                if digest is not None and actual != digest:
                    raise DigestMismatchError(
                        f"object written to {repo.path}/objects has fs-verity digest {actual},"
                        f" not the expected {digest}"
                    )
            elif not repo.insecure:
                raise VerityUnsupportedError(
                    f"the filesystem holding {repo.path} lacks fs-verity support, which this"
                    " secure repository requires (use --insecure)"
                )
            elif digest is not None:
                actual = digest
            else:
                actual = digest_fd(self.fd, self.size, repo.algorithm)
            present = self._link(actual)
        except BaseException:
            self.abort()
            raise
        self._close()
        return actual, present

    def _enable_and_measure(self) -> Digest:
        repo = self.repo
        self._make_readonly()
        result = repo.verity_ops.enable_with_retry(self.fd, repo.algorithm)
        if result is EnableResult.BUSY:
            self._replace_with_copy()
            result = repo.verity_ops.enable_with_retry(self.fd, repo.algorithm)
            if result is EnableResult.BUSY:
                raise RepositoryError(
                    f"cannot enable fs-verity on a new object in {repo.path}: a writable"
                    " file descriptor to it is still open (ETXTBSY), even after copying"
                )
        if result is EnableResult.NOT_SUPPORTED:
            raise VerityUnsupportedError(
                f"enabling fs-verity on an object in {repo.path} failed: not supported"
            )
        measured = repo.verity_ops.measure(self.fd, repo.algorithm)
        if measured is None:
            raise RepositoryError(
                f"fs-verity was enabled on a new object in {repo.path} but cannot be measured"
            )
        return measured

    def _make_readonly(self) -> None:
        ro = _reopen_readonly(self.fd)
        os.close(self.fd)
        self.fd = ro

    def _replace_with_copy(self) -> None:
        """Copy the data into a fresh temporary file (last resort against ETXTBSY)."""
        fd, name, _ = self.repo._create_tmp()
        try:
            _copy_fd(self.fd, fd)
            ro = _reopen_readonly(fd)
        except BaseException:
            os.close(fd)
            if name is not None:
                _unlink_quietly(self.objects_fd, name)
            raise
        os.close(fd)
        self._close()
        self.fd, self.name, self._done = ro, name, False

    def _link(self, digest: Digest) -> bool:
        """Link under ``XX/rest``; True when an entry of that name was already there.

        Any existing entry counts as present (whatever its size or kind: ``fsck``
        judges it, not the writer), and the new copy is discarded. The link is
        tried first; only when ``XX/`` is missing (``ENOENT``) is it made and the
        link tried once more: one syscall for a new object in a seen directory.
        """
        path = digest.object_path()
        try:
            return self._link_once(path)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path[:2], 0o755, dir_fd=self.objects_fd)
        return self._link_once(path)

    def _link_once(self, path: str) -> bool:
        objects = self.objects_fd
        if self.name is not None:
            try:
                if _renameat2_noreplace(objects, self.name, path):
                    self.name = None
                    return False
                os.link(self.name, path, src_dir_fd=objects, dst_dir_fd=objects)
            except FileExistsError:
                return True
            _unlink_quietly(objects, self.name)
            self.name = None
            return False
        try:
            link_tmpfile(objects, self.fd, path)  # AT_EMPTY_PATH where allowed, else /proc
        except FileExistsError:
            return True
        return False

    def _close(self) -> None:
        if self._done:
            return
        self._done = True
        os.close(self.fd)
        if self.name is not None:
            _unlink_quietly(self.objects_fd, self.name)
            self.name = None

    def abort(self) -> None:
        """Discard the object (idempotent): close, and unlink a fallback name."""
        self._close()

    def __enter__(self) -> ObjectTmpfile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _entry_kind(dirfd: int, name: str) -> str:
    try:
        mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
    except OSError:
        return "an unreadable entry"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISREG(mode):
        return "a regular file"
    return f"an entry of mode {mode:o}"


@attrs.frozen
class ObjectEntry:
    """One entry of an ``objects/XX/`` directory.

    Attributes:
        path: ``XX/<rest>``, relative to ``objects/``.
        digest: the object's name parsed as a digest, ``None`` if it is not one.
        mode: ``st_mode`` (not following a symlink).
        size: ``st_size``.
    """

    path: str
    digest: Digest | None
    mode: int
    size: int


@attrs.frozen
class RefEntry:
    """One non-directory entry under ``streams/refs`` or ``images/refs``.

    Attributes:
        path: repository-relative (``streams/refs/oci/tag``).
        mode: ``st_mode`` (not following a symlink).
        target: the symlink's target, ``None`` when it is not a symlink.
    """

    path: str
    mode: int
    target: str | None

    @property
    def is_tmp(self) -> bool:
        """A ``.symlink-*`` leftover of an interrupted atomic replace."""
        return posixpath.basename(self.path).startswith(TMP_SYMLINK_PREFIX)


def _link_target_path(link: str, target: str) -> str:
    """Where the relative symlink ``link`` -> ``target`` points, repository-relative and
    normalised lexically (``..`` or ``../…`` when it leaves the repository)."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(link), target))


def _digest_of(data: bytes, algorithm: Algorithm) -> Digest:
    hasher = FsVerityHasher(algorithm)
    hasher.update(data)
    return hasher.digest()


def _exists(dirfd: int, rel: str) -> bool:
    try:
        os.stat(rel, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink_quietly(dirfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dirfd)


def _read_all(fd: int) -> bytes:
    parts = []
    offset = 0
    while chunk := os.pread(fd, _READ_CHUNK, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _open_meta(dirfd: int, spath: str) -> int | None:
    """Open ``meta.json`` without following a symlink or blocking on a FIFO;
    ``None`` when it is absent.

    Raises:
        RepositoryError: it is not a regular file, or cannot be opened.
    """
    where = posixpath.join(spath, META_JSON)
    try:
        fd = os.open(
            META_JSON, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd
        )
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RepositoryError(f"{where} is a symbolic link, not a regular file") from None
        raise RepositoryError(f"cannot open {where}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise RepositoryError(f"{where} is {kind}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_meta_bytes(fd: int, spath: str) -> bytes:
    """At most :data:`MAX_META_BYTES` + 1 bytes of ``meta.json`` (so a bigger one is told)."""
    try:
        return os.pread(fd, MAX_META_BYTES + 1, 0)
    except OSError as e:
        raise RepositoryError(
            f"cannot read {posixpath.join(spath, META_JSON)}: {e.strerror}"
        ) from None


def _read_meta(dirfd: int, spath: str) -> RepoMetadata | None:
    fd = _open_meta(dirfd, spath)
    if fd is None:
        return None
    try:
        return RepoMetadata.from_json(
            _read_meta_bytes(fd, spath), source=posixpath.join(spath, META_JSON)
        )
    finally:
        os.close(fd)


def _write_meta(dirfd: int, meta: RepoMetadata, *, enable_verity: bool, ops: VerityOps) -> None:
    """Write ``meta.json`` atomically (O_TMPFILE + linkat), fs-verity on it when secure.

    Raises FileExistsError when it already exists.
    """
    data = meta.to_json()
    try:
        fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
        named = False
    except OSError as e:
        if e.errno not in _NO_TMPFILE_ERRNOS:
            raise
        fd = os.open(
            META_JSON, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dirfd
        )
        named = True
    ro = -1
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        ro = _reopen_readonly(fd)
        os.close(fd)
        fd = -1
        if enable_verity:
            result = ops.enable_with_retry(ro, meta.algorithm)
            if result is EnableResult.NOT_SUPPORTED:
                raise VerityUnsupportedError("the filesystem lacks fs-verity support")
            if result is EnableResult.BUSY:
                raise RepositoryError("cannot enable fs-verity on meta.json: file busy")
        if not named:
            os.link(_proc_fd(ro), META_JSON, dst_dir_fd=dirfd, follow_symlinks=True)
    except BaseException:
        if named:
            _unlink_quietly(dirfd, META_JSON)
        raise
    finally:
        for f in (fd, ro):
            if f >= 0:
                os.close(f)


def _replace_symlink(dirfd: int, target: str, name: str) -> None:
    """Make ``name`` a symlink to ``target``, atomically replacing a different one."""
    try:
        os.symlink(target, name, dir_fd=dirfd)
        return
    except FileExistsError:
        pass
    try:
        if os.readlink(name, dir_fd=dirfd) == target:
            return
    except OSError:
        pass  # not a symlink: let rename report it
    parent = posixpath.dirname(name)
    for _ in range(16):
        tmp = posixpath.join(parent, _random_name(TMP_SYMLINK_PREFIX))
        try:
            os.symlink(target, tmp, dir_fd=dirfd)
        except FileExistsError:
            continue
        try:
            os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            _unlink_quietly(dirfd, tmp)
            raise
        return
    raise RepositoryError(f"cannot find a free temporary symlink name next to {name}")


def _symlinks_in(dirfd: int, rel: str, *, recursive: bool) -> list[tuple[str, str]]:
    """``(path relative to rel, target)`` for every symlink under ``rel``.

    Iterative (a ref tree of any depth), and never following a symlinked
    directory: each directory is opened with ``O_NOFOLLOW|O_DIRECTORY``.

    Raises:
        UnsafeLayoutError: ``rel`` (or a component of it) is not a real directory.
    """
    out: list[tuple[str, str]] = []
    top = _open_dir_nofollow(dirfd, rel)
    if top is None:
        return out
    stack: list[tuple[int, str]] = [(top, "")]
    try:
        while stack:
            cur, prefix = stack.pop()
            try:
                with os.scandir(cur) as it:
                    entries = sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in it)
                for name, mode in entries:
                    if stat.S_ISLNK(mode):
                        out.append((prefix + name, os.readlink(name, dir_fd=cur)))
                    elif recursive and stat.S_ISDIR(mode):
                        with contextlib.suppress(OSError):
                            sub = os.open(name, _DIR_NOFOLLOW, dir_fd=cur)
                            stack.append((sub, f"{prefix}{name}/"))
            finally:
                os.close(cur)
    finally:
        for f, _ in stack:
            os.close(f)
    return out


def _open_dir_nofollow(dirfd: int, rel: str, where: str = "") -> int | None:
    """Open ``rel`` component by component without following symlinks (``None``: absent)."""
    fd = os.dup(dirfd)
    done: list[str] = []
    for part in rel.split("/"):
        done.append(part)
        try:
            nxt = os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            os.close(fd)
            return None
        except OSError as e:
            kind = _entry_kind(fd, part)
            os.close(fd)
            path = "/".join(done)
            raise UnsafeLayoutError(
                f"{where}{path}: {kind} where the repository keeps a directory"
                " (not followed; replace it with a real directory or remove it)",
                path=path,
            ) from e
        os.close(fd)
        fd = nxt
    return fd
