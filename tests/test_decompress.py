"""gzip layers decode to the same bytes, and import to the same splitstream, with ISA-L or zlib.

``importer._decompress`` uses ISA-L (``isal.igzip``) when it imports and falls back to
Python's zlib-based :mod:`gzip`; these tests force each in turn. The oracles: the tar the
gzip stream was made from (compressed by GNU ``gzip`` where it is installed, and by
Python's :mod:`gzip`), and the splitstream id of the same tar imported uncompressed.
"""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ocifixtures import make_tar, sha256
from trio_composefs import FormatError, Repository
from trio_composefs.importer import _decompress as decompress_module
from trio_composefs.importer import open_importer
from trio_composefs.importer._decompress import OUTPUT_PIECE, open_verified_stream


def _backends() -> list[Any]:
    out: list[Any] = [pytest.param(gzip, id="zlib")]
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - isal is a dependency
        out.append(pytest.param(None, id="isal", marks=pytest.mark.skip("isal is not installed")))
    else:
        out.append(pytest.param(igzip, id="isal"))
    return out


BACKENDS = _backends()


def _tar() -> bytes:
    """A layer with small, empty, inline-sized and multi-MiB files (some compressible)."""
    rnd = os.urandom(3 << 20)
    files = [
        ("etc/empty", b""),
        ("etc/tiny", b"x" * 64),
        ("etc/small", b"hello world\n" * 100),
        ("usr/lib/random.bin", rnd),
        ("usr/lib/zeros.bin", bytes(5 << 20)),
        ("usr/share/mixed", rnd[:100_000] + bytes(2 << 20) + rnd[:7]),
    ]
    files += [(f"usr/share/doc/f{i:03}", os.urandom(i * 37)) for i in range(100)]
    return make_tar(files)


TAR = _tar()


def _gnu_gzip(data: bytes) -> bytes | None:
    exe = shutil.which("gzip")
    if exe is None:
        return None
    return subprocess.run([exe, "-c", "-n"], input=data, capture_output=True, check=True).stdout


def _members(data: bytes, cuts: list[int]) -> bytes:
    """``data`` as concatenated gzip members, cut at ``cuts``."""
    bounds = [0, *cuts, len(data)]
    return b"".join(gzip.compress(data[a:b], mtime=0) for a, b in itertools.pairwise(bounds))


CASES: dict[str, bytes] = {
    "one member": gzip.compress(TAR, mtime=0),
    "three members": _members(TAR, [1000, 4 << 20]),
    "an empty member between": _members(TAR, [len(TAR) // 2, len(TAR) // 2]),
    "members cut mid-block": _members(TAR, [511, 513, 3 << 20]),
    "zero padding after the last": gzip.compress(TAR, mtime=0) + bytes(10_000),
    "members then padding": _members(TAR, [7777]) + bytes(512),
}
GNU = _gnu_gzip(TAR)
if GNU is not None:
    CASES["GNU gzip"] = GNU
    CASES["GNU gzip twice, concatenated"] = GNU + (_gnu_gzip(b"") or b"")


async def _pieces(blob: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]


async def _decode(blob: bytes, piece: int) -> bytes:
    out = []
    async with open_verified_stream(
        _pieces(blob, piece), compression="gzip", digest=sha256(blob), size=len(blob), where="t"
    ) as stream:
        async for data in stream:
            assert len(data) <= OUTPUT_PIECE
            out.append(data)
    return b"".join(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("piece", [4093, 1 << 20])
async def test_gzip_backends_decode_alike(
    backend: ModuleType, case: str, piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decompress_module, "_GZIP", backend)
    assert await _decode(CASES[case], piece) == TAR


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "tail",
    [b"junk", bytes(100) + b"x", b"\x1f", b"\x1f\x8b\x08\x00garbage"],
    ids=["garbage", "zeros then garbage", "half a magic", "a broken member"],
)
async def test_gzip_backends_refuse_trailing_garbage(
    backend: ModuleType, tail: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decompress_module, "_GZIP", backend)
    blob = CASES["three members"] + tail
    with pytest.RaisesGroup(
        pytest.RaisesExc(FormatError, match=r"cannot decompress \(gzip\)"), flatten_subgroups=True
    ):
        await _decode(blob, 1 << 16)


async def _import(repo: Repository, blob: bytes | None) -> str:
    diff_id = sha256(TAR)
    async with open_importer(repo) as importer:
        if blob is None:
            stats = await importer.import_layer(TAR, diff_id)
        else:
            async with open_verified_stream(
                _pieces(blob, 1 << 20),
                compression="gzip",
                digest=sha256(blob),
                size=len(blob),
                where="t",
            ) as stream:
                stats = await importer.import_layer(stream, diff_id)
    return stats.splitstream.hex()


async def test_gzip_backends_give_the_same_splitstreams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Repository.init(tmp_path / "plain", insecure=True) as repo:
        expected = await _import(repo, None)
    for param in BACKENDS:
        (backend,) = param.values
        if backend is None:  # pragma: no cover - isal missing
            continue
        monkeypatch.setattr(decompress_module, "_GZIP", backend)
        for n, case in enumerate(CASES):
            with Repository.init(tmp_path / f"{param.id}-{n}", insecure=True) as repo:
                assert await _import(repo, CASES[case]) == expected, (param.id, case)


def test_isal_is_the_default() -> None:
    pytest.importorskip("isal")
    assert decompress_module.GZIP_BACKEND == "isal"
