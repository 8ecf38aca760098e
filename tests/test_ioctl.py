"""The fs-verity ioctl layer: struct layout, errno mapping, the real kernel, the simulation."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trio_composefs import DigestMismatchError, RepositoryError, VerityUnsupportedError
from trio_composefs.formats import Algorithm, Digest, fsverity_digest
from trio_composefs.repository._verity import (
    ENABLE_ARG,
    FS_IOC_ENABLE_VERITY,
    FS_IOC_MEASURE_VERITY,
    EnableResult,
    SimulatedVerityKernel,
    VerityOps,
)


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """The Linux _IOC() macro (asm-generic/ioctl.h)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


def test_request_numbers_follow_the_ioc_macro() -> None:
    # _IOW('f', 133, struct fsverity_enable_arg /* 128 bytes */)
    assert _ioc(1, "f", 133, 128) == FS_IOC_ENABLE_VERITY == 0x40806685
    # _IOWR('f', 134, struct fsverity_digest /* header: 4 bytes */)
    assert _ioc(3, "f", 134, 4) == FS_IOC_MEASURE_VERITY == 0xC0046686
    assert ENABLE_ARG.size == 128


class Recorder:
    """A raw ioctl that records its arguments and fails or answers as told."""

    def __init__(self, fail: int | None = None, answer: bytes | None = None) -> None:
        self.fail = fail
        self.answer = answer
        self.seen: list[tuple[int, int, bytes]] = []

    def __call__(self, fd: int, request: int, buf: bytearray) -> None:
        self.seen.append((fd, request, bytes(buf)))
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        if self.answer is not None:
            buf[: len(self.answer)] = self.answer


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_enable_argument_bytes(algorithm: Algorithm) -> None:
    rec = Recorder()
    assert VerityOps(rec).enable(7, algorithm) is EnableResult.ENABLED
    [(fd, request, arg)] = rec.seen
    assert (fd, request) == (7, FS_IOC_ENABLE_VERITY)
    expected = (
        (1).to_bytes(4, "little")  # version
        + algorithm.kernel_id.to_bytes(4, "little")
        + (4096).to_bytes(4, "little")  # block size
        + bytes(128 - 12)  # salt size, salt ptr, sig size, reserved, sig ptr, reserved[11]
    )
    assert arg == expected


@pytest.mark.parametrize(
    ("code", "result"),
    [
        (errno.ENOTTY, EnableResult.NOT_SUPPORTED),
        (errno.EOPNOTSUPP, EnableResult.NOT_SUPPORTED),
        (errno.EEXIST, EnableResult.ALREADY_ENABLED),
        (errno.ETXTBSY, EnableResult.BUSY),
    ],
)
def test_enable_errno_mapping(code: int, result: EnableResult) -> None:
    assert VerityOps(Recorder(fail=code)).enable(3, Algorithm.SHA256) is result


def test_enable_other_errno_is_a_clear_error() -> None:
    with pytest.raises(RepositoryError, match=r"enabling fs-verity failed: .*denied"):
        VerityOps(Recorder(fail=errno.EACCES)).enable(3, Algorithm.SHA256)


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_measure_argument_and_answer(algorithm: Algorithm) -> None:
    raw = bytes(range(algorithm.digest_size))
    header = algorithm.kernel_id.to_bytes(2, "little") + algorithm.digest_size.to_bytes(2, "little")
    rec = Recorder(answer=header + raw)
    assert VerityOps(rec).measure(5, algorithm) == Digest(algorithm, raw)
    [(fd, request, buf)] = rec.seen
    assert (fd, request) == (5, FS_IOC_MEASURE_VERITY)
    assert buf == header + bytes(algorithm.digest_size)


def test_measure_errno_mapping() -> None:
    assert VerityOps(Recorder(fail=errno.ENODATA)).measure(3, Algorithm.SHA256) is None
    for code in (errno.ENOTTY, errno.EOPNOTSUPP):
        with pytest.raises(VerityUnsupportedError, match="does not support fs-verity"):
            VerityOps(Recorder(fail=code)).measure(3, Algorithm.SHA256)
    with pytest.raises(DigestMismatchError, match="larger than 32 bytes"):
        VerityOps(Recorder(fail=errno.EOVERFLOW)).measure(3, Algorithm.SHA256)
    with pytest.raises(RepositoryError, match="measuring fs-verity failed"):
        VerityOps(Recorder(fail=errno.EIO)).measure(3, Algorithm.SHA256)


def test_measure_refuses_another_algorithm_or_size() -> None:
    # The kernel reports SHA-256 (id 1, 32 bytes) while we asked for SHA-512.
    answer = (1).to_bytes(2, "little") + (32).to_bytes(2, "little") + bytes(32)
    with pytest.raises(DigestMismatchError, match="algorithm id 1"):
        VerityOps(Recorder(answer=answer)).measure(3, Algorithm.SHA512)
    answer = (2).to_bytes(2, "little") + (32).to_bytes(2, "little")
    with pytest.raises(DigestMismatchError):
        VerityOps(Recorder(answer=answer)).measure(3, Algorithm.SHA512)


def test_enable_with_retry_retries_busy_three_times() -> None:
    rec = Recorder(fail=errno.ETXTBSY)
    assert VerityOps(rec).enable_with_retry(3, Algorithm.SHA256) is EnableResult.BUSY
    assert len(rec.seen) == 3


@pytest.fixture
def simulate() -> Iterator[Callable[..., SimulatedVerityKernel]]:
    """Build simulated kernels; release their pinned fds afterwards."""
    made: list[SimulatedVerityKernel] = []

    def make(supported: bool = True, busy_failures: int = 0) -> SimulatedVerityKernel:
        made.append(SimulatedVerityKernel(supported=supported, busy_failures=busy_failures))
        return made[-1]

    yield make
    for kernel in made:
        kernel.close()


@pytest.fixture
def ro_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = b"fs-verity " * 1000
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    yield fd, data
    os.close(fd)


def test_real_kernel_reports_not_supported_cleanly(ro_file: tuple[int, bytes]) -> None:
    fd, data = ro_file
    ops = VerityOps()
    result = ops.enable(fd, Algorithm.SHA256)
    if result is EnableResult.ENABLED:  # pragma: no cover - a kernel with fs-verity
        assert ops.measure(fd, Algorithm.SHA256) == fsverity_digest(data, Algorithm.SHA256)
        return
    # This test machine's kernel has no fs-verity: both ioctls say so, no crash.
    assert result is EnableResult.NOT_SUPPORTED
    with pytest.raises(VerityUnsupportedError):
        ops.measure(fd, Algorithm.SHA256)


def test_simulated_kernel_retry_then_success(
    simulate: Callable[..., SimulatedVerityKernel], ro_file: tuple[int, bytes]
) -> None:
    fd, data = ro_file
    kernel = simulate(busy_failures=2)
    ops = VerityOps(kernel)
    assert ops.measure(fd, Algorithm.SHA512) is None
    assert ops.enable_with_retry(fd, Algorithm.SHA512) is EnableResult.ENABLED
    assert [c for c, _ in kernel.calls].count("enable") == 3
    assert ops.measure(fd, Algorithm.SHA512) == fsverity_digest(data, Algorithm.SHA512)
    assert ops.enable(fd, Algorithm.SHA512) is EnableResult.ALREADY_ENABLED


def test_simulated_kernel_busy_while_a_writable_fd_is_open(
    simulate: Callable[..., SimulatedVerityKernel], tmp_path: Path
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    writer = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    reader = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ops = VerityOps(simulate())
        assert ops.enable_with_retry(reader, Algorithm.SHA256) is EnableResult.BUSY
        os.close(writer)
        writer = -1
        assert ops.enable(reader, Algorithm.SHA256) is EnableResult.ENABLED
    finally:
        for fd in (writer, reader):
            if fd >= 0:
                os.close(fd)


def test_simulated_kernel_other_algorithm_is_refused(
    simulate: Callable[..., SimulatedVerityKernel], ro_file: tuple[int, bytes]
) -> None:
    fd, _ = ro_file
    ops = VerityOps(simulate())
    assert ops.enable(fd, Algorithm.SHA512) is EnableResult.ENABLED
    with pytest.raises(DigestMismatchError):  # EOVERFLOW: 64-byte digest, 32-byte buffer
        ops.measure(fd, Algorithm.SHA256)


def test_simulated_kernel_unsupported(
    simulate: Callable[..., SimulatedVerityKernel], ro_file: tuple[int, bytes]
) -> None:
    fd, _ = ro_file
    ops = VerityOps(simulate(supported=False))
    assert ops.enable(fd, Algorithm.SHA256) is EnableResult.NOT_SUPPORTED
    with pytest.raises(VerityUnsupportedError):
        ops.measure(fd, Algorithm.SHA256)


@pytest.mark.skipif(shutil.which("fsverity") is None, reason="the fsverity tool is not installed")
@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 128 * 4096 + 1])
def test_simulated_kernel_agrees_with_fsverity_tool(
    simulate: Callable[..., SimulatedVerityKernel], tmp_path: Path, size: int
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\x5a" * size)
    out = subprocess.run(
        ["fsverity", "digest", "--hash-alg=sha512", "--block-size=4096", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    expected = out.split()[0].removeprefix("sha512:")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ops = VerityOps(simulate())
        assert ops.enable(fd, Algorithm.SHA512) is EnableResult.ENABLED
        measured = ops.measure(fd, Algorithm.SHA512)
    finally:
        os.close(fd)
    assert measured is not None
    assert measured.hex() == expected
