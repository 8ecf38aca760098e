"""The strict dumpfile parser against C composefs 1.0.8's test assets and tools.

Oracles: the ``should-fail-*`` dumpfiles of C's test suite (copied in
``tests/data/composefs-c``), C ``mkcomposefs --from-file`` run with
``CFS_PARSE_STRICT=1`` on the same inputs when it is built, and ``composefs-info
dump`` output of C images.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fstree import c_tool, dumpfile, filesystems, have_c_tools, iter_chunks, signature
from trio_composefs._errors import DumpfileError
from trio_composefs.formats import Digest
from trio_composefs.fs import (
    BlockDevice,
    CharDevice,
    Directory,
    ExternalFile,
    FileSystem,
    InlineFile,
    Leaf,
    Socket,
    Symlink,
)
from trio_composefs.fs._dumpfile import write_dumpfile
from trio_composefs.fs._dumpfile_parse import parse_dumpfile

DATA = Path(__file__).parent / "data" / "composefs-c"
ROOT = b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
DIGEST = "5a" * 32


def c_strict_accepts(text: bytes, tmp_path: Path) -> bool:
    """Does C ``mkcomposefs --from-file`` accept this input in strict mode?"""
    tool = c_tool("mkcomposefs")
    proc = subprocess.run(
        [tool, "--from-file", "-", str(tmp_path / "out.cfs")],
        input=text,
        capture_output=True,
        env={**os.environ, "CFS_PARSE_STRICT": "1"},
        check=False,
    )
    return proc.returncode == 0


# -- C's own assets -----------------------------------------------------------------------

SHOULD_FAIL = sorted(p.name for p in DATA.glob("should-fail-*.dump"))
# C's checksum test runs these without CFS_PARSE_STRICT; strict mode rejects them.
NONSTRICT = {"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"}
POSITIVE = sorted(
    p.name
    for p in DATA.glob("*.dump")
    if not p.name.startswith("should-fail") and p.name not in NONSTRICT
)


@pytest.mark.parametrize("name", SHOULD_FAIL)
def test_c_should_fail(name: str) -> None:
    with pytest.raises(DumpfileError, match=r"line \d+"):
        parse_dumpfile((DATA / name).read_bytes())


def test_c_should_fail_long_xattrs() -> None:
    """The two 120 KB assets, rebuilt rather than copied."""
    key = ROOT + b"/longxattr 0 100644 1 0 0 0 0.0 - - - " + b"a" * 123219 + b"\n"
    with pytest.raises(DumpfileError, match="XATTR"):
        parse_dumpfile(key)
    value = ROOT + b"/longxattr-value 0 100644 1 0 0 0 0.0 - - - foo=" + b"a" * 123216 + b"\n"
    with pytest.raises(DumpfileError, match="XATTR"):
        parse_dumpfile(value)


@pytest.mark.parametrize("name", sorted(NONSTRICT))
def test_c_nonstrict_assets_are_rejected(name: str) -> None:
    with pytest.raises(DumpfileError):
        parse_dumpfile((DATA / name).read_bytes())


@pytest.mark.parametrize("name", POSITIVE)
def test_c_assets_parse(name: str) -> None:
    data = (DATA / name).read_bytes()
    fs = parse_dumpfile(data)
    assert signature(parse_dumpfile(iter_chunks(data, 1))) == signature(fs)
    assert signature(parse_dumpfile(iter_chunks(data, 7))) == signature(fs)


def test_special_dump_contents() -> None:
    fs = parse_dumpfile((DATA / "special.dump").read_bytes())
    entries = fs.root.entries
    assert fs.root.stat.mode == 0o555
    assert fs.root.stat.mtime == 1633950376
    assert fs.root.stat.xattrs == {b"trusted.foo1": b"bar-1", b"user.foo2": b"bar-2"}
    assert entries[b"inline"].content == InlineFile(b"FOOBAR\nINAFILE\n")  # type: ignore[union-attr]
    assert entries[b"blockdev"].content == BlockDevice(107690)  # type: ignore[union-attr]
    assert entries[b"whiteout"].content == CharDevice(0)  # type: ignore[union-attr]
    assert entries[b"escaped-xattr"].stat.xattrs[b"trusted.overlay.redirect"] == b"/foo\n"
    big = entries[b"inline-large3"]
    assert isinstance(big, Leaf)
    assert isinstance(big.content, InlineFile)
    assert len(big.content.data) == 4097


@pytest.mark.parametrize("name", ["links-v0.cfs", "special-v0.cfs"])
def test_c_composefs_info_dump_output(name: str) -> None:
    """C's dump of C's V0 image parses (C-form ``@`` lines) to the source tree.

    (V1 dumps add the ``opaque=x`` pair; the reader tests normalise that.)
    """
    dumped = parse_dumpfile((DATA / f"{name}.dump").read_bytes())
    source = parse_dumpfile((DATA / (name.split("-v")[0] + ".dump")).read_bytes())
    assert signature(dumped) == signature(source)


def test_links_dump() -> None:
    fs = parse_dumpfile((DATA / "links.dump").read_bytes())
    a = fs.root.entries[b"a"]
    b = fs.root.entries[b"b"]
    assert isinstance(a, Directory)
    assert isinstance(b, Directory)
    assert a.entries[b"file"] is a.entries[b"link2"] is b.entries[b"link3"]
    f = a.entries[b"file"]
    assert isinstance(f, Leaf)
    assert f.content == ExternalFile(1234, Digest.from_hex(DIGEST), "5a/" + "5a" * 31)
    assert fs.nlinks()[id(f)] == 3
    assert b.entries[b"nodigest"].content == ExternalFile(5000, None, None)  # type: ignore[union-attr]
    assert b.stat.uid == 70000
    assert fs.root.stat.mtime_nsec == 5  # NSEC is a count, not a fraction


# -- hypothesis round trips ------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=filesystems(), chunk=st.integers(1, 5000))
def test_round_trip(fs: FileSystem, chunk: int) -> None:
    text = dumpfile(fs)
    want = signature(fs)
    assert signature(parse_dumpfile(text)) == want
    assert signature(parse_dumpfile(iter_chunks(text, chunk))) == want
    assert signature(parse_dumpfile(text.splitlines(keepends=True))) == want
    assert signature(parse_dumpfile(text[:-1])) == want  # no final newline
    junk_line = text.count(b"\n") + 1
    with pytest.raises(DumpfileError, match=f"line {junk_line}"):
        parse_dumpfile(text + b"trailing junk\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=filesystems())
def test_round_trip_library_writer(fs: FileSystem) -> None:
    """parse(write_dumpfile(fs)) == fs, fed line by line as the writer yields them."""
    want = signature(fs)
    assert signature(parse_dumpfile(write_dumpfile(fs))) == want
    assert signature(parse_dumpfile(b"".join(write_dumpfile(fs)))) == want


@settings(max_examples=100, deadline=None)
@given(fs=filesystems(max_entries=12), data=st.data())
def test_mutated_lines_never_crash(fs: FileSystem, data: st.DataObject) -> None:
    """Any edit of a valid dumpfile parses or raises DumpfileError, nothing else."""
    text = bytearray(dumpfile(fs))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text) - 1))
        text[pos] = data.draw(st.sampled_from(b" \n\\x-@/=.0123456789abcdef\0\xff"))
    with contextlib.suppress(DumpfileError):
        parse_dumpfile(bytes(text))


# -- rule by rule --------------------------------------------------------------------------------

BAD = [
    # (dumpfile, field named in the error)
    (b"", None),
    (b"/a 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),  # the root must come first
    (ROOT + ROOT, "PATH"),  # two roots
    (b"/ 0 100644 1 0 0 0 0.0 - - -\n", "MODE"),  # root not a directory
    (ROOT + b"a 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),  # relative
    (ROOT + b"/a/ 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),  # trailing slash
    (ROOT + b"/x/a 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),  # missing parent
    (ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -\n/f/a 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),
    (ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -\n/f 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),
    (ROOT + b"/" + b"n" * 256 + b" 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),
    (ROOT + b"/a\\x00b 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),
    (ROOT + b"/a\\q 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),  # unknown escape
    (ROOT + b"/a\\x4 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),  # short hex escape
    (ROOT + b"/a\\ 0 100644 1 0 0 0 0.0 - - -\n", "PATH"),  # escape at the end
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - -\n", "DIGEST"),  # 10 fields
    (ROOT + b"/a 0 100644 1 0  0 0.0 - - -\n", "GID"),  # empty field
    (ROOT + b"/a +0 100644 1 0 0 0 0.0 - - -\n", "SIZE"),
    (ROOT + b"/a 0 100648 1 0 0 0 0.0 - - -\n", "MODE"),
    (ROOT + b"/a 0 1100644 1 0 0 0 0.0 - - -\n", "MODE"),
    (ROOT + b"/a 0 170644 1 0 0 0 0.0 - - -\n", "MODE"),
    (ROOT + b"/a 0 100644 x 0 0 0 0.0 - - -\n", "NLINK"),
    (ROOT + b"/a 0 100644 1 4294967296 0 0 0.0 - - -\n", "UID"),
    (ROOT + b"/a 0 100644 1 0 0 1 0.0 - - -\n", "RDEV"),
    (ROOT + b"/a 0 20644 1 0 0 4294967296 0.0 - - -\n", "RDEV"),
    (ROOT + b"/a 0 100644 1 0 0 0 0 - - -\n", "MTIME"),
    (ROOT + b"/a 0 100644 1 0 0 0 0.1000000000 - - -\n", "MTIME"),
    (ROOT + b"/a 4 100644 1 0 0 0 0.0 - abc -\n", "CONTENT"),  # size mismatch
    (ROOT + b"/a 3 100644 1 0 0 0 0.0 x/y abc -\n", "PAYLOAD"),  # both
    (ROOT + b"/a 3 100644 1 0 0 0 0.0 - abc " + DIGEST.encode() + b"\n", "DIGEST"),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 x/y - -\n", "PAYLOAD"),  # empty file with payload
    (ROOT + b"/a 5 100644 1 0 0 0 0.0 - - 5a5a\n", "DIGEST"),
    (ROOT + b"/a 5 100644 1 0 0 0 0.0 - - " + b"zz" * 32 + b"\n", "DIGEST"),
    (ROOT + b"/a 5001 100644 1 0 0 0 0.0 - " + b"x" * 5001 + b" -\n", "CONTENT"),
    (ROOT + b"/a 9500000000000000 100644 1 0 0 0 0.0 - - -\n", "SIZE"),
    (ROOT + b"/l 3 120777 1 0 0 0 0.0 abcd - -\n", "SIZE"),  # symlink size (strict)
    (ROOT + b"/l 0 120777 1 0 0 0 0.0 - - -\n", "PAYLOAD"),
    (ROOT + b"/l 1 120777 1 0 0 0 0.0 a a -\n", "CONTENT"),
    (ROOT + b"/d 0 40755 1 0 0 0 0.0 x - -\n", "PAYLOAD"),
    (ROOT + b"/p 0 10644 1 0 0 0 0.0 - - " + DIGEST.encode() + b"\n", "DIGEST"),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - - novalue\n", "XATTR"),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - - =v\n", "XATTR"),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - - user.a=1 user.a=2\n", "XATTR"),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - - user.a=1 \n", "XATTR"),  # two trailing spaces
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - - user.\\x00=1\n", "XATTR"),
    (
        ROOT
        + b"/a 0 100644 1 0 0 0 0.0 - - - user.a="
        + b"v" * 20000
        + b" user.b="
        + b"v" * 20000
        + b"\n",
        "XATTR",
    ),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - - user.a=\\x\n", "XATTR"),
    (ROOT + b"/a 0 @40755 - - - - 0.0 / - -\n", "MODE"),  # hard-linked directory
    (ROOT + b"/a 0 @100644 - - - - 0.0 - - -\n", "PAYLOAD"),  # no target
    (ROOT + b"/a 0 @100644 - - - - 0.0 /a - -\n", "PAYLOAD"),  # itself
    (ROOT + b"/a 0 @100644 - - - - 0.0 /nope - -\n", "PAYLOAD"),
    (ROOT + b"/d 0 40755 2 0 0 0 0.0 - - -\n/a 0 @100644 - - - - 0.0 /d - -\n", "PAYLOAD"),
    (ROOT + b"/a 0 @100644 - - - - 0.0 /b - -\n/b 0 @100644 - - - - 0.0 /a - -\n", "PAYLOAD"),
    (ROOT + b"/a 0 @100644 - - - - 0.0 a - -\n", "PAYLOAD"),
    (ROOT + b"/a 5 100644 1 0 0 0 0.0 aa/\\xff - -\n", "PAYLOAD"),  # not UTF-8
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\x00\n", None),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\r\n", "DIGEST"),
]


@pytest.mark.parametrize(("text", "field"), BAD)
def test_rejected(text: bytes, field: str | None) -> None:
    with pytest.raises(DumpfileError) as info:
        parse_dumpfile(text)
    assert info.value.field == field
    if text:
        line = info.value.line
        assert line is not None
        if line != text.count(b"\n"):  # links are resolved at the end: the link's line
            assert b" @" in text.split(b"\n")[line - 1]


# Rejected by C in strict mode too. C 1.0.8 accepts C_ACCEPTS, truncating or
# ignoring what it cannot hold (a relative path, NUL in a path or an xattr name, a
# missing DIGEST field, '+0', modes, ids and device numbers beyond their bits,
# NSEC >= 10**9, PAYLOAD with CONTENT, a DIGEST that is not hex or sits on a
# non-file, a payload on an empty file or a directory, duplicate xattrs, a link to
# a directory, a backing path that is not UTF-8, a CR before the newline); we are
# stricter on purpose.
C_ACCEPTS = {4, 10, 14, 16, 18, 21, 23, 25, 27, 28, 29, 30, 31, 37, 38, 41, 42, 43, 50, 53, 55}
BOTH_REJECT = [i for i in range(len(BAD)) if i not in C_ACCEPTS]


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
@pytest.mark.parametrize("index", BOTH_REJECT)
def test_c_rejects_too(index: int, tmp_path: Path) -> None:
    assert not c_strict_accepts(BAD[index][0], tmp_path)


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
@pytest.mark.parametrize("index", sorted(C_ACCEPTS))
def test_c_is_laxer(index: int, tmp_path: Path) -> None:
    """Where we are stricter than C: it accepts these (keeps the list honest)."""
    assert c_strict_accepts(BAD[index][0], tmp_path)


GOOD = [
    # composefs-rs hard-link form, and a target given later in the file (C resolves late)
    ROOT + b"/a 0 @120000 - - - - 0.0 /b - -\n/b 0 100644 1 0 0 0 0.0 - - -\n",
    # a chain of links
    ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\n/b 0 @100644 - - - - 0.0 /a - -\n"
    b"/c 0 @100644 - - - - 0.0 /b - -\n",
    # C's form: the target's values, digest and xattrs repeated
    ROOT + b"/a 5 100644 2 0 0 0 0.0 aa/bb - " + DIGEST.encode() + b" user.x=1\n"
    b"/b 5 @100644 2 0 0 0 0.0 /a - " + DIGEST.encode() + b" user.x=1\n",
    # one trailing space (C's splitter tolerates it)
    ROOT + b"/a 0 100644 1 0 0 0 0.0 - - - \n",
    # escapes, an escaped lone dash, '=' inside values, UTF-8 kept raw
    ROOT + b"/\\x2d 1 100644 1 0 0 0 0.0 - \\x2d - user.k\\x3d=v=w\\t \xc3\xa9=\\\\\n",
    # devices, sockets, negative and large mtimes, uppercase digest
    ROOT + b"/c 0 20644 1 0 0 1281 -1.999999999 - - -\n/s 0 140755 1 0 0 0 9999999999.0 - - -\n"
    b"/e 7 100644 1 0 0 0 0.0 - - " + DIGEST.upper().encode() + b"\n",
]


@pytest.mark.parametrize("text", GOOD)
def test_accepted(text: bytes) -> None:
    fs = parse_dumpfile(text)
    assert signature(parse_dumpfile(iter_chunks(text, 1))) == signature(fs)


def test_accepted_details() -> None:
    fs = parse_dumpfile(GOOD[0])
    assert fs.root.entries[b"a"] is fs.root.entries[b"b"]
    fs = parse_dumpfile(GOOD[1])
    assert fs.root.entries[b"a"] is fs.root.entries[b"b"] is fs.root.entries[b"c"]
    fs = parse_dumpfile(GOOD[2])
    a = fs.root.entries[b"a"]
    assert a is fs.root.entries[b"b"]
    assert isinstance(a, Leaf)
    assert a.stat.xattrs == {b"user.x": b"1"}
    fs = parse_dumpfile(GOOD[4])
    dash = fs.root.entries[b"-"]
    assert isinstance(dash, Leaf)
    assert dash.content == InlineFile(b"-")
    assert dash.stat.xattrs == {b"user.k=": b"v=w\t", "é".encode(): b"\\"}
    fs = parse_dumpfile(GOOD[5])
    c, s, e = (fs.root.entries[n] for n in (b"c", b"s", b"e"))
    assert isinstance(c, Leaf)
    assert c.content == CharDevice(1281)
    assert (c.stat.mtime, c.stat.mtime_nsec) == (-1, 999_999_999)
    assert isinstance(s, Leaf)
    assert s.content == Socket()
    assert isinstance(e, Leaf)
    assert e.content == ExternalFile(7, Digest.from_hex(DIGEST), None)
    assert Symlink(b"x") != Symlink(b"y")


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
@pytest.mark.parametrize("text", GOOD)
def test_c_accepts_too(text: bytes, tmp_path: Path) -> None:
    assert c_strict_accepts(text, tmp_path)


def test_line_too_long_is_bounded() -> None:
    def endless() -> object:
        yield ROOT
        while True:
            yield b"/" + b"a" * 65536

    with pytest.raises(DumpfileError, match="longer than"):
        parse_dumpfile(endless())  # type: ignore[arg-type]


def test_deep_tree_is_iterative() -> None:
    lines = [ROOT]
    path = b""
    for _ in range(2000):
        path += b"/d"
        lines.append(path + b" 0 40755 2 0 0 0 0.0 - - -\n")
    fs = parse_dumpfile(b"".join(lines))
    assert sum(1 for _ in fs.walk()) == 2001
