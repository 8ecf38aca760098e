"""fs-verity digests against upstream vectors and the ``fsverity`` tool (fsverity-utils)."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_composefs import DigestError
from trio_composefs.formats import (
    BLOCK_SIZE,
    Algorithm,
    Digest,
    FsVerityHasher,
    digest_from_level1,
    fsverity_digest,
    level1_digests,
    level1_group_size,
)

SHA256 = Algorithm.SHA256
SHA512 = Algorithm.SHA512

# (input, sha256 hex, sha512 hex or prefix or None): composefs-rs-notes.md §1.4.
# "hello world" is upstream's own test (both algorithms, full length); 4095/4096/4097
# zero bytes are upstream's dumpfile oracle; the rest were checked with `fsverity digest`.
VECTORS: list[tuple[bytes, str, str | None]] = [
    (
        b"hello world",
        "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64",
        "18430270729d162d4e469daca123ae61893db4b0583d8f7081e3bf4f92b88ba5"
        "14e7982f10733fb6aa895195c5ae8fd2eb2c47a8be05513ce5a0c51a6f570409",
    ),
    (
        b"",
        "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95",
        "ccf9e5aea1c2a64efa2f2354",
    ),
    (
        bytes(1),
        "b803429503d95915829b29fdbc8bbad142f3abfd11b1cadf5526582e685c0551",
        "9fcf5172b085b1c8f9365eec",
    ),
    (bytes(1000), "f6fa43bbc0a7908e2ef77438244159e9dec289dfc4c49d229237f9797a6a9b79", None),
    (bytes(4095), "5372beb83c78537c8970c8361e3254119fafdf1763854ecd57d3f0fe2da7c719", None),
    (
        bytes(4096),
        "babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e",
        "928922686c4caf32175f5236",
    ),
    (
        bytes(4097),
        "093756e4ea9683329106d4a16982682ed182c14bf076463a9e7f97305cbac743",
        "4339f5da3788e60fa6857bd7",
    ),
    (bytes(8192), "be54121da3877f8852c65136d731784f134c4dd9d95071502e80d7be9f99b263", None),
    (b"A" * 65, "04408a2b075bfe8a9d7d38d66d8e770da8d2f53f540739664ccd45d4ff59ec01", None),
    (
        bytes(128 * 4096 + 1),
        "e4143a5705610b7ad2eb85482cfc033c7062a89b9faf9118603f592d53fd10e0",
        None,
    ),
    (
        bytes(1 << 20),
        "feb19a23e72cb1b8f935d668a09ecaad0bf7c5b9cdfa6dbba7c88a9998ed2b87",
        "b735a7f5b25dba3dafced82c",
    ),
]


@pytest.mark.parametrize(
    ("data", "sha256", "sha512"), VECTORS, ids=[f"len{len(v[0])}" for v in VECTORS]
)
def test_vectors(data: bytes, sha256: str, sha512: str | None) -> None:
    assert fsverity_digest(data, SHA256).hex() == sha256
    assert str(fsverity_digest(data)) == sha256  # SHA-256 is the default
    if sha512 is not None:
        got = fsverity_digest(data, SHA512).hex()
        assert len(got) == 128
        assert got.startswith(sha512)


def test_hello_world_sha512_full() -> None:
    digest = fsverity_digest(b"hello world", SHA512)
    assert digest.algorithm is SHA512
    assert digest.raw == bytes.fromhex(VECTORS[0][2] or "")


# --- cross-check with the fsverity tool -------------------------------------------------


def _boundary_sizes(arity: int, levels: int) -> list[int]:
    """0, 1 and n-1 / n / n+1 for n = BLOCK_SIZE * arity**k, k = 0..levels."""
    sizes = {0, 1}
    for k in range(levels + 1):
        n = BLOCK_SIZE * arity**k
        sizes |= {n - 1, n, n + 1}
    return sorted(sizes)


# SHA-256: 128 digests per tree block; SHA-512: 64. Two tree levels above the data
# (64 MiB and 16 MiB) keep the test around a second or two.
TOOL_CASES = [(SHA256, n) for n in _boundary_sizes(128, 2)] + [
    (SHA512, n) for n in _boundary_sizes(64, 2)
]
# One-block files take their own path in the one-shot digest: a few seeded sizes.
TOOL_CASES += [
    (alg, n)
    for alg in (SHA256, SHA512)
    for n in sorted(set(random.Random(4096).sample(range(2, BLOCK_SIZE - 1), 6)))
]
FILLS = ("random", "5a")
_MAX_SIZE = max(n for _alg, n in TOOL_CASES)


def _content(fill: str, size: int) -> bytes:
    return _RANDOM[:size] if fill == "random" else b"\x5a" * size


_RANDOM = random.Random(20261127).randbytes(_MAX_SIZE)


@pytest.fixture(scope="module")
def tool_digests(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[Algorithm, int, str], str]:
    """Digests printed by one ``fsverity digest`` run per algorithm over every case file."""
    tool = shutil.which("fsverity")
    if tool is None:
        pytest.skip("the fsverity tool (fsverity-utils) is not installed")
    root = tmp_path_factory.mktemp("fsverity-tool")
    result: dict[tuple[Algorithm, int, str], str] = {}
    for alg in Algorithm:
        files: dict[str, tuple[Algorithm, int, str]] = {}
        for case_alg, size in TOOL_CASES:
            if case_alg is not alg:
                continue
            for fill in FILLS:
                path = root / f"{alg.hash_name}-{size}-{fill}"
                path.write_bytes(_content(fill, size))
                files[str(path)] = (alg, size, fill)
        out = subprocess.run(
            [tool, "digest", f"--hash-alg={alg.hash_name}", "--block-size=4096", *files],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            tagged, _, name = line.partition(" ")
            prefix, _, hexdigest = tagged.partition(":")
            assert prefix == alg.hash_name
            result[files[name]] = hexdigest
        assert set(files.values()) <= set(result), out
        for path_name in files:
            Path(path_name).unlink()
    return result


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize(
    ("alg", "size"), TOOL_CASES, ids=[f"{a.hash_name}-{n}" for a, n in TOOL_CASES]
)
def test_matches_fsverity_tool(
    tool_digests: dict[tuple[Algorithm, int, str], str], alg: Algorithm, size: int, fill: str
) -> None:
    expected = tool_digests[(alg, size, fill)]
    data = _content(fill, size)
    assert fsverity_digest(data, alg).hex() == expected
    if size > BLOCK_SIZE:
        # The parallel path: level-1 digests of group-aligned pieces, tree finished apart.
        group = level1_group_size(alg)
        cut = size // 2 // group * group
        level1 = level1_digests(data[:cut], alg) + level1_digests(data[cut:], alg)
        assert digest_from_level1(alg, size, level1).hex() == expected


# --- incremental hashing ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=3 * BLOCK_SIZE)
    | st.integers(0, 140 * BLOCK_SIZE).map(lambda n: _RANDOM[:n]),
    cuts=st.lists(st.integers(0, 140 * BLOCK_SIZE), max_size=12),
    alg=st.sampled_from(Algorithm),
)
def test_any_split_gives_the_one_shot_digest(data: bytes, cuts: list[int], alg: Algorithm) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    hasher = FsVerityHasher(alg)
    start = 0
    for point in [*points, len(data)]:
        hasher.update(memoryview(data)[start:point])
        start = point
    assert hasher.size == len(data)
    assert hasher.digest() == fsverity_digest(data, alg)


def test_byte_by_byte_across_a_tree_block() -> None:
    data = _RANDOM[: 2 * BLOCK_SIZE + 7]
    hasher = FsVerityHasher()
    for i in range(len(data)):
        hasher.update(data[i : i + 1])
    assert hasher.digest() == fsverity_digest(data)


def test_hasher_is_spent_after_digest() -> None:
    hasher = FsVerityHasher(SHA512)
    hasher.update(b"abc")
    assert hasher.algorithm is SHA512
    hasher.digest()
    with pytest.raises(ValueError, match="after digest"):
        hasher.update(b"more")
    with pytest.raises(ValueError, match="spent"):
        hasher.digest()


def test_digest_from_level1_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no level-1"):
        digest_from_level1(SHA256, BLOCK_SIZE, bytes(32))
    with pytest.raises(ValueError, match="2 level-1 digests"):
        digest_from_level1(SHA256, level1_group_size(SHA256) + 1, bytes(32))


# --- the Digest type --------------------------------------------------------------------

HEX256 = VECTORS[0][1]
HEX512 = VECTORS[0][2] or ""


def test_from_hex_round_trip_and_algorithm_by_length() -> None:
    d256 = Digest.from_hex(HEX256)
    assert d256.algorithm is SHA256
    assert d256.hex() == str(d256) == HEX256
    d512 = Digest.from_hex(HEX512)
    assert d512.algorithm is SHA512
    assert Digest.from_hex(HEX512, SHA512) == d512
    assert d256 == fsverity_digest(b"hello world")


@pytest.mark.parametrize(
    "text",
    [
        HEX256.upper(),
        "1E" + HEX256[2:],
        HEX256[:-1],
        HEX256 + "0",
        HEX256[:-1] + "g",
        HEX256[:-2] + " 0",
        "",
        "../.." + HEX256[5:],
        "/" + HEX256[1:],
        HEX256[:2] + "/" + HEX256[3:],
        "0x" + HEX256[2:],
        HEX256[:-1] + "\n",
        "\u0660" * 64,  # Arabic-Indic digit zero: a Unicode digit, not ASCII hex
    ],
)
def test_from_hex_rejects(text: str) -> None:
    with pytest.raises(DigestError):
        Digest.from_hex(text)


def test_from_hex_rejects_length_of_the_other_algorithm() -> None:
    with pytest.raises(DigestError, match="sha512"):
        Digest.from_hex(HEX256, SHA512)
    with pytest.raises(DigestError, match="sha256"):
        Digest.from_hex(HEX512, SHA256)


def test_raw_length_is_checked() -> None:
    with pytest.raises(DigestError):
        Digest(SHA256, bytes(31))
    with pytest.raises(DigestError):
        Digest(SHA512, bytes(32))


def test_object_path_round_trip() -> None:
    for alg in Algorithm:
        digest = fsverity_digest(b"object", alg)
        path = digest.object_path()
        head, rest = path.split("/")
        assert head == digest.hex()[:2]
        assert head + rest == digest.hex()
        assert Digest.from_object_path(path) == digest
        assert Digest.from_object_path(path, alg) == digest


@pytest.mark.parametrize(
    "path",
    [
        HEX256,
        HEX256[:2] + "/" + HEX256[2:-1],
        HEX256[:3] + "/" + HEX256[3:],
        HEX256[:1] + "/" + HEX256[1:],
        "../" + HEX256[2:],
        "/" + HEX256,
        HEX256[:2] + "/" + HEX256[2:] + "/",
        HEX256[:2] + "/../" + HEX256[5:],
        HEX256[:2].upper() + "/" + HEX256[2:],
        HEX256[:2] + "//" + HEX256[3:],
        "",
        "/",
    ],
)
def test_from_object_path_rejects(path: str) -> None:
    with pytest.raises(DigestError):
        Digest.from_object_path(path)


def test_algorithm_names() -> None:
    for alg in Algorithm:
        assert Algorithm.from_name(alg.value) is alg
        assert Algorithm.from_name(alg.hash_name) is alg
        assert Algorithm.from_kernel_id(alg.kernel_id) is alg
        assert str(alg) == alg.value
    assert (SHA256.kernel_id, SHA512.kernel_id) == (1, 2)
    with pytest.raises(DigestError):
        Algorithm.from_name("fsverity-sha256-13")
    with pytest.raises(DigestError):
        Algorithm.from_kernel_id(3)
