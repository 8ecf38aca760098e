"""The composefs EROFS writer against upstream's pinned digests, C mkcomposefs 1.0.8 byte
for byte (hypothesis trees, host trees) and fsck.erofs."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from erofs_trees import (
    c_dump,
    c_mkcomposefs,
    dumpfile_bytes,
    filesystems,
    first_difference,
    scan_host,
)
from oracles import need_c_tool
from trio_composefs._errors import ErofsWriteError
from trio_composefs.formats import Algorithm, Digest, fsverity_digest
from trio_composefs.fs import (
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    Fifo,
    FileSystem,
    InlineFile,
    Leaf,
    Socket,
    Stat,
    Symlink,
)
from trio_composefs.fs.erofs import compute_image_id, iter_erofs, write_erofs
from trio_composefs.fs.erofs._format import xxh32

# --- xxh32 against the published XXH32 test vectors ----------------------------------------


@pytest.mark.parametrize(
    ("data", "seed", "expected"),
    [
        (b"", 0, 0x02CC5D05),
        (b"", 2654435761, 0x36B78AE7),
        (b"a", 0, 0x550D7456),
        (b"abc", 0, 0x32D153FF),
        (b"Nobody inspects the spammish repetition", 0, 0xE2293B2F),
    ],
)
def test_xxh32_vectors(data: bytes, seed: int, expected: int) -> None:
    assert xxh32(data, seed) == expected


# --- composefs-rs's pinned trees (tests/mkfs.rs::test_erofs_digest_stability) -------------


def _empty() -> FileSystem:
    return FileSystem(Directory(Stat(0o755)))


def _simple() -> FileSystem:
    fs = _empty()
    entries = fs.root.entries
    entries[b"fifo"] = Leaf(Stat(0), Fifo())
    entries[b"regular-inline"] = Leaf(Stat(0), InlineFile(b"hihi"))
    entries[b"regular-external"] = Leaf(
        Stat(0), ExternalFile(1234, Digest(Algorithm.SHA256, b"\x5a" * 32))
    )
    entries[b"chrdev"] = Leaf(Stat(0), CharDevice(123))
    entries[b"blkdev"] = Leaf(Stat(0), BlockDevice(123))
    entries[b"socket"] = Leaf(Stat(0), Socket())
    entries[b"symlink"] = Leaf(Stat(0), Symlink(b"/target"))
    return fs


@pytest.mark.parametrize(
    ("tree", "version", "prefix", "suffix"),
    [
        (_empty, 0, "8f589e8f", "3682"),
        (_empty, 1, "14a26c95", "0b63"),
        (_simple, 0, "9f3f5620", "fa01"),
        (_simple, 1, "ad6db642", "62b5"),
    ],
)
def test_composefs_rs_pinned_digests(tree: object, version: int, prefix: str, suffix: str) -> None:
    assert callable(tree)
    fs = tree()
    image_id = compute_image_id(fs, version=version).hex()
    assert image_id.startswith(prefix)
    assert image_id.endswith(suffix)
    assert fsverity_digest(write_erofs(fs, version=version)).hex() == image_id


def test_simple_v1_structure() -> None:
    """The facts the notes record for the V1 simple image (C mkcomposefs output)."""
    image = write_erofs(_simple())
    assert len(image) == 16384
    magic, version, flags, cfs_version = struct.unpack_from("<IIII", image, 0)
    assert (magic, version, flags, cfs_version) == (0xD078629A, 1, 0, 1)
    sb = 1024
    assert struct.unpack_from("<I", image, sb)[0] == 0xE0F5E1E2
    assert struct.unpack_from("<H", image, sb + 14)[0] == 36  # root nid
    assert struct.unpack_from("<Q", image, sb + 16)[0] == 264  # inos
    assert struct.unpack_from("<I", image, sb + 36)[0] == 4  # blocks
    assert struct.unpack_from("<I", image, sb + 44)[0] == 2  # xattr_blkaddr
    root = 36 * 32
    i_format, icount = struct.unpack_from("<HH", image, root)
    assert (i_format, icount) == (0, 6)
    assert struct.unpack_from("<I", image, root + 16)[0] == 3  # its dir block
    # The root's only xattr is trusted.overlay.opaque=y: the name filter has one bit
    # clear. The notes show its bytes, ``ff ff ef ff`` (they spell it 0xffffefff, reading
    # the bytes in order; as a little-endian u32 it is 0xffefffff, bit 20).
    assert image[root + 32 : root + 36] == b"\xff\xff\xef\xff"
    external = 297 * 32
    i_format, icount = struct.unpack_from("<HH", image, external)
    assert (i_format, icount) == (8, 37)
    assert struct.unpack_from("<I", image, external + 16)[0] == 0  # chunk format 0


def test_c_print_digest_agrees() -> None:
    """``mkcomposefs --print-digest`` gives the same image ID."""
    tool = need_c_tool("mkcomposefs")
    fs = _simple()
    out = subprocess.run(
        [tool, "--min-version=1", "--max-version=1", "--print-digest-only", "--from-file", "-"],
        input=dumpfile_bytes(fs),
        capture_output=True,
        check=True,
    ).stdout
    assert out.decode().strip() == compute_image_id(fs).hex()


# --- byte for byte against C mkcomposefs --------------------------------------------------

COMPARED: dict[str, int] = {"hypothesis": 0, "host": 0}


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(filesystems(payloads=True))
def test_hypothesis_trees_identical_to_c(fs: FileSystem) -> None:
    need_c_tool("mkcomposefs")
    dump = dumpfile_bytes(fs)
    for version in (1, 0):
        ours = write_erofs(fs, version=version)
        theirs = c_mkcomposefs(dump, version=version)
        assert ours == theirs, f"V{version}: {first_difference(ours, theirs)}"
    COMPARED["hypothesis"] += 1


@pytest.mark.parametrize("top", ["/usr/share/doc", "/etc"])
def test_host_trees_identical_to_c(top: str, tmp_path: Path) -> None:
    need_c_tool("mkcomposefs")
    if not os.path.isdir(top):
        pytest.skip(f"{top} does not exist here")
    fs = scan_host(top)
    dump = dumpfile_bytes(fs)
    for version in (1, 0):
        ours = write_erofs(fs, version=version)
        theirs = c_mkcomposefs(dump, version=version)
        assert ours == theirs, f"{top} V{version}: {first_difference(ours, theirs)}"
    COMPARED["host"] += 1
    _fsck(ours, tmp_path)


def _fsck(image: bytes, tmp: Path) -> None:
    fsck = shutil.which("fsck.erofs")
    if fsck is None:
        pytest.skip("fsck.erofs (erofs-utils) is not installed")
    path = tmp / "image.erofs"
    path.write_bytes(image)
    result = subprocess.run([fsck, str(path)], capture_output=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(filesystems())
def test_fsck_erofs_accepts_hypothesis_images(fs: FileSystem) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _fsck(write_erofs(fs), Path(tmp))


# --- streaming, SHA-512, errors -----------------------------------------------------------


def test_iter_erofs_streams_in_bounded_pieces() -> None:
    root = Directory(Stat(0o755))
    for i in range(3000):
        sub = Directory(Stat(0o755, mtime=i))
        sub.entries[b"file"] = Leaf(Stat(0o644, mtime=i), InlineFile(b"x" * (i % 65)))
        root.entries[b"d%05d" % i] = sub
    fs = FileSystem(root)
    pieces = list(iter_erofs(fs))
    assert len(pieces) > 5
    assert max(len(p) for p in pieces) < (1 << 16) + 2 * 4096
    image = b"".join(pieces)
    assert image == write_erofs(fs)
    assert len(image) % 4096 == 0


def test_sha512_metacopy_is_68_bytes(tmp_path: Path) -> None:
    digest = Digest(Algorithm.SHA512, bytes(range(64)))
    fs = _empty()
    fs.root.entries[b"big"] = Leaf(Stat(0o644), ExternalFile(100_000, digest))
    image = write_erofs(fs)
    metacopy = bytes((0, 68, 0, 2)) + digest.raw
    entry = struct.pack("<BBH", len(b"overlay.metacopy"), 4, 68) + b"overlay.metacopy" + metacopy
    assert entry in image
    redirect = b"/" + digest.object_path().encode()
    assert b"overlay.redirect" + redirect in image
    assert compute_image_id(fs, Algorithm.SHA512) == fsverity_digest(image, Algorithm.SHA512)
    _fsck(image, tmp_path)
    if need_c_tool("composefs-info"):
        dumped = c_dump(image, tmp_path)
        line = next(x for x in dumped.splitlines() if x.startswith(b"/big "))
        assert line.split()[1] == b"100000"
        assert line.split()[8] == digest.object_path().encode()


def test_too_big_file_is_an_error() -> None:
    fs = _empty()
    fs.root.entries[b"d"] = Directory(Stat(0o755))
    assert isinstance(fs.root.entries[b"d"], Directory)
    fs.root.entries[b"d"].entries[b"huge"] = Leaf(Stat(0), ExternalFile(2**53 + 1, None))
    with pytest.raises(ErofsWriteError, match="/d/huge"):
        write_erofs(fs)


def test_unknown_version_is_an_error() -> None:
    with pytest.raises(ErofsWriteError, match="version 2"):
        write_erofs(_empty(), version=2)


def test_input_tree_is_not_modified() -> None:
    fs = _simple()
    fs.root.stat.xattrs[b"trusted.overlay.x"] = b"1"
    fs.root.entries[b"wh"] = Leaf(Stat(0o600), CharDevice(0))
    before = dumpfile_bytes(fs)
    write_erofs(fs)
    assert dumpfile_bytes(fs) == before


def _dir_with_tail(tail: int, full_blocks: int) -> FileSystem:
    """A subdirectory whose dirents fill ``full_blocks`` blocks plus ``tail`` bytes:
    ``.`` (13) and ``..`` (14) and then 32-byte entries (12 + a 20-byte name), the last
    one adjusted."""
    fs = _empty()
    sub = Directory(Stat(0o755, mtime=5))
    fs.root.entries[b"sub"] = sub
    total = full_blocks * 4096 + tail
    used = 27
    i = 0
    while total - used > 0:
        room = total - used
        if full_blocks and (used % 4096) + 32 > 4096:  # start the next block
            used += 4096 - used % 4096
            continue
        name_len = 20 if room >= 32 + 13 or room < 13 else room - 12
        name = (b"e%04d" % i).ljust(name_len, b"x")
        sub.entries[name] = Leaf(Stat(0o644), Fifo())
        used += 12 + len(name)
        i += 1
    return fs


@pytest.mark.parametrize("full_blocks", [0, 1, 3])
@pytest.mark.parametrize("tail", [2040, 2047, 2048, 2049, 2050, 2060, 4000, 4096])
def test_directory_tails_around_half_a_block_identical_to_c(tail: int, full_blocks: int) -> None:
    need_c_tool("mkcomposefs")
    fs = _dir_with_tail(tail, full_blocks)
    ours = write_erofs(fs)
    theirs = c_mkcomposefs(dumpfile_bytes(fs))
    assert ours == theirs, first_difference(ours, theirs)


@pytest.mark.parametrize("length", [4000, 4030, 4031, 4032, 4033, 4034, 4063, 4064, 4095])
@pytest.mark.parametrize("before", [0, 1, 7])
def test_long_symlinks_identical_to_c(length: int, before: int) -> None:
    """Symlinks whose inode + target reach a block (promoted) or straddle one (moved)."""
    need_c_tool("mkcomposefs")
    fs = _empty()
    for i in range(before):
        fs.root.entries[b"a%d" % i] = Leaf(Stat(0o644, mtime=i), InlineFile(b"y" * (i * 9)))
    fs.root.entries[b"link"] = Leaf(Stat(0o777, mtime=3), Symlink(b"t" * length))
    fs.root.entries[b"z"] = Leaf(Stat(0o777), Symlink(b"u" * (length // 2)))
    ours = write_erofs(fs)
    theirs = c_mkcomposefs(dumpfile_bytes(fs))
    assert ours == theirs, first_difference(ours, theirs)


def test_directory_twice_is_an_error_not_a_loop() -> None:
    fs = _empty()
    sub = Directory(Stat(0o755))
    fs.root.entries[b"a"] = sub
    sub.entries[b"loop"] = sub  # a cycle
    with pytest.raises(ErofsWriteError, match="appears twice"):
        write_erofs(fs)
    fs.root.entries[b"a"] = Directory(Stat(0o755))
    fs.root.entries[b"b"] = fs.root.entries[b"c"] = Directory(Stat(0o755))
    with pytest.raises(ErofsWriteError, match="appears twice"):
        write_erofs(fs)


# --- C composefs's own test assets (active once the dumpfile parser is merged) ------------

_C_ASSETS = Path(__file__).parent / "data" / "composefs-c"


def _has_whiteout(fs: FileSystem) -> bool:
    return any(
        isinstance(inode, Leaf)
        and isinstance(inode.content, CharDevice)
        and inode.content.rdev == 0
        for _path, inode in fs.walk()
    )


@pytest.mark.parametrize(
    "name",
    [
        "bigfile.dump",
        "bigfile-xattr.dump",
        "honggfuzz-bigfile-with-acl.dump",
        "honggfuzz-chardev-nonzero-size.dump",
        "honggfuzz-long-symlink.dump",
        "special.dump",
        "special_v1.dump",
    ],
)
def test_c_test_suite_pins(name: str) -> None:
    """C's ``tests/assets/*.sha256``: plain SHA-256 of ``mkcomposefs --from-file``'s image,
    made with C's default versions (0, raised to 1 by a whiteout) or the ``.version``."""
    import hashlib

    parser = pytest.importorskip("trio_composefs.fs._dumpfile_parse")
    source = _C_ASSETS / ("special.dump" if name == "special_v1.dump" else name)
    if not source.exists():
        pytest.skip(f"{source} is not here (C composefs test assets)")
    fs = parser.parse_dumpfile(source.read_bytes())
    version_file = source.with_name(source.name + ".version")
    if name == "special_v1.dump":
        version = 1
    elif version_file.exists():
        version = int(version_file.read_text())
    else:
        version = 1 if _has_whiteout(fs) else 0
    pin = (_C_ASSETS / (name + ".sha256")).read_text().split()[0]
    assert hashlib.sha256(write_erofs(fs, version=version)).hexdigest() == pin
