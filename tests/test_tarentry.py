"""Tests for reading tar entries back from splitstream chunks, against Python's tarfile."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import NSEC_FILE
from tarfixtures import (
    EOA,
    FIXED_MTIME,
    WRITERS,
    Profile,
    chunks_from_events,
    fake_digest,
    has_xattrs,
    member,
    pax_records,
    profile_for,
    raw_header,
    split,
    write_archive,
)
from trio_composefs import DataAfterEndError, InternalError, TarError
from trio_composefs.cli._format import format_entry
from trio_composefs.formats import (
    END,
    NEED_DATA,
    Chunk,
    EntryReader,
    EntryType,
    ExternalChunk,
    InlineChunk,
    TarEntry,
    iter_entries,
    normalize_path,
)

_TYPES = {
    tarfile.REGTYPE: EntryType.REGULAR,
    tarfile.AREGTYPE: EntryType.REGULAR,
    tarfile.CONTTYPE: EntryType.REGULAR,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.DIRTYPE: EntryType.DIRECTORY,
    tarfile.FIFOTYPE: EntryType.FIFO,
}


def expected_entries(data: bytes) -> list[TarEntry]:
    """What Python's tarfile says the archive holds, as TarEntry values."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for m in archive.getmembers():
            kind = _TYPES[m.type]
            content: bytes | ExternalChunk = b""
            if kind is EntryType.REGULAR:
                extracted = archive.extractfile(m)
                assert extracted is not None
                content = extracted.read()
                if len(content) > 64:
                    content = ExternalChunk(fake_digest(content), len(content))
            link: str | None = None
            if kind is EntryType.HARDLINK:
                link = normalize_path(m.linkname)
            elif kind is EntryType.SYMLINK:
                link = m.linkname
            rdev = os.makedev(m.devmajor, m.devminor) if m.ischr() or m.isblk() else 0
            pax_mtime = m.pax_headers.get("mtime", "0")
            _, _, fraction = pax_mtime.partition(".")
            nsec = int((fraction + "000000000")[:9])
            xattrs = {
                key.removeprefix("SCHILY.xattr."): value.encode("utf-8", "surrogateescape")
                for key, value in m.pax_headers.items()
                if key.startswith("SCHILY.xattr.")
            }
            out.append(
                TarEntry(
                    path=normalize_path(m.name),
                    type=kind,
                    mode=m.mode,
                    uid=m.uid,
                    gid=m.gid,
                    mtime=int(m.mtime),
                    mtime_nsec=nsec,
                    link_target=link,
                    rdev=rdev,
                    xattrs=xattrs,
                    content=content,
                )
            )
    return out


def resplit(chunks: list[Chunk], sizes: list[int]) -> list[Chunk]:
    """Cut the inline chunks into pieces of the given sizes (cycled)."""
    out: list[Chunk] = []
    index = 0
    for chunk in chunks:
        if isinstance(chunk, ExternalChunk):
            out.append(chunk)
            continue
        data = chunk.data
        while data:
            size = sizes[index % len(sizes)]
            index += 1
            out.append(InlineChunk(data[:size]))
            data = data[size:]
    return out


@pytest.mark.parametrize("writer", WRITERS)
def test_entries_match_tarfile(writer: str, trees: dict[Profile, Path], tmp_path: Path) -> None:
    tree = trees[profile_for(writer)]
    data = write_archive(writer, tree, tmp_path / "out.tar")
    chunks, objects = chunks_from_events(split(data))
    entries = list(iter_entries(chunks))
    assert entries == expected_entries(data)
    # Straddling headers: the same entries from inline chunks cut anywhere.
    assert list(iter_entries(resplit(chunks, [1, 100, 511, 513, 7]))) == entries
    for entry in entries:
        if isinstance(entry.content, ExternalChunk):
            assert entry.size > 64
            assert objects[entry.content.digest] == (tree / entry.path[1:]).read_bytes()
        elif entry.type is EntryType.REGULAR:
            assert entry.size <= 64
    paths = {e.path for e in entries}
    assert "/files/s65" in paths
    assert "/" in paths


def test_full_tree_metadata(trees: dict[Profile, Path], tmp_path: Path) -> None:
    tree = trees[Profile.FULL]
    data = write_archive("gnutar-posix-xattrs", tree, tmp_path / "x.tar")
    chunks, _ = chunks_from_events(split(data))
    by_path = {e.path: e for e in iter_entries(chunks)}
    nsec = by_path["/" + NSEC_FILE]
    assert (nsec.mtime, nsec.mtime_nsec) == (FIXED_MTIME, 123_456_789)
    assert by_path["/null-dev"].type is EntryType.CHAR
    assert by_path["/null-dev"].rdev == os.makedev(1, 3)
    assert by_path["/loop-dev"].rdev == os.makedev(7, 250)
    assert by_path["/fifo"].type is EntryType.FIFO
    assert by_path["/longlink"].link_target == "T" * 180 + "/" + "U" * 150
    assert by_path["/files/s513"].uid == 1234
    assert by_path["/files/s513"].gid == 5678
    assert by_path["/files/s64"].mode == 0o600
    long_path = "/" + "a" * 120 + "/" + "b" * 150 + "/" + "c" * 200
    assert isinstance(by_path[long_path].content, ExternalChunk)
    hardlinks = {by_path["/hardlink-to-s65"].link_target, by_path["/files/s65"].link_target}
    assert hardlinks <= {"/files/s65", None, "/hardlink-to-s65"}
    assert by_path["/café-ü.txt"].size == 100
    if has_xattrs(tree):
        assert by_path["/files/s0"].xattrs == {
            "user.comment": b"hello \x00\xff world",
            "security.test": b"label",
        }


def test_pax_overrides() -> None:
    records = pax_records(
        [
            (b"path", b"./over/ride/"),
            (b"uid", b"4294967297"),
            (b"gid", b"7"),
            (b"mtime", b"1234.5"),
            (b"linkpath", b"../target"),
            (b"SCHILY.xattr.user.x", b"\x00\x01"),
            (b"LIBARCHIVE.xattr.user.y", b"ignored"),
        ]
    )
    data = member(raw_header(b"PaxHeaders/x", size=len(records), typeflag=b"x"), records)
    data += member(raw_header(b"short", typeflag=b"2", uid=5, gid=6, mode=0o777)) + EOA
    chunks, _ = chunks_from_events(split(data))
    (entry,) = iter_entries(chunks)
    assert entry == TarEntry(
        path="/over/ride",
        type=EntryType.SYMLINK,
        mode=0o777,
        uid=1,
        gid=7,
        mtime=1234,
        mtime_nsec=500_000_000,
        link_target="../target",
        rdev=0,
        xattrs={"user.x": b"\x00\x01"},
        content=b"",
    )


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("./", "/"),
        ("/", "/"),
        (".", "/"),
        ("a/b/", "/a/b"),
        ("/a//b/./c", "/a/b/c"),
        ("./a", "/a"),
        ("//x", "/x"),
    ],
)
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


def test_dotdot_is_an_error() -> None:
    data = member(raw_header(b"a/../../etc/passwd", size=3), b"abc") + EOA
    chunks, _ = chunks_from_events(split(data))
    with pytest.raises(TarError, match=r"\.\.") as info:
        list(iter_entries(chunks))
    assert info.value.offset == 0
    hardlink = member(raw_header(b"ok", typeflag=b"1", linkname=b"../x")) + EOA
    with pytest.raises(TarError) as info:
        list(iter_entries([InlineChunk(hardlink)]))
    assert (info.value.entry, info.value.offset) == ("ok", 0)


def test_unsupported_type() -> None:
    data = member(raw_header(b"ok", size=1), b"1") + member(raw_header(b"vol", typeflag=b"V"))
    with pytest.raises(TarError, match="unsupported entry type 'V'") as info:
        list(iter_entries([InlineChunk(data + EOA)]))
    assert (info.value.entry, info.value.offset) == ("vol", 1024)


BIG = member(raw_header(b"big", size=100), b"B" * 100)


def test_chunk_mismatches() -> None:
    header, padding = BIG[:512], BIG[612:]
    good = ExternalChunk(fake_digest(b"B" * 100), 100)
    (entry,) = iter_entries([InlineChunk(header), good, InlineChunk(padding + EOA)])
    assert entry.content == good
    cases: list[tuple[list[Chunk], str, int]] = [
        ([InlineChunk(BIG + EOA)], "inline bytes where an external", 512),
        ([InlineChunk(header), ExternalChunk(good.digest, 99)], "external chunk of 99", 512),
        ([InlineChunk(header)], "missing external chunk", 512),
        ([InlineChunk(header + b"x"), good], "inline bytes where an external", 512),
        ([good, InlineChunk(BIG)], "unexpected external chunk", 0),
        ([InlineChunk(header), good, good], "unexpected external chunk", 612),
    ]
    for chunks, message, offset in cases:
        with pytest.raises(TarError, match=message) as info:
            list(iter_entries(chunks))
        assert info.value.offset == offset, message


def test_truncated_stream_is_an_error() -> None:
    with pytest.raises(TarError, match="truncated"):
        list(iter_entries([InlineChunk(member(raw_header(b"f", size=10), b"x" * 10)[:520])]))


def test_format_entry() -> None:
    base = {
        "uid": 0,
        "gid": 0,
        "mtime": 0,
        "mtime_nsec": 0,
        "rdev": 0,
        "xattrs": {},
    }
    regular = TarEntry(
        path="/etc/hosts",
        type=EntryType.REGULAR,
        mode=0o644,
        link_target=None,
        content=ExternalChunk(fake_digest(b""), 1234),
        **base,  # type: ignore[arg-type]
    )
    assert format_entry(regular) == ("-rw-r--r-- 0/0       1234 1970-01-01 00:00:00 /etc/hosts")
    link = TarEntry(
        path="/bin/sh",
        type=EntryType.SYMLINK,
        mode=0o777,
        link_target="dash",
        content=b"",
        **base,  # type: ignore[arg-type]
    )
    assert format_entry(link).endswith("/bin/sh -> dash")
    assert format_entry(link).startswith("lrwxrwxrwx ")
    odd = attrs.evolve(link, path="/new\nline\udcff", link_target="t\tab")
    assert format_entry(odd).endswith("/new\\nline\\udcff -> t\\tab")
    dev = TarEntry(
        path="/dev/null",
        type=EntryType.CHAR,
        mode=0o666,
        link_target=None,
        content=b"",
        **{**base, "rdev": os.makedev(1, 3)},  # type: ignore[arg-type]
    )
    assert format_entry(dev).startswith("crw-rw-rw- 0/0        1,3 ")


@st.composite
def _layer(draw: st.DrawFn) -> bytes:
    buffer = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    sizes = draw(st.lists(st.sampled_from([0, 1, 63, 64, 65, 511, 512, 513, 2000]), max_size=6))
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for index, size in enumerate(sizes):
            info = tarfile.TarInfo(f"d{index}/" + "n" * draw(st.integers(1, 150)))
            info.size = size
            info.mode = draw(st.integers(0, 0o7777))
            info.uid = draw(st.integers(0, 2**21 - 1))
            archive.addfile(info, io.BytesIO(bytes([index]) * size))
    return buffer.getvalue()


@settings(max_examples=40, deadline=None)
@given(_layer(), st.lists(st.integers(1, 700), min_size=1, max_size=6))
def test_property_entries_match_tarfile(data: bytes, cuts: list[int]) -> None:
    chunks, _ = chunks_from_events(split(data))
    entries = list(iter_entries(resplit(chunks, cuts)))
    assert entries == expected_entries(data)


@st.composite
def _rich_layer(draw: st.DrawFn) -> bytes:
    """A small archive with every entry type, PAX records and GNU long names."""
    buffer = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        kinds = draw(st.lists(st.sampled_from(sorted(_TYPES, key=bytes.hex)), max_size=5))
        for index, kind in enumerate(kinds):
            info = tarfile.TarInfo(
                f"e{index}/"
                + "n" * draw(st.integers(1, 60 if fmt == tarfile.USTAR_FORMAT else 150))
            )
            info.type = kind
            if kind in (tarfile.LNKTYPE, tarfile.SYMTYPE):
                info.linkname = "t" * draw(st.integers(1, 90))
            if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 255))
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"SCHILY.xattr.user.k": "v" * draw(st.integers(0, 3))}
                info.mtime = draw(st.floats(0, 2e9, allow_nan=False))
            if info.isreg():
                info.size = draw(st.sampled_from([0, 64, 65, 600]))
            archive.addfile(info, io.BytesIO(b"c" * info.size) if info.isreg() else None)
    return buffer.getvalue()


def _entries_or_error(chunks: list[Chunk]) -> list[TarEntry] | TarError:
    try:
        return list(iter_entries(chunks))
    except TarError as error:
        return error


@settings(max_examples=200, deadline=None)
@given(_rich_layer(), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)), max_size=3))
def test_fuzz_entries(data: bytes, flips: list[tuple[int, int]]) -> None:
    mutated = bytearray(data)
    for where, bit in flips:
        if mutated:
            mutated[where % len(mutated)] ^= 1 << bit
    try:
        events = split(bytes(mutated))
    except TarError:
        return
    chunks, _ = chunks_from_events(events)
    outcome = _entries_or_error(chunks)
    if isinstance(outcome, TarError):
        assert outcome.offset is not None
    elif not flips:
        assert outcome == expected_entries(data)


@pytest.mark.parametrize(
    ("field", "start", "message"),
    [
        ("mtime", 136, "negative number in header field mtime"),
        ("uid", 108, "malformed number"),
        ("mode", 100, "malformed number"),
    ],
)
def test_bad_metadata_numbers(field: str, start: int, message: str) -> None:
    block = bytearray(raw_header(b"meta", typeflag=b"5"))
    width = 12 if field == "mtime" else 8
    block[start : start + width] = b"\xff" * width if field == "mtime" else b"12 34 5\x00"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    data = raw_header(b"first", typeflag=b"5") + bytes(block) + EOA
    with pytest.raises(TarError, match=message) as info:
        list(iter_entries([InlineChunk(data)]))
    assert (info.value.entry, info.value.offset) == ("meta", 512)


# --------------------------------------------------------------------------- EntryReader


def read_all(reader: EntryReader, chunks: Iterable[Chunk]) -> list[TarEntry]:
    """Feed ``chunks`` one at a time, draining after each, then the end of input."""
    entries: list[TarEntry] = []
    for chunk in chunks:
        reader.receive_chunk(chunk)
        while (result := reader.next_entry()) is not NEED_DATA:
            assert isinstance(result, TarEntry), result
            entries.append(result)
    reader.receive_eof()
    while (result := reader.next_entry()) is not END:
        assert isinstance(result, TarEntry), result
        entries.append(result)
    assert reader.next_entry() is END  # END repeats
    return entries


def bytewise(chunks: list[Chunk]) -> list[Chunk]:
    """Every inline chunk cut into one-byte chunks; external chunks kept."""
    out: list[Chunk] = []
    for chunk in chunks:
        if isinstance(chunk, ExternalChunk):
            out.append(chunk)
        else:
            out += [InlineChunk(chunk.data[i : i + 1]) for i in range(len(chunk.data))]
    return out


@pytest.mark.parametrize("writer", WRITERS)
def test_entry_reader_whole_bytewise_and_trailing(
    writer: str, trees: dict[Profile, Path], tmp_path: Path
) -> None:
    data = write_archive(writer, trees[profile_for(writer)], tmp_path / "out.tar")
    chunks, _ = chunks_from_events(split(data))
    expected = expected_entries(data)  # Python's tarfile is the oracle
    assert read_all(EntryReader(), chunks) == expected
    assert read_all(EntryReader(), bytewise(chunks)) == expected
    # Bytes after the end-of-archive marker are kept inline and are not entries.
    trailing = [*chunks, InlineChunk(b"trailing junk" + bytes(600))]
    assert read_all(EntryReader(), trailing) == expected
    assert read_all(EntryReader(), bytewise(trailing)) == expected


def test_entry_reader_is_incremental() -> None:
    small = member(raw_header(b"small", size=3), b"abc")
    header, padding = BIG[:512], BIG[612:]
    good = ExternalChunk(fake_digest(b"B" * 100), 100)
    reader = EntryReader()
    assert reader.next_entry() is NEED_DATA
    reader.receive_chunk(InlineChunk(small[:514]))
    assert reader.next_entry() is NEED_DATA  # the content is not complete yet
    reader.receive_chunk(InlineChunk(small[514:] + header))
    first = reader.next_entry()
    assert isinstance(first, TarEntry)
    assert (first.path, first.content) == ("/small", b"abc")
    assert reader.next_entry() is NEED_DATA  # the external chunk is due
    assert reader.next_entry() is NEED_DATA
    reader.receive_chunk(good)
    reader.receive_chunk(InlineChunk(b""))  # empty chunks are ignored
    reader.receive_chunk(InlineChunk(padding + EOA))
    second = reader.next_entry()
    assert isinstance(second, TarEntry)
    assert (second.path, second.content) == ("/big", good)
    assert reader.offset == len(small) + 612
    assert reader.next_entry() is NEED_DATA  # the end of input has not been signalled
    reader.receive_eof()
    assert reader.next_entry() is END
    assert reader.next_entry() is END
    assert reader.offset == len(small) + len(BIG) + len(EOA)


def test_entry_reader_data_after_end() -> None:
    reader = EntryReader()
    reader.receive_chunk(InlineChunk(EOA))
    reader.receive_eof()
    with pytest.raises(DataAfterEndError, match="receive_chunk"):
        reader.receive_chunk(InlineChunk(b"x"))
    with pytest.raises(DataAfterEndError, match="receive_eof"):
        reader.receive_eof()
    assert reader.next_entry() is END
    assert issubclass(DataAfterEndError, RuntimeError)
    assert issubclass(DataAfterEndError, InternalError)


STICKY_CASES: list[tuple[list[Chunk], str]] = [
    ([InlineChunk(BIG + EOA)], "inline bytes where an external"),
    ([InlineChunk(BIG[:512]), ExternalChunk(fake_digest(b"B" * 100), 99)], "external chunk of 99"),
    ([InlineChunk(BIG[:512])], "missing external chunk"),
    ([InlineChunk(BIG[:512]), InlineChunk(b"x")], "inline bytes where an external"),
    ([ExternalChunk(fake_digest(b"B" * 100), 100)], "unexpected external chunk"),
    ([InlineChunk(member(raw_header(b"f", size=10), b"x" * 10)[:520])], "truncated"),
    ([InlineChunk(member(raw_header(b"../f", typeflag=b"5")) + EOA)], "'..'"),
]


@pytest.mark.parametrize(("chunks", "message"), STICKY_CASES)
def test_entry_reader_errors_are_sticky(chunks: list[Chunk], message: str) -> None:
    reader = EntryReader()
    with pytest.raises(TarError, match=message) as info:
        read_all(reader, chunks)
    error = info.value
    assert error.offset is not None
    # Every later call raises the very same error.
    for call in (
        reader.next_entry,
        reader.receive_eof,
        lambda: reader.receive_chunk(InlineChunk(b"more")),
        reader.next_entry,
    ):
        with pytest.raises(TarError) as again:
            call()
        assert again.value is error
    # iter_entries, the driver, raises the same error at the same offset.
    with pytest.raises(TarError, match=message) as driven:
        list(iter_entries(chunks))
    assert (driven.value.entry, driven.value.offset) == (error.entry, error.offset)


def _entries_then_error(results: Iterable[TarEntry]) -> tuple[list[TarEntry], str | None]:
    """The entries handed out before any error, and the error's message."""
    entries: list[TarEntry] = []
    try:
        for entry in results:
            entries.append(entry)
    except TarError as error:
        return entries, str(error)
    return entries, None


def _reader_results(chunks: list[Chunk], polls: list[int]) -> Iterator[TarEntry]:
    """Drive an EntryReader, asking for entries ``polls[i]`` times after chunk ``i``
    (cycled; 0 lets chunks queue up unread), then draining at the end."""
    reader = EntryReader()
    for index, chunk in enumerate(chunks):
        reader.receive_chunk(chunk)
        for _ in range(polls[index % len(polls)]):
            result = reader.next_entry()
            if result is NEED_DATA:
                break
            assert isinstance(result, TarEntry)
            yield result
    reader.receive_eof()
    while (result := reader.next_entry()) is not END:
        assert isinstance(result, TarEntry), result
        yield result


@settings(max_examples=150, deadline=None)
@given(
    _rich_layer(),
    st.lists(st.integers(1, 700), min_size=1, max_size=6),
    st.lists(st.integers(0, 3), min_size=1, max_size=5),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)), max_size=2),
    st.binary(max_size=40),
)
def test_property_entry_reader_matches_iter_entries(
    data: bytes,
    cuts: list[int],
    polls: list[int],
    flips: list[tuple[int, int]],
    trailing: bytes,
) -> None:
    """Any chunking of a layer's chunks, read with any pattern of polls, gives exactly what
    ``iter_entries`` gives for the layer's chunks as split: entries, then the same error."""
    mutated = bytearray(data)
    for where, bit in flips:
        mutated[where % len(mutated)] ^= 1 << bit
    try:
        chunks, _ = chunks_from_events(split(bytes(mutated)))
    except TarError:
        return
    if trailing:
        chunks.append(InlineChunk(trailing))
    expected = _entries_then_error(iter_entries(chunks))
    if not flips:
        assert expected == (expected_entries(data), None)
    rechunked = resplit(chunks, cuts)
    assert _entries_then_error(_reader_results(rechunked, polls)) == expected
    assert _entries_then_error(_reader_results(bytewise(chunks), [1])) == expected
