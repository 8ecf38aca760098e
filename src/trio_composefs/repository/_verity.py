"""The Linux fs-verity ioctls: FS_IOC_ENABLE_VERITY and FS_IOC_MEASURE_VERITY.

Every call goes through a *raw ioctl* function, ``(fd, request, buffer) ->
None``, that fills ``buffer`` in place or raises :class:`OSError`. The default
is :func:`kernel_ioctl`; :class:`SimulatedVerityKernel` is a faithful stand-in
for kernels without fs-verity, so the decisions built on top (secure or
insecure, retry on ``ETXTBSY``, copy as a last resort) can be tested anywhere.

:class:`VerityOps` turns errno values into results:

* enabling gives an :class:`EnableResult` (``ENOTTY``/``EOPNOTSUPP`` → not
  supported, ``EEXIST`` → already enabled, ``ETXTBSY`` → busy);
* measuring gives a :class:`~trio_composefs.formats.Digest`, or ``None`` when
  the file has no fs-verity (``ENODATA``); a filesystem without support raises
  :class:`~trio_composefs._errors.VerityUnsupportedError`, and a file measured
  with another algorithm (``EOVERFLOW`` or a different algorithm id) raises
  :class:`~trio_composefs._errors.DigestMismatchError`.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
import struct
import threading
import time
from collections.abc import Callable

import attrs

from .._errors import DigestMismatchError, RepositoryError, VerityUnsupportedError
from ..formats._fsverity import BLOCK_SIZE, Algorithm, Digest
from ..hashing._fd import digest_fd

__all__ = [
    "FS_IOC_ENABLE_VERITY",
    "FS_IOC_MEASURE_VERITY",
    "EnableResult",
    "RawIoctl",
    "SimulatedVerityKernel",
    "VerityOps",
    "kernel_ioctl",
]

#: ``_IOW('f', 133, struct fsverity_enable_arg)``
FS_IOC_ENABLE_VERITY = 0x40806685
#: ``_IOWR('f', 134, struct fsverity_digest)`` (the 4-byte header only)
FS_IOC_MEASURE_VERITY = 0xC0046686

# struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size,
# salt_ptr, sig_size, __reserved1, sig_ptr, __reserved2[11]: 128 bytes.
ENABLE_ARG = struct.Struct("<IIIIQIIQ88x")
# struct fsverity_digest header: u16 digest_algorithm, u16 digest_size.
MEASURE_HEADER = struct.Struct("<HH")
MAX_DIGEST_SIZE = 64

RawIoctl = Callable[[int, int, bytearray], None]
"""``(fd, request, buffer)``: perform one ioctl, updating ``buffer`` in place."""

ENABLE_RETRIES = 3
ENABLE_RETRY_DELAY = 0.001


def kernel_ioctl(fd: int, request: int, buf: bytearray) -> None:
    """The real ioctl(2), through :func:`fcntl.ioctl` with a mutable buffer."""
    fcntl.ioctl(fd, request, buf, True)


class EnableResult(enum.Enum):
    """What FS_IOC_ENABLE_VERITY did."""

    ENABLED = "enabled"
    ALREADY_ENABLED = "already enabled"
    NOT_SUPPORTED = "filesystem does not support fs-verity"
    BUSY = "file is open for writing (ETXTBSY)"


@attrs.frozen
class VerityOps:
    """fs-verity enable and measure, over an injectable raw ioctl.

    Thread-safe as long as ``ioctl`` is.
    """

    ioctl: RawIoctl = kernel_ioctl

    def enable(self, fd: int, algorithm: Algorithm) -> EnableResult:
        """Enable fs-verity on ``fd`` (which must be read-only), 4096-byte blocks, no salt.

        Raises:
            RepositoryError: any other failure (the errno is in the message).
        """
        arg = bytearray(ENABLE_ARG.pack(1, algorithm.kernel_id, BLOCK_SIZE, 0, 0, 0, 0, 0))
        try:
            self.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                return EnableResult.NOT_SUPPORTED
            if e.errno == errno.EEXIST:
                return EnableResult.ALREADY_ENABLED
            if e.errno == errno.ETXTBSY:
                return EnableResult.BUSY
            raise RepositoryError(f"enabling fs-verity failed: {os.strerror(e.errno or 0)}") from e
        return EnableResult.ENABLED

    def enable_with_retry(self, fd: int, algorithm: Algorithm) -> EnableResult:
        """:meth:`enable`, retried up to 3 times 1 ms apart while the file is busy.

        A forked child can briefly hold an inherited writable fd; after the
        retries, ``BUSY`` is returned and the caller may copy the file.
        """
        result = self.enable(fd, algorithm)
        for _ in range(ENABLE_RETRIES - 1):
            if result is not EnableResult.BUSY:
                break
            time.sleep(ENABLE_RETRY_DELAY)
            result = self.enable(fd, algorithm)
        return result

    def measure(self, fd: int, algorithm: Algorithm) -> Digest | None:
        """The kernel's fs-verity digest of ``fd``, or ``None`` if it has no fs-verity.

        Raises:
            VerityUnsupportedError: the filesystem does not support fs-verity.
            DigestMismatchError: the file's fs-verity uses another algorithm.
            RepositoryError: any other failure.
        """
        size = algorithm.digest_size
        buf = bytearray(MEASURE_HEADER.pack(algorithm.kernel_id, size) + bytes(size))
        try:
            self.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
        except OSError as e:
            if e.errno == errno.ENODATA:
                return None
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                raise VerityUnsupportedError(
                    "measuring fs-verity failed: the filesystem does not support fs-verity"
                ) from e
            if e.errno == errno.EOVERFLOW:
                raise DigestMismatchError(
                    f"the file's fs-verity digest is larger than {size} bytes:"
                    f" it was not made with {algorithm}"
                ) from e
            raise RepositoryError(f"measuring fs-verity failed: {os.strerror(e.errno or 0)}") from e
        got_alg, got_size = MEASURE_HEADER.unpack_from(buf)
        if got_alg != algorithm.kernel_id or got_size != size:
            raise DigestMismatchError(
                f"the file's fs-verity uses hash algorithm id {got_alg} ({got_size}-byte digest),"
                f" not {algorithm} (id {algorithm.kernel_id}, {size} bytes)"
            )
        return Digest(algorithm, bytes(buf[MEASURE_HEADER.size : MEASURE_HEADER.size + size]))


def _raise(code: int) -> None:
    raise OSError(code, os.strerror(code))


@attrs.define(eq=False)
class SimulatedVerityKernel:
    """A raw ioctl that behaves like a kernel with fs-verity, for tests.

    Per inode it records the digest computed (in userspace) when verity is
    enabled. Like the kernel it refuses to enable verity with ``ETXTBSY`` while
    any writable fd to the file is open in this process, with ``EEXIST`` when
    it is already enabled, and it reports the recorded algorithm and size on
    measure (``EOVERFLOW`` if the caller's buffer is too small).

    It holds an ``O_PATH`` fd on every file it records, so that an inode number
    cannot be reused for another file while it remembers it; :meth:`close`
    (or leaving a ``with`` block) releases them.

    Attributes:
        supported: when false, every call fails with ``EOPNOTSUPP``.
        busy_failures: fail this many enable calls with ``ETXTBSY`` first.
        enabled: ``(st_dev, st_ino) -> Digest`` of every file with verity.
        calls: a log of ``("enable" | "measure", fd)``.
    """

    supported: bool = True
    busy_failures: int = 0
    enabled: dict[tuple[int, int], Digest] = attrs.field(factory=dict, repr=False)
    calls: list[tuple[str, int]] = attrs.field(factory=list, repr=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)
    _pins: list[int] = attrs.field(factory=list, init=False, repr=False)

    def close(self) -> None:
        """Release the fds that pin recorded inodes."""
        with self._lock:
            pins, self._pins = self._pins, []
        for fd in pins:
            os.close(fd)

    def __enter__(self) -> SimulatedVerityKernel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record(self, fd: int, key: tuple[int, int], digest: Digest) -> None:
        pin = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
        with self._lock:
            self.enabled[key] = digest
            self._pins.append(pin)

    def __call__(self, fd: int, request: int, buf: bytearray) -> None:
        if request == FS_IOC_ENABLE_VERITY:
            self.calls.append(("enable", fd))
            self._enable(fd, buf)
        elif request == FS_IOC_MEASURE_VERITY:
            self.calls.append(("measure", fd))
            self._measure(fd, buf)
        else:
            _raise(errno.ENOTTY)

    @staticmethod
    def _key(fd: int) -> tuple[int, int]:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino)

    def set_digest(self, fd: int, digest: Digest) -> None:
        """Pretend the file behind ``fd`` has verity with ``digest`` (to simulate corruption)."""
        self._record(fd, self._key(fd), digest)

    def _has_writer(self, key: tuple[int, int]) -> bool:
        for name in os.listdir("/proc/self/fd"):
            other = int(name)
            try:
                st = os.fstat(other)
                flags = fcntl.fcntl(other, fcntl.F_GETFL)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == key and flags & os.O_ACCMODE != os.O_RDONLY:
                return True
        return False

    def _enable(self, fd: int, buf: bytearray) -> None:
        if not self.supported:
            _raise(errno.EOPNOTSUPP)
        version, alg_id, block_size, salt_size, _, sig_size, _, _ = ENABLE_ARG.unpack(buf)
        if len(buf) != ENABLE_ARG.size or version != 1 or block_size != BLOCK_SIZE:
            _raise(errno.EINVAL)
        if salt_size or sig_size:
            _raise(errno.EINVAL)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            _raise(errno.EBADF)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            _raise(errno.EINVAL)
        algorithm = Algorithm.from_kernel_id(alg_id)
        key = self._key(fd)
        with self._lock:
            if key in self.enabled:
                _raise(errno.EEXIST)
            if self.busy_failures > 0:
                self.busy_failures -= 1
                _raise(errno.ETXTBSY)
        if self._has_writer(key):
            _raise(errno.ETXTBSY)
        self._record(fd, key, digest_fd(fd, None, algorithm))

    def _measure(self, fd: int, buf: bytearray) -> None:
        if not self.supported:
            _raise(errno.EOPNOTSUPP)
        with self._lock:
            digest = self.enabled.get(self._key(fd))
        if digest is None:
            _raise(errno.ENODATA)
            return
        _, room = MEASURE_HEADER.unpack_from(buf)
        size = digest.algorithm.digest_size
        if room < size:
            _raise(errno.EOVERFLOW)
        MEASURE_HEADER.pack_into(buf, 0, digest.algorithm.kernel_id, size)
        buf[MEASURE_HEADER.size : MEASURE_HEADER.size + size] = digest.raw
