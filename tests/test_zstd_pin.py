"""Why ``zstandard`` is pinned (``>=0.25,<0.26`` in pyproject.toml), as a test.

A splitstream holds its chunk sequence (tar headers and small files inline) as a
zstd frame, and a splitstream's id is the fs-verity digest of the whole file, so
the id depends on the exact bytes the zstd compressor emits. composefs-rs
compresses with libzstd at level 3, streaming, size unknown, no checksum; our
writer does the same with python-zstandard, whose wheels bundle their own libzstd
(1.5.7 in zstandard 0.25). The format does not fix those bytes: another libzstd
release may choose other matches or block splits for the same input and level,
and then every layer stream of a tar with much inline data gets another id than
composefs-rs gives it (the repository stays readable, but images pulled by the
two tools no longer share layer streams, and pinned ids stop matching).

The test input is a layer of thousands of small files (about 3 MiB of inline
data, many zstd blocks), where libzstd releases do differ: 1.5.4 (Debian 12's
system library) compresses its chunk stream to 119164 bytes, 1.5.7 to 119240.
The pinned splitstream id was derived from an independent computation: the
frame our writer stores is identical to the one ``backports.zstd`` (CPython's
``compression.zstd`` binding, with its own bundled libzstd 1.5.7) produces for
the same chunk sequence, and the id is the ``fsverity digest`` tool's digest of
the file. Upstream's own pinned splitstream ids (small layers, one zstd block)
are checked in ``test_splitstream.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import random
import shutil
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import zstandard

from trio_composefs import Repository
from trio_composefs.formats import parse_splitstream
from trio_composefs.importer import import_layer

#: The sha256 of :func:`many_small_files` (if it changes, the input changed, not zstd).
TAR_SHA256 = "e5126ced86dbb363b91fd237e5312016b7933b152116fbb75940c4cc597d744c"
#: The layer's splitstream id in a sha256 repository, with libzstd 1.5.7 (see above).
SPLITSTREAM_ID = "39b6e2509b30de06624d1e018dcc8ea14048f469e3f757dbc8bc4ee7b4d130e3"
#: The length of its compressed chunk stream with libzstd 1.5.7 and 1.5.4.
FRAME_LENGTH = {(1, 5, 7): 118372, (1, 5, 4): 118458}


def many_small_files() -> bytes:
    """A deterministic GNU tar of 3000 small text files (inline) and 30 of 4 KiB (objects)."""
    rng = random.Random(1)
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(3000):
            if i % 100 == 99:
                data = bytes(rng.randrange(256) for _ in range(4096))
            else:
                data = b" ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))[:64]
            info = tarfile.TarInfo(f"usr/share/files/dir{i % 37}/file-{i}.txt")
            info.size = len(data)
            info.mtime = 1_700_000_000 + i
            info.mode = 0o644
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def layer() -> bytes:
    tar = many_small_files()
    assert hashlib.sha256(tar).hexdigest() == TAR_SHA256, "the test input changed, not zstd"
    return tar


async def stored_splitstream(repo: Repository, tar: bytes) -> bytes:
    """Import ``tar`` with our writer; the splitstream file's bytes."""
    stats = await import_layer(repo, tar, "sha256:" + TAR_SHA256)
    return repo.read_object(stats.splitstream)


def chunk_frame(splitstream: bytes, repo: Repository) -> tuple[bytes, bytes]:
    """The stored zstd frame of the chunk stream, and the chunk stream it decompresses to."""
    info = parse_splitstream(splitstream, algorithm=repo.algorithm)
    start, end = info.stream_range
    frame = splitstream[start:end]
    return frame, zstandard.ZstdDecompressor().decompressobj().decompress(frame)


async def test_splitstream_id_is_pinned(repo: Repository, layer: bytes) -> None:
    stats = await import_layer(repo, layer, "sha256:" + TAR_SHA256)
    assert zstandard.ZSTD_VERSION == (1, 5, 7), (
        f"zstandard {zstandard.__version__} bundles libzstd {zstandard.ZSTD_VERSION}, not"
        " 1.5.7: splitstream ids may no longer match composefs-rs (see the module docstring)"
    )
    assert stats.splitstream.hex() == SPLITSTREAM_ID, (
        "the splitstream id changed: the zstd frames differ from libzstd 1.5.7's"
    )
    frame, _ = chunk_frame(repo.read_object(stats.splitstream), repo)
    assert len(frame) == FRAME_LENGTH[(1, 5, 7)]


def _stdlib_zstd() -> ModuleType:
    try:
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        zstd = pytest.importorskip("backports.zstd", reason="needs backports.zstd (test extra)")
    if zstd.zstd_version_info != (1, 5, 7):
        pytest.skip(f"compression.zstd uses libzstd {zstd.zstd_version_info}, not 1.5.7")
    return zstd  # type: ignore[no-any-return]


async def test_frames_equal_an_independent_libzstd_1_5_7(
    repo: Repository, layer: bytes, tmp_path: Path
) -> None:
    """CPython's zstd binding (its own libzstd 1.5.7 build), streaming at level 3 with
    no size pledged and no checksum, makes the frame our writer stored, byte for byte;
    ``fsverity digest`` of the file is the pinned id."""
    zstd = _stdlib_zstd()
    splitstream = await stored_splitstream(repo, layer)
    frame, chunks = chunk_frame(splitstream, repo)
    compressor = zstd.ZstdCompressor(level=3)
    pieces = [compressor.compress(chunks[i : i + 65536]) for i in range(0, len(chunks), 65536)]
    assert b"".join(pieces) + compressor.flush() == frame
    fsverity = shutil.which("fsverity")
    if fsverity is None:
        pytest.skip("fsverity (fsverity-utils) is not installed")
    (tmp_path / "ss").write_bytes(splitstream)
    done = await trio.run_process([fsverity, "digest", str(tmp_path / "ss")], capture_stdout=True)
    assert done.stdout.decode().split()[0] == f"sha256:{SPLITSTREAM_ID}"


def _system_libzstd() -> Any:
    name = ctypes.util.find_library("zstd")
    if name is None:
        pytest.skip("no system libzstd")
    lib = ctypes.CDLL(name)
    lib.ZSTD_versionNumber.restype = ctypes.c_uint
    lib.ZSTD_createCCtx.restype = ctypes.c_void_p
    lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
    lib.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
    lib.ZSTD_compressStream2.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int]
    lib.ZSTD_compressStream2.restype = ctypes.c_size_t
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    return lib


class _Buffer(ctypes.Structure):
    _fields_ = (("data", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t))


def _compress_with(lib: Any, data: bytes) -> bytes:
    """``ZSTD_compressStream2`` at level 3 (no size pledged, no checksum), as composefs-rs."""
    cctx = lib.ZSTD_createCCtx()
    try:
        assert not lib.ZSTD_isError(lib.ZSTD_CCtx_setParameter(cctx, 100, 3))  # compressionLevel
        src = ctypes.create_string_buffer(data, len(data))
        dst = ctypes.create_string_buffer(len(data) + (1 << 16))
        inb = _Buffer(ctypes.cast(src, ctypes.c_void_p), 0, 0)
        outb = _Buffer(ctypes.cast(dst, ctypes.c_void_p), len(dst), 0)
        # fed in pieces first (ZSTD_e_continue): ending at once would pledge the size
        while inb.size < len(data):
            inb.size = min(inb.size + 65536, len(data))
            assert not lib.ZSTD_isError(
                lib.ZSTD_compressStream2(cctx, ctypes.byref(outb), ctypes.byref(inb), 0)
            )
        while True:
            left = lib.ZSTD_compressStream2(cctx, ctypes.byref(outb), ctypes.byref(inb), 2)
            assert not lib.ZSTD_isError(left)
            if left == 0:
                return dst.raw[: outb.pos]
    finally:
        lib.ZSTD_freeCCtx(cctx)


async def test_input_tells_libzstd_versions_apart(repo: Repository, layer: bytes) -> None:
    """The pin has teeth: another libzstd (the system's, if it is not 1.5.7) compresses
    the same chunk stream at the same level and settings into other bytes."""
    lib = _system_libzstd()
    number = lib.ZSTD_versionNumber()
    version = (number // 10000, number // 100 % 100, number % 100)
    if version == (1, 5, 7):
        pytest.skip("the system libzstd is 1.5.7 too")
    frame, chunks = chunk_frame(await stored_splitstream(repo, layer), repo)
    theirs = _compress_with(lib, chunks)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(theirs) == chunks
    assert theirs != frame
    if version in FRAME_LENGTH:
        assert len(theirs) == FRAME_LENGTH[version]
