"""The fault points of ``trio_composefs.testing``: each fires where it says, and what it guarantees.

Source faults are checked byte for byte against the bytes that went in; ``nth`` at the
source against the pull's documented order (largest blob first, ``layer_jobs=1``); the hash
worker fault against the one-shot hasher; the leak checker against leaks made on purpose.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from trio_composefs import ComposefsError, FormatError, Repository
from trio_composefs.formats import Algorithm, fsverity_digest
from trio_composefs.hashing._pool import HashPool
from trio_composefs.oci import open_source, parse_source, pull_image
from trio_composefs.testing import (
    FaultyRepository,
    FaultySource,
    FaultyStream,
    ImportChecker,
    LeakError,
    write_sample_layout,
)

DATA = random.Random(15).randbytes(100_000)


class pieces_of:
    """``data`` in pieces of ``size`` bytes (an iterator, not a generator: nothing to close)."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size, self.pos = data, size, 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.pos >= len(self.data):
            raise StopAsyncIteration
        self.pos += self.size
        return self.data[self.pos - self.size : self.pos]


async def collect(stream: FaultyStream) -> bytes:
    return b"".join([piece async for piece in stream])


PIECES = [13, 4096, 65_537, len(DATA)]
OFFSETS = [0, 1, 4095, 4096, 65_537, 65_539, len(DATA) - 1, len(DATA)]


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("offset", OFFSETS)
async def test_stream_fail_after_exactly_n_bytes(piece: int, offset: int) -> None:
    stream = FaultyStream(pieces_of(DATA, piece), where="test")
    stream.fail(after_bytes=offset, errno=errno.ECONNRESET)
    got = bytearray()

    async def read() -> None:
        async for p in stream:
            got.extend(p)

    with pytest.raises(ConnectionResetError, match=f"injected after {offset} bytes of test"):
        await read()
    assert bytes(got) == DATA[:offset]


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("offset", OFFSETS)
async def test_stream_truncate_and_flip(piece: int, offset: int) -> None:
    cut = FaultyStream(pieces_of(DATA, piece))
    cut.truncate(after_bytes=offset)
    assert await collect(cut) == DATA[:offset]

    flipped = FaultyStream(pieces_of(DATA, piece))
    fault = flipped.flip(at_byte=offset, mask=0x80)
    out = await collect(flipped)
    expected = bytearray(DATA)
    if offset < len(DATA):
        expected[offset] ^= 0x80
    assert out == bytes(expected)
    assert fault.fired == (offset < len(DATA))  # past the end: never fires


async def test_stream_stall_holds_at_the_offset_until_released() -> None:
    stream = FaultyStream(pieces_of(DATA, 10_000))
    gate = stream.stall(after_bytes=54_321)
    got = bytearray()

    async def read() -> None:
        async for p in stream:
            got.extend(p)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await gate.wait_reached()
        await trio.sleep(0.05)
        assert len(got) == 54_321  # exactly, and no further while stalled
        gate.release()
    assert bytes(got) == DATA


async def test_stream_stall_is_cancellable() -> None:
    stream = FaultyStream(pieces_of(DATA, 10_000))
    gate = stream.stall(after_bytes=5)
    with trio.move_on_after(0.2) as scope:
        await collect(stream)
    assert scope.cancelled_caught
    assert gate.is_reached


@pytest.fixture
def sample(tmp_path: Path) -> tuple[str, list[dict[str, object]]]:
    """The sample layout's reference and its manifest's layer descriptors."""
    ref = write_sample_layout(tmp_path / "sample")
    index = json.loads((tmp_path / "sample/index.json").read_bytes())
    blobs = tmp_path / "sample/blobs/sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    return ref, manifest["layers"]


def open_repo(path: Path) -> Repository:
    repo = Repository.init(path, insecure=True)
    repo.begin_object().abort()
    return repo


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


@pytest.mark.parametrize("nth", [1, 2, 3])
async def test_source_nth_counts_blobs_in_the_pulls_order(
    sample: tuple[str, list[dict[str, object]]], tmp_path: Path, nth: int
) -> None:
    ref, layers = sample
    # the documented order: largest blob first (one at a time with layer_jobs=1)
    order = [str(d["digest"]) for d in sorted(layers, key=lambda d: -int(str(d["size"])))]
    with open_repo(tmp_path / "repo") as repo:
        checker = ImportChecker(repo)
        source = FaultySource(open_source(parse_source(ref)))
        source.fail(nth=nth, after_bytes=1000)
        with pytest.RaisesGroup(ConnectionResetError, flatten_subgroups=True) as caught:
            async with source:
                await pull_image(repo, source, tag="t", layer_jobs=1)
        (error,) = leaves(caught.value)
        assert f"blob {order[nth - 1]} (#{nth})" in str(error)
        assert source.blobs_opened == nth
        checker.assert_nothing_published()
        await checker.assert_consistent()
        checker.assert_no_leaks()
        # the same source, the fault spent: the pull completes
        async with source:
            stats = await pull_image(repo, source, tag="t", layer_jobs=1)
        assert stats.layers_imported == 3 - (nth - 1)


async def test_source_flip_is_a_digest_mismatch_naming_the_layer(
    sample: tuple[str, list[dict[str, object]]], tmp_path: Path
) -> None:
    ref, layers = sample
    plain = next(d for d in layers if str(d["mediaType"]).endswith(".tar"))
    with open_repo(tmp_path / "repo") as repo:
        checker = ImportChecker(repo)
        source = FaultySource(open_source(parse_source(ref)))
        source.flip(digest=str(plain["digest"]), at_byte=600_000)
        with pytest.RaisesGroup(
            pytest.RaisesExc(ComposefsError, match=str(plain["digest"])), flatten_subgroups=True
        ):
            async with source:
                await pull_image(repo, source, tag="t")
        checker.assert_nothing_published()
        await checker.assert_consistent()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
async def test_decompression_fault(
    sample: tuple[str, list[dict[str, object]]], tmp_path: Path, compression: str
) -> None:
    ref, layers = sample
    layer = next(d for d in layers if str(d["mediaType"]).endswith(compression))
    with open_repo(tmp_path / "repo") as repo:
        checker = ImportChecker(repo)
        faulty = FaultyRepository(repo).fail_decompression(
            compression=compression,  # type: ignore[arg-type]
            after_bytes=70_000,
        )
        with pytest.RaisesGroup(
            pytest.RaisesExc(FormatError, match=f"cannot decompress \\({compression}\\)"),
            flatten_subgroups=True,
        ) as caught:
            async with open_source(parse_source(ref)) as source:
                await pull_image(faulty, source, tag="t")
        (error,) = leaves(caught.value)
        assert str(layer["digest"]) in str(error)  # names the layer
        assert faulty.count("decompress") >= 1
        checker.assert_nothing_published()
        await checker.assert_consistent()
        checker.assert_no_leaks()
        async with open_source(parse_source(ref)) as source:
            stats = await pull_image(faulty, source, tag="t")  # spent: the next pull works
        assert stats.image is not None


def test_hash_job_fault_kills_mid_file_and_the_pool_recovers(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(5 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = fsverity_digest(data, Algorithm.SHA256)
    faulty = FaultyRepository(None)
    fd = os.open(path, os.O_RDONLY)
    try:
        with HashPool(2, threshold=0, inline_below=0) as pool:
            for nth in (1, 2):  # the first job of the split file, and the second
                done: list[object] = []

                def run(nth: int = nth, done: list[object] = done) -> None:
                    faulty._faults.clear()
                    faulty.kill_hash_worker(nth=faulty.count("hash") + nth)
                    try:
                        pool.digest_fd(fd, len(data))
                    except ComposefsError as e:
                        done.append(e)

                worker = threading.Thread(target=run)
                worker.start()
                worker.join(60)
                assert not worker.is_alive(), "the pool hung on a dead worker"
                (error,) = done
                assert "died (exit code -9)" in str(error)
                # the pool replaced the worker: the next call is right
                assert pool.digest_fd(fd, len(data)) == expected
            assert pool.statistics().workers_replaced == 2
            assert pool.digest_fds([(fd, 100_000), (fd, 200_000)]) == [
                fsverity_digest(data[:100_000], Algorithm.SHA256),
                fsverity_digest(data[:200_000], Algorithm.SHA256),
            ]
    finally:
        os.close(fd)


def test_checker_finds_leaks_of_each_kind(tmp_path: Path) -> None:
    checker = ImportChecker(grace=0.2)
    assert checker.leaks() == []
    fd = os.open(tmp_path, os.O_RDONLY)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="leaky")
    thread.start()
    child = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(LeakError) as caught:
            checker.assert_no_leaks()
        text = str(caught.value)
        assert f"file descriptor {fd} -> {tmp_path}" in text
        assert "thread 'leaky'" in text
        assert f"child process {child.pid} (sleep 30)" in text
    finally:
        os.close(fd)
        stop.set()
        thread.join()
        child.kill()
        child.wait()
    time.sleep(0.01)
    checker.assert_no_leaks()


def test_published_names_oracle(tmp_path: Path) -> None:
    empty = "oci-layer-sha256:" + hashlib.sha256(b"").hexdigest()
    with open_repo(tmp_path / "repo") as repo:
        checker = ImportChecker(repo)
        digest = repo.store_object(b"x" * 100)
        repo.publish_stream(empty, digest)
        assert checker.published_since() == [f"streams/{empty} -> {digest.hex()}"]
        checker.assert_nothing_published()  # a complete layer's name is allowed by default
        with pytest.raises(AssertionError, match=f"streams/{empty}"):
            checker.assert_nothing_published(except_layers=False)
        repo.publish_stream(empty, digest, "r")
        with pytest.raises(AssertionError, match=f"streams/refs/r -> {empty}"):
            checker.assert_nothing_published()
