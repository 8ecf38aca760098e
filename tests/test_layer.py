"""The trio import pipeline: round trips, errors, cancellation and the fault matrix."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from checks import assert_consistent, busy_threads
from tarfixtures import chunks_from_events, split
from trio_composefs import DigestMismatchError, TarError
from trio_composefs.formats import Algorithm, ContentType, encode_splitstream, fsverity_digest
from trio_composefs.importer import LayerProgress, import_layer, layer_content_id, open_importer
from trio_composefs.repository import Repository, copy_stream
from trio_composefs.testing import FaultPoint, FaultyRepository, open_fds


def make_tar(files: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def diff_id_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def mixed_tar(seed: int = 0, big: int = 3 << 20) -> bytes:
    rnd = random.Random(seed)
    files = [
        (f"f{size}", rnd.randbytes(size))
        for size in (0, 1, 63, 64, 65, 511, 512, 513, 4096, 200 * 1024)
    ]
    files.append(
        ("dup-a", b"same content, more than sixty-four bytes long........................")
    )
    files.append(
        ("dup-b", b"same content, more than sixty-four bytes long........................")
    )
    files.append(("big", rnd.randbytes(big)))  # streamed through a channel (> SMALL_OBJECT_MAX)
    files.append(("tail", rnd.randbytes(100)))
    return make_tar(files)


def cat_bytes(repo: Repository, name: str) -> bytes:
    out = bytearray()
    copy_stream(repo, name, out.extend)
    return bytes(out)


async def test_round_trip_and_stats(repo: Repository) -> None:
    tar = mixed_tar()
    did = diff_id_of(tar)
    fds = open_fds()
    stats = await import_layer(repo, [tar], did)
    assert open_fds() == fds
    assert not stats.skipped
    # files over 64 bytes: 65, 511, 512, 513, 4096, 200K, dup-a, dup-b, big, tail
    assert stats.objects == 10
    assert stats.objects_written == 9
    assert stats.objects_deduplicated == 1
    assert repo.has_stream(layer_content_id(did)) == stats.splitstream
    assert cat_bytes(repo, layer_content_id(did)) == tar
    assert_consistent(Path(repo.path), repo.algorithm)

    again = await import_layer(repo, [tar], did)
    assert again.skipped
    assert again.splitstream == stats.splitstream


async def test_same_splitstream_whatever_the_limiter_or_pieces(repo: Repository) -> None:
    tar = mixed_tar(seed=5)
    did = diff_id_of(tar)
    first = await import_layer(repo, [tar], did, limiter=trio.CapacityLimiter(1))

    async def trickle() -> AsyncIterator[bytes]:
        rnd = random.Random(1)
        pos = 0
        while pos < len(tar):
            n = rnd.choice([1, 7, 511, 512, 513, 65536])
            yield tar[pos : pos + n]
            pos += n

    other = Repository.init(
        Path(repo.path).parent / "other", algorithm=Algorithm.SHA256, insecure=True
    )
    second = await import_layer(other, trickle(), did, limiter=trio.CapacityLimiter(8))
    assert first.splitstream == second.splitstream
    assert cat_bytes(other, layer_content_id(did)) == tar


async def test_sources(repo: Repository, tmp_path: Path) -> None:
    tar = mixed_tar(seed=2, big=1 << 20)
    did = diff_id_of(tar)
    path = tmp_path / "layer.tar"
    path.write_bytes(tar)
    with open(path, "rb") as f:  # noqa: ASYNC230 - a blocking file is one of the sources
        s1 = await import_layer(repo, f, did, name="from-file")
    fd = os.open(path, os.O_RDONLY)
    try:
        other = Repository.init(tmp_path / "r2", algorithm=Algorithm.SHA256, insecure=True)
        s2 = await import_layer(other, fd, did)
    finally:
        os.close(fd)
    async with await trio.open_file(path, "rb") as af:
        other3 = Repository.init(tmp_path / "r3", algorithm=Algorithm.SHA256, insecure=True)
        s3 = await import_layer(other3, af, did)
    send, receive = trio.testing.memory_stream_one_way_pair()

    async def pump() -> None:
        async with send:
            for i in range(0, len(tar), 100_000):
                await send.send_all(tar[i : i + 100_000])

    other4 = Repository.init(tmp_path / "r4", algorithm=Algorithm.SHA256, insecure=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        s4 = await import_layer(other4, receive, did)
    assert s1.splitstream == s2.splitstream == s3.splitstream == s4.splitstream
    assert repo.resolve_stream("refs/from-file") == s1.splitstream


async def test_progress_reports(repo: Repository) -> None:
    tar = mixed_tar(seed=3)
    seen: list[LayerProgress] = []
    await import_layer(repo, [tar], diff_id_of(tar), progress=seen.append)
    assert seen
    assert seen[-1].done
    assert seen[-1].bytes_read == len(tar)
    assert (seen[-1].objects_written, seen[-1].objects_deduplicated) == (9, 1)
    assert seen[-1].objects_in_flight == 0


async def test_diff_id_mismatch_publishes_nothing(repo: Repository) -> None:
    tar = mixed_tar()
    wrong = "sha256:" + "0" * 64
    with pytest.RaisesGroup(DigestMismatchError) as caught:
        await import_layer(repo, [tar], wrong)
    assert "sha256:" + hashlib.sha256(tar).hexdigest() in str(caught.value.exceptions[0])
    assert repo.has_stream(layer_content_id(wrong)) is None
    assert repo.list_streams() == {}
    assert_consistent(Path(repo.path), repo.algorithm)


async def test_malformed_diff_id_is_refused_before_reading(repo: Repository) -> None:
    with pytest.raises(DigestMismatchError, match="not a layer diff_id"):
        await import_layer(repo, [b""], "sha256:../../etc")


async def test_bad_tar_names_the_offset(repo: Repository) -> None:
    tar = bytearray(mixed_tar())
    tar[512 * 3 + 148] ^= 0x11  # corrupt a later header's checksum field
    with pytest.RaisesGroup(TarError):
        await import_layer(repo, [bytes(tar)], diff_id_of(bytes(tar)))
    assert repo.list_streams() == {}
    assert_consistent(Path(repo.path), repo.algorithm)


async def test_reader_error_propagates_and_cancels_writers(repo: Repository) -> None:
    tar = mixed_tar()

    async def broken() -> AsyncIterator[bytes]:
        yield tar[: len(tar) // 2]
        raise ConnectionResetError("the registry went away")

    fds = open_fds()
    with pytest.RaisesGroup(ConnectionResetError):
        await import_layer(repo, broken(), diff_id_of(tar))
    assert open_fds() == fds
    assert repo.list_streams() == {}
    assert_consistent(Path(repo.path), repo.algorithm)


# --- the fault matrix ----------------------------------------------------------------------

FAULTS: list[tuple[FaultPoint, int | None, int]] = [
    ("begin", 1, 0),
    ("begin", 4, 0),
    ("write", 1, 0),
    ("write", 3, 0),
    ("write", None, 2 << 20),  # the big object, 2 MiB in (it is streamed)
    ("finish", 1, 0),
    ("finish", 6, 0),
    ("begin", 11, 0),  # the splitstream object itself (10 file objects come first)
    ("sync", 1, 0),
    ("publish", 1, 0),
]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize(("point", "nth", "after"), FAULTS)
async def test_fault_matrix(
    repo: Repository, point: FaultPoint, nth: int | None, after: int, code: int
) -> None:
    tar = mixed_tar()
    did = diff_id_of(tar)
    faulty = FaultyRepository(repo).fail(point, nth=nth, errno=code, after_bytes=after)
    fds = open_fds()

    def is_ours(e: OSError) -> bool:
        return e.errno == code and "injected" in str(e)

    with pytest.RaisesGroup(pytest.RaisesExc(OSError, check=is_ours), allow_unwrapped=True):
        async with open_importer(faulty) as importer:
            await importer.import_layer([tar], did)
    assert open_fds() == fds
    assert repo.has_stream(layer_content_id(did)) is None
    assert_consistent(Path(repo.path), repo.algorithm)
    assert busy_threads() == []
    # the same import then succeeds and round-trips
    stats = await import_layer(repo, [tar], did)
    assert cat_bytes(repo, layer_content_id(did)) == tar
    assert not stats.skipped


PAUSES: list[tuple[FaultPoint, int | None, int]] = [
    ("begin", 2, 0),
    ("write", None, 2 << 20),  # inside the big streamed object
    ("finish", 3, 0),
    ("begin", 11, 0),  # the splitstream object
    ("sync", 1, 0),
    ("publish", 1, 0),
]


@pytest.mark.parametrize(("point", "nth", "after"), PAUSES)
async def test_cancel_at_every_stage(
    repo: Repository, point: FaultPoint, nth: int | None, after: int
) -> None:
    tar = mixed_tar()
    did = diff_id_of(tar)
    faulty = FaultyRepository(repo)
    gate = faulty.pause(point, nth=nth, after_bytes=after)
    fds = open_fds()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                async with open_importer(faulty) as importer:
                    await importer.import_layer([tar], did)

            nursery.start_soon(run)
            await gate.wait_reached()
            nursery.cancel_scope.cancel()
            gate.release()
    assert open_fds() == fds
    published = repo.has_stream(layer_content_id(did))
    if point == "publish":
        # linking the name had begun: the import completed, and what is named is complete
        assert published is not None
    else:
        # cancelled before its name appeared: nothing published
        assert published is None
    assert_consistent(Path(repo.path), repo.algorithm)
    stats = await import_layer(repo, [tar], did)
    assert cat_bytes(repo, layer_content_id(did)) == tar
    assert stats.skipped == (point == "publish")


async def test_slow_writes_still_complete(repo: Repository) -> None:
    tar = mixed_tar(big=1 << 20)
    faulty = FaultyRepository(repo, write_delay=0.002)
    async with open_importer(faulty, jobs=2) as importer:
        stats = await importer.import_layer([tar], diff_id_of(tar))
    assert stats.objects == 10


# --- sharing one limiter ---------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 3])
async def test_many_layers_share_one_limiter(repo: Repository, tokens: int) -> None:
    tars = [mixed_tar(seed=i, big=(1 << 20) + 1000 * i) for i in range(6)]
    limiter = trio.CapacityLimiter(tokens)
    results: dict[int, object] = {}
    with trio.fail_after(120):
        async with open_importer(repo, limiter=limiter) as importer, trio.open_nursery() as nursery:
            for i, tar in enumerate(tars):

                async def one(i: int = i, tar: bytes = tar) -> None:
                    results[i] = await importer.import_layer([tar], diff_id_of(tar))

                nursery.start_soon(one)
    assert len(results) == 6
    assert limiter.borrowed_tokens == 0
    for tar in tars:
        assert cat_bytes(repo, layer_content_id(diff_id_of(tar))) == tar


async def test_error_in_one_layer_cancels_the_others(repo: Repository) -> None:
    good = mixed_tar(seed=1, big=8 << 20)
    bad = bytearray(mixed_tar(seed=2))
    bad[148] ^= 0x01
    faulty = FaultyRepository(repo, write_delay=0.01)  # keep the good layer busy
    with pytest.RaisesGroup(TarError, flatten_subgroups=True):
        async with open_importer(faulty) as importer, trio.open_nursery() as nursery:
            nursery.start_soon(importer.import_layer, [good], diff_id_of(good))
            nursery.start_soon(importer.import_layer, [bytes(bad)], diff_id_of(bytes(bad)))
    assert repo.list_streams() == {}
    assert_consistent(Path(repo.path), repo.algorithm)


# --- the streamed builder writes what the one-shot encoder writes ----------------------------


def one_shot_splitstream_digest(tar: bytes) -> str:
    """The splitstream id computed without the pipeline: split, digest, encode in memory."""
    chunks, _objects = chunks_from_events(split(tar), fsverity_digest)
    data = encode_splitstream(
        chunks, algorithm=Algorithm.SHA256, content_type=ContentType.OCI_LAYER
    )
    return fsverity_digest(data).hex()


@pytest.mark.parametrize(
    "kind", ["mixed", "many-small-files", "small-then-big", "no-externals", "empty"]
)
async def test_streamed_splitstream_equals_one_shot_encoding(repo: Repository, kind: str) -> None:
    rnd = random.Random(kind)
    if kind == "mixed":
        tar = mixed_tar(seed=9)
    elif kind == "many-small-files":
        # ~12 MiB of inline run between two objects: the builder spills it to disk
        files = [(f"s/{i}", rnd.randbytes(rnd.randrange(65))) for i in range(12_000)]
        tar = make_tar([("first", rnd.randbytes(1000)), *files, ("last", rnd.randbytes(70))])
    elif kind == "small-then-big":
        files = [(f"s/{i}", rnd.randbytes(rnd.randrange(200))) for i in range(3000)]
        tar = make_tar([*files, ("big", rnd.randbytes(5 << 20))])
    elif kind == "no-externals":
        tar = make_tar([(f"s/{i}", rnd.randbytes(rnd.randrange(65))) for i in range(9000)])
    else:
        tar = b""
    stats = await import_layer(repo, [tar], diff_id_of(tar))
    assert stats.splitstream.hex() == one_shot_splitstream_digest(tar)
    assert cat_bytes(repo, layer_content_id(diff_id_of(tar))) == tar


# --- cancellation within a batch of small objects ---------------------------------------------

#: Seconds each object write sleeps: a batch of 32 small objects takes 1.6 s to write.
_SLOW_WRITE = 0.05
#: Worst overshoot of a deadline allowed: the write in progress (50 ms), the digests of a
#: batch already written, thread wake-ups, and a wide margin for a loaded 2-core machine.
#: Checking only between batches overshot by up to 32 writes (1.6 s here).
_OVERSHOOT_MAX = 0.6


@pytest.mark.parametrize("named", [False, True], ids=["O_TMPFILE", "named tmpfiles"])
async def test_deadline_holds_within_a_batch_of_small_objects(
    repo: Repository, named: bool
) -> None:
    rng = random.Random(7)
    tar = make_tar([(f"small/{i:04}", rng.randbytes(1000)) for i in range(400)])
    did = diff_id_of(tar)
    repo.force_named_tmpfile = named
    faulty = FaultyRepository(repo, write_delay=_SLOW_WRITE)
    fds = open_fds()
    overshoots = []
    for deadline in (0.3, 0.45, 0.7, 1.1):
        async with open_importer(faulty, hash_processes=0) as importer:
            start = trio.current_time()
            with trio.move_on_after(deadline) as scope:
                await importer.import_layer([tar], did)
            overshoots.append(trio.current_time() - start - deadline)
        assert scope.cancelled_caught
        assert faulty.count("write") < 400  # it really was cut short
    print(f"deadline overshoots (s): {', '.join(f'{o:.3f}' for o in overshoots)}")
    assert max(overshoots) < _OVERSHOOT_MAX, overshoots
    # nothing half-written is visible: every object is complete, no stream or stray tmpfile
    assert open_fds() == fds
    assert busy_threads() == []
    assert repo.has_stream(layer_content_id(did)) is None
    assert repo.find_stray_tmpfiles() == []
    assert_consistent(Path(repo.path), repo.algorithm)
    repo.force_named_tmpfile = False
    await import_layer(repo, [tar], did)
    assert cat_bytes(repo, layer_content_id(did)) == tar
