"""The dumpfile writer: composefs-rs's format (its fixture lines, its hard-link form) and
C ``composefs-info dump`` of the image built from our dumpfile."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from erofs_trees import c_dump, c_mkcomposefs, dumpfile_bytes, filesystems
from trio_composefs._errors import ErofsWriteError
from trio_composefs.formats import Algorithm, Digest
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
    escape,
    escape_optional,
    escape_xattr,
    write_dumpfile,
)
from trio_composefs.fs.erofs import write_erofs


def _simple() -> FileSystem:
    root = Directory(Stat(0o755))
    entries = root.entries
    entries[b"fifo"] = Leaf(Stat(0), Fifo())
    entries[b"regular-inline"] = Leaf(Stat(0), InlineFile(b"hihi"))
    entries[b"regular-external"] = Leaf(
        Stat(0), ExternalFile(1234, Digest(Algorithm.SHA256, b"\x5a" * 32))
    )
    entries[b"chrdev"] = Leaf(Stat(0), CharDevice(123))
    entries[b"blkdev"] = Leaf(Stat(0), BlockDevice(123))
    entries[b"socket"] = Leaf(Stat(0), Socket())
    entries[b"symlink"] = Leaf(Stat(0), Symlink(b"/target"))
    return FileSystem(root)


def test_composefs_rs_simple_fixture() -> None:
    """composefs-rs's ``simple`` tree, written as its dumpfile writer writes it."""
    z = "5a" * 32
    expected = [
        b"/ 0 40755 2 0 0 0 0.0 - - -\n",
        b"/blkdev 0 60000 1 0 0 123 0.0 - - -\n",
        b"/chrdev 0 20000 1 0 0 123 0.0 - - -\n",
        b"/fifo 0 10000 1 0 0 0 0.0 - - -\n",
        f"/regular-external 1234 100000 1 0 0 0 0.0 5a/{z[2:]} - {z}\n".encode(),
        b"/regular-inline 4 100000 1 0 0 0 0.0 - hihi -\n",
        b"/socket 0 140000 1 0 0 0 0.0 - - -\n",
        b"/symlink 7 120000 1 0 0 0 0.0 /target - -\n",
    ]
    assert list(write_dumpfile(_simple())) == expected


def test_hardlink_lines_and_canonical_name() -> None:
    """The first name in depth-first order carries the inode; later ones are ``@`` lines
    in composefs-rs's form (``0 @120000 - - - - 0.0 TARGET - -``)."""
    root = Directory(Stat(0o755))
    shared = Leaf(Stat(0o644, 1, 2, 3, 4), InlineFile(b"data"))
    sub = Directory(Stat(0o700))
    sub.entries[b"b"] = shared
    root.entries[b"a"] = sub  # /a/b comes before /z in depth-first order
    root.entries[b"z"] = shared
    root.entries[b"0"] = shared
    lines = list(write_dumpfile(FileSystem(root)))
    assert lines == [
        b"/ 0 40755 3 0 0 0 0.0 - - -\n",
        b"/0 4 100644 3 1 2 0 3.4 - data -\n",
        b"/a 0 40700 2 0 0 0 0.0 - - -\n",
        b"/a/b 0 @120000 - - - - 0.0 /0 - -\n",
        b"/z 0 @120000 - - - - 0.0 /0 - -\n",
    ]


def test_escapes() -> None:
    assert escape(b"") == b""
    assert escape(b"plain-name_1.txt") == b"plain-name_1.txt"
    assert escape(b"a b\\c\nd\re\tf=g") == b"a\\x20b\\\\c\\nd\\re\\tf=g"
    assert escape(bytes([0x01, 0x7F, 0x80, 0xFF])) == b"\\x01\\x7f\\x80\\xff"
    assert escape("é".encode()) == b"\\xc3\\xa9"
    assert escape_xattr(b"user.a=b") == b"user.a\\x3db"
    assert escape_xattr(b"") == b""
    assert escape_xattr(b"-") == b"-"
    assert escape_optional(None) == b"-"
    assert escape_optional(b"") == b"-"
    assert escape_optional(b"-") == b"\\x2d"
    assert escape_optional(b"--") == b"--"


# --- C composefs-info dump of the image C builds from our dumpfile ------------------------

_C_HIDDEN_XATTRS = {
    b"trusted.overlay.opaque",
    b"user.overlay.opaque",
    b"trusted.overlay.whiteouts",
    b"user.overlay.whiteouts",
    b"trusted.overlay.whiteout",
    b"user.overlay.whiteout",
}


_EMPTY_ACLS = {b"system.posix_acl_access=", b"system.posix_acl_default="}


def _normalise(dump: bytes) -> list[list[bytes]]:
    """The documented differences between C's ``composefs-info dump`` and composefs-rs's
    writer, taken out of both sides:

    * directory SIZE: C writes the EROFS directory size, composefs-rs 0;
    * hard links: C repeats the target's fields after ``@MODE``, composefs-rs writes
      ``0 @120000 - - - - 0.0``; both name the target in PAYLOAD, which is kept;
    * xattr order: composefs-rs sorts them, C lists them in image order;
    * the overlay whiteout/opaque xattrs (escaped or user.): C's writer sets them on
      whiteout directories (overwriting input values) and its reader hides some of them
      again, so they cannot survive a round trip through C;
    * an ACL xattr with an empty value: its entry is 4 bytes (the name suffix is empty)
      and C 1.0.8's reader loops ``while (p + 4 < end)`` over the inline entries, so it
      drops such an entry when it is the inode's last one (the image has it).
    """
    out = []
    for line in dump.splitlines():
        fields = line.split(b" ")
        path, size, mode = fields[0], fields[1], fields[2]
        if mode.startswith(b"@"):
            out.append([path, b"@", fields[8]])
            continue
        if mode.startswith(b"4") and len(mode) == 5:
            size = b"0"
        xattrs = sorted(
            x
            for x in fields[11:]
            if x.split(b"=", 1)[0] not in _C_HIDDEN_XATTRS and x not in _EMPTY_ACLS
        )
        out.append([path, size, mode, *fields[3:11], *xattrs])
    return out


def _roundtrip(fs: FileSystem, tmp: Path) -> None:
    ours = dumpfile_bytes(fs)
    image = c_mkcomposefs(ours)
    assert write_erofs(fs) == image
    theirs = c_dump(image, tmp)
    assert _normalise(theirs) == _normalise(ours)


def test_odd_bytes_round_trip_through_c(tmp_path: Path) -> None:
    root = Directory(Stat(0o755, xattrs={b"user.k=v": b"a=b c\n\\", b"user.empty": b""}))
    odd = bytes(b for b in range(1, 256) if b != ord("/"))
    root.entries[odd[:200]] = Leaf(Stat(0o644), InlineFile(b"-"))
    root.entries[odd[200:]] = Leaf(Stat(0o644), InlineFile(odd[:64]))
    root.entries[b"-"] = Leaf(Stat(0o777, xattrs={b"user.dash": b"-"}), Symlink(b"-"))
    root.entries[b"sp ace"] = Leaf(Stat(0o644), Symlink(b"t a\tb"))
    root.entries[b"nodigest"] = Leaf(Stat(0o644), ExternalFile(5000, None))
    root.entries[b"neg"] = Leaf(Stat(0o644, mtime=-5, mtime_nsec=3), Fifo())
    root.entries[b"nsec"] = Leaf(Stat(0o644, mtime=1700000000, mtime_nsec=999999999), Fifo())
    _roundtrip(FileSystem(root), tmp_path)


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(filesystems())
def test_hypothesis_trees_round_trip_through_c(fs: FileSystem) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _roundtrip(fs, Path(tmp))


def test_lines_are_streamed() -> None:
    root = Directory(Stat(0o755))
    for i in range(100):
        root.entries[b"%03d" % i] = Leaf(Stat(0o644), Fifo())
    lines = list(write_dumpfile(FileSystem(root)))
    assert len(lines) == 101
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)


@pytest.mark.parametrize("deep", [2000])
def test_deep_tree_needs_no_recursion(deep: int) -> None:
    root = Directory(Stat(0o755))
    d = root
    for _ in range(deep):
        child = Directory(Stat(0o755))
        d.entries[b"d"] = child
        d = child
    lines = list(write_dumpfile(FileSystem(root)))
    assert len(lines) == deep + 1
    assert len(write_erofs(FileSystem(root))) % 4096 == 0


def test_sha512_digests_are_128_hex_digits() -> None:
    digest = Digest(Algorithm.SHA512, bytes(range(64)))
    root = Directory(Stat(0o755))
    root.entries[b"f"] = Leaf(Stat(0o644), ExternalFile(70000, digest))
    lines = list(write_dumpfile(FileSystem(root)))
    hexdigest = digest.hex().encode()
    assert len(hexdigest) == 128
    assert lines[1] == b"/f 70000 100644 1 0 0 0 0.0 %s/%s - %s\n" % (
        hexdigest[:2],
        hexdigest[2:],
        hexdigest,
    )


def test_directory_twice_is_an_error_not_a_loop() -> None:
    root = Directory(Stat(0o755))
    root.entries[b"self"] = root
    with pytest.raises(ErofsWriteError, match="appears twice"):
        list(write_dumpfile(FileSystem(root)))
