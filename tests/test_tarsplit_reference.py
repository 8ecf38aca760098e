"""The tuned tar splitter against the one it replaced (``tests/reftarsplit.py``).

Same events (piece for piece when not coalescing), same offsets and entry counts after
every event, the same resolved headers, the same errors (message, entry, offset) at the
same point: on archives from Python's tarfile and from real tools, whole, in random
pieces and byte by byte, with trailing data, and mutated. With ``coalesce=True`` the
bytes, the large-file events, the headers and the errors are the same; only the inline
pieces are merged. ``zero_copy=True`` changes nothing but the type of file data.
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reftarsplit
from tarfixtures import (
    EOA,
    GNU_MAGIC,
    V7_MAGIC,
    WRITERS,
    Profile,
    coalesce,
    make_tree,
    member,
    pad,
    pax_records,
    profile_for,
    raw_header,
    write_archive,
)
from trio_composefs import TarError
from trio_composefs.formats._tarheader import TarHeader
from trio_composefs.formats._tarsplit import (
    END,
    NEED_DATA,
    Event,
    FileData,
    FileEnd,
    FileStart,
    Inline,
    TarSplitter,
)

HeaderKey = tuple[object, ...]


def header_key(header: TarHeader | reftarsplit.TarHeader) -> HeaderKey:
    """Everything a header holds, comparable across the two implementations."""
    return (
        header.offset,
        header.block,
        dict(header.pax),
        header.long_name,
        header.long_link,
        header.path,
        header.size,
    )


def error_key(error: TarError) -> tuple[str, str | None, int | None]:
    return (error.reason, error.entry, error.offset)


class Run:
    """What a splitter handed out for one input, fed in the given pieces."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.states: list[tuple[int, int]] = []  # (offset, entries) after each event
        self.headers: list[HeaderKey] = []  # in stream order
        self.error: tuple[str, str | None, int | None] | None = None


def pieces(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    pos = 0
    index = 0
    while pos < len(data):
        size = max(1, sizes[index % len(sizes)])
        yield data[pos : pos + size]
        pos += size
        index += 1


def run_reference(data: bytes, sizes: Sequence[int]) -> Run:
    splitter = reftarsplit.TarSplitter()
    run = Run()
    try:
        for piece in [*pieces(data, sizes), b""]:
            splitter.receive_data(piece)
            while (event := splitter.next_event()) is not NEED_DATA and event is not END:
                entries = splitter.entries
                if entries != (run.states[-1][1] if run.states else 0):
                    assert splitter.header is not None
                    run.headers.append(header_key(splitter.header))
                run.events.append(event)
                run.states.append((splitter.offset, entries))
            if event is END:
                break
    except TarError as error:
        run.error = error_key(error)
    return run


def run_tuned(
    data: bytes, sizes: Sequence[int], *, coalesce_inline: bool, zero_copy: bool = False
) -> Run:
    splitter = TarSplitter(coalesce=coalesce_inline, zero_copy=zero_copy)
    run = Run()
    try:
        for piece in [*pieces(data, sizes), b""]:
            splitter.receive_data(piece)
            while (event := splitter.next_event()) is not NEED_DATA and event is not END:
                assert isinstance(event, Inline | FileStart | FileData | FileEnd)
                if isinstance(event, Inline):
                    assert event.data
                    run.headers.extend(header_key(h) for h in event.headers)
                    if event.headers:
                        assert splitter.header is event.headers[-1]
                elif isinstance(event, FileData):
                    assert event.data
                    if isinstance(event.data, memoryview):
                        assert zero_copy
                        assert event.data.readonly
                        event = FileData(bytes(event.data))
                run.events.append(event)
                run.states.append((splitter.offset, splitter.entries))
            if event is END:
                break
    except TarError as error:
        run.error = error_key(error)
        # sticky
        with pytest.raises(TarError) as again:
            splitter.next_event()
        assert error_key(again.value) == run.error
    return run


def check_same(data: bytes, sizes: Sequence[int]) -> None:
    ref = run_reference(data, sizes)
    tuned = run_tuned(data, sizes, coalesce_inline=False)
    assert tuned.events == ref.events
    assert tuned.states == ref.states
    assert tuned.headers == ref.headers
    assert tuned.error == ref.error
    merged = run_tuned(data, sizes, coalesce_inline=True)
    assert coalesce(merged.events) == coalesce(ref.events)
    assert merged.headers == ref.headers
    assert merged.error == ref.error
    if merged.states:
        assert merged.states[-1] == ref.states[-1]
    viewed = run_tuned(data, sizes, coalesce_inline=True, zero_copy=True)
    assert viewed.events == merged.events
    assert viewed.states == merged.states
    assert viewed.error == merged.error
    # Coalesced: no two Inline events in a row unless the input ran dry between them.
    assert len(merged.events) <= len(ref.events)


# --- archives -----------------------------------------------------------------------------

_names = st.text(
    st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=150
).filter(lambda s: s not in (".", ".."))
_sizes = st.one_of(
    st.sampled_from([0, 1, 63, 64, 65, 511, 512, 513, 1024, 1025]), st.integers(0, 3000)
)


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    glob = draw(st.booleans()) and fmt == tarfile.PAX_FORMAT
    entries = draw(
        st.lists(
            st.tuples(_names, _sizes, st.sampled_from(["file", "dir", "symlink", "link"])),
            max_size=8,
        )
    )
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer,
        mode="w",
        format=fmt,
        pax_headers={"comment": "global"} if glob else None,
    ) as archive:
        for index, (name, size, kind) in enumerate(entries):
            name = f"{index}{name}"
            if fmt == tarfile.USTAR_FORMAT:
                name = name.encode()[:90].decode("utf-8", "ignore") or str(index)
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000.25 if fmt == tarfile.PAX_FORMAT and index % 2 else 0
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif kind in ("symlink", "link"):
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = name * (1 if fmt == tarfile.USTAR_FORMAT else 3)
                if fmt == tarfile.USTAR_FORMAT:
                    info.linkname = info.linkname.encode()[:90].decode("utf-8", "ignore")
                archive.addfile(info)
            else:
                info.size = size
                archive.addfile(info, io.BytesIO(bytes([index % 256]) * size))
    return buffer.getvalue()


def mutate(data: bytes, mutations: list[tuple[str, int]]) -> bytes:
    mutated = bytearray(data)
    for kind, where in mutations:
        if not mutated:
            break
        pos = where % len(mutated)
        if kind == "flip":
            mutated[pos] ^= 1 << (where % 8)
        elif kind == "cut":
            del mutated[pos:]
        elif kind == "insert":
            mutated[pos:pos] = bytes([where % 256]) * (where % 700)
        elif kind == "zero":
            mutated[pos : pos + 512] = bytes(len(mutated[pos : pos + 512]))
        else:  # a header field: make it hit a header's fields more often than chance
            block = pos - pos % 512
            field = (124, 148, 156, 257, 345)[where % 5]
            if block + field < len(mutated):
                mutated[block + field] = where % 256
    return bytes(mutated)


_feeds = st.lists(st.integers(1, 3000), min_size=1, max_size=6)
_mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "zero", "field"]), st.integers(0, 1 << 20)),
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives(), _feeds, st.binary(max_size=700), _mutations)
def test_same_as_reference(
    data: bytes, feed: list[int], trailer: bytes, mutations: list[tuple[str, int]]
) -> None:
    check_same(mutate(data + trailer, mutations), feed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives())
def test_same_as_reference_byte_by_byte(data: bytes) -> None:
    check_same(data, [1])


def _headers() -> list[bytes]:
    """Hand-made streams for paths no tool writes (see test_tarsplit for their meaning)."""
    big = member(raw_header(b"big", size=100), b"B" * 100)
    long_name = member(raw_header(b"././@LongLink", typeflag=b"L", size=300), b"n" * 299 + b"\0")
    pax = pax_records([(b"path", b"p" * 200), (b"size", b"70"), (b"mtime", b"12.5")])
    pax_header = member(raw_header(b"pax", typeflag=b"x", size=len(pax)), pax)
    return [
        big + EOA,
        long_name + member(raw_header(b"x", size=70, magic=GNU_MAGIC), b"c" * 70) + EOA,
        pax_header + member(raw_header(b"y", size=3), b"abc" * 24)[:1024] + EOA,
        member(raw_header(b"v7x", typeflag=b"x", size=3, magic=V7_MAGIC), b"abc") + EOA,
        raw_header(b"signed\xff", size=0, checksum="signed") + EOA,
        raw_header(b"bad", checksum="bad") + EOA,
        raw_header(b"s", size_field=b"\x80" + bytes(10) + b"\x01") + pad(b"x") + EOA,
        raw_header(b"neg", size_field=b"\xff" * 12) + EOA,
        raw_header(b"sp", size_field=b" 12 34 \0    ") + EOA,
        raw_header(b"dir", typeflag=b"5", size=5) + pad(b"12345") + EOA,
        raw_header(b"sparse", typeflag=b"S") + EOA,
        raw_header(b"", size=0) + EOA,
        raw_header(b"name", prefix=b"pre/fix") + EOA,
        long_name + long_name + EOA,
        pax_header + bytes(1024),
        pax_header,
        member(raw_header(b"pax", typeflag=b"x", size=8), b"5 a=b\n\0\0") + big + EOA,
        member(raw_header(b"pax", typeflag=b"x", size=6), b"x a=b\n") + big + EOA,
        member(raw_header(b"pax", typeflag=b"x", size=6), b"6 =bc\n") + big + EOA,
        member(raw_header(b"pax", typeflag=b"x", size=9), b"9 a=b\nxyz") + big + EOA,
        member(raw_header(b"g", typeflag=b"g", size=len(pax)), pax) + big + EOA,
        big + bytes(512) + big + EOA,
        big + bytes(512),
        big[:700],
        raw_header(b"huge", typeflag=b"x", size=2 << 20) + EOA,
    ]


@pytest.mark.parametrize("index", range(len(_headers())))
@pytest.mark.parametrize("feed", [[1 << 20], [1], [511, 513, 7]])
def test_hand_made_streams_as_reference(index: int, feed: list[int]) -> None:
    check_same(_headers()[index], feed)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[Profile, Path]:
    root = tmp_path_factory.mktemp("trees")
    return {profile: make_tree(root / profile.value, profile, big=False) for profile in Profile}


@pytest.mark.parametrize("writer", WRITERS)
def test_tool_archives_as_reference(
    writer: str, trees: dict[Profile, Path], tmp_path: Path
) -> None:
    data = write_archive(writer, trees[profile_for(writer)], tmp_path / "out.tar")
    rng = random.Random(writer)
    for feed in ([1 << 20], [1], [rng.randint(1, 2000) for _ in range(5)]):
        check_same(data, feed)
    for _ in range(20):
        mutations = [
            (rng.choice(["flip", "cut", "insert", "zero", "field"]), rng.randrange(1 << 20))
            for _ in range(rng.randint(1, 3))
        ]
        check_same(mutate(data, mutations), [rng.randint(1, 4096)])


def test_coalesced_runs_between_large_files(trees: dict[Profile, Path], tmp_path: Path) -> None:
    """Fed whole, a coalescing splitter hands out exactly one Inline between two large
    files (and one before the first, one after the last), whose headers are every entry
    in it."""
    data = write_archive("gnutar-posix", trees[Profile.FULL], tmp_path / "out.tar")
    splitter = TarSplitter(coalesce=True)
    splitter.receive_data(data)
    splitter.receive_data(b"")
    kinds = []
    headers = 0
    while (event := splitter.next_event()) is not END:
        assert event is not NEED_DATA
        kinds.append({Inline: "I", FileStart: "S", FileData: "D", FileEnd: "E"}[type(event)])
        if isinstance(event, Inline):
            headers += len(event.headers)
    pattern = "".join(kinds)
    assert pattern.replace("SDE", "") == "I" * (pattern.count("SDE") + 1)
    with tarfile.open(tmp_path / "out.tar") as archive:
        assert headers == splitter.entries == len(archive.getmembers())


def test_coalesced_error_comes_after_the_good_bytes() -> None:
    good = member(raw_header(b"a", size=3), b"abc") + member(raw_header(b"b", typeflag=b"5"))
    bad = raw_header(b"c", checksum="bad")
    splitter = TarSplitter(coalesce=True)
    splitter.receive_data(good + bad + EOA)
    event = splitter.next_event()
    assert isinstance(event, Inline)
    assert event.data == good
    assert [h.path for h in event.headers] == ["a", "b"]
    assert splitter.offset == len(good)
    with pytest.raises(TarError, match="checksum") as first:
        splitter.next_event()
    assert first.value.offset == len(good)
    with pytest.raises(TarError) as again:
        splitter.next_event()
    assert again.value is first.value


def test_zero_copy_hands_out_views_of_the_received_bytes() -> None:
    content = bytes(range(256)) * 3
    data = member(raw_header(b"a", size=len(content)), content) + EOA
    splitter = TarSplitter(coalesce=True, zero_copy=True)
    splitter.receive_data(data)
    events = [splitter.next_event() for _ in range(4)]
    assert [type(e) for e in events] == [Inline, FileStart, FileData, FileEnd]
    assert isinstance(events[2], FileData)
    view = events[2].data
    assert isinstance(view, memoryview)
    assert view.readonly
    assert view.obj is data  # no copy was made
    assert bytes(view) == content
