"""Build file trees and tar archives with real tools, for tests of tar handling.

Other test modules may import this. Every archive comes from an independent writer
(GNU tar, bsdtar, busybox, Python's :mod:`tarfile`), never from our own code.
"""

from __future__ import annotations

import enum
import hashlib
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from trio_composefs.formats import Algorithm, Chunk, Digest, ExternalChunk, InlineChunk
from trio_composefs.formats._tarsplit import (
    END,
    INLINE_MAX,
    NEED_DATA,
    Event,
    FileData,
    FileEnd,
    FileStart,
    Inline,
    TarSplitter,
)

#: File sizes that probe the 64-byte rule and the 512-byte block boundaries.
SIZES = (0, 1, 63, 64, 65, 511, 512, 513, 1024, 3 * 1024 * 1024 + 17)
FIXED_MTIME = 1_700_000_000


class Profile(enum.Enum):
    """What a tree holds, so that each archive format can store all of it.

    FULL: long names (> 100 and > 255 bytes), long link targets, devices, fifos,
    xattrs. USTAR: paths that fit ustar's prefix/name split, link targets of at most
    100 bytes, devices and fifos. V7: short names only, no devices, fifos or xattrs.
    """

    FULL = "full"
    USTAR = "ustar"
    V7 = "v7"


def _content(size: int, seed: int) -> bytes:
    block = hashlib.sha256(f"{seed}:{size}".encode()).digest() * 64
    return (block * (size // len(block) + 1))[:size]


def _try_xattr(path: Path, name: str, value: bytes) -> bool:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError:
        return False
    return True


def make_tree(root: Path, profile: Profile = Profile.FULL, *, big: bool = True) -> Path:
    """Create a tree under ``root`` (which must not exist) and return ``root``.

    ``big=False`` leaves out the multi-MiB file (for byte-at-a-time tests).
    """
    root.mkdir()
    files = root / "files"
    files.mkdir()
    for index, size in enumerate(SIZES):
        if size > 1024 * 1024 and not big:
            continue
        (files / f"s{size}").write_bytes(_content(size, index))
    (files / "s64").chmod(0o600)
    (files / "s65").chmod(0o755)
    (root / "empty-dir").mkdir()
    (root / "café-ü.txt").write_bytes(b"non-ascii\n" * 10)
    (root / "日本語").mkdir()
    (root / "日本語" / "ファイル").write_bytes(_content(200, 99))
    os.link(files / "s65", root / "hardlink-to-s65")
    os.symlink("files/s1", root / "symlink")
    os.symlink("/does/not/exist", root / "dangling")
    if profile is not Profile.V7:
        os.mkfifo(root / "fifo")
        os.mknod(root / "null-dev", 0o20644, os.makedev(1, 3))
        os.mknod(root / "loop-dev", 0o60640, os.makedev(7, 250))
        os.chown(root / "files" / "s513", 1234, 5678)
    if profile is Profile.USTAR:
        deep = root / ("p" * 90) / ("q" * 60)
        deep.mkdir(parents=True)
        (deep / ("n" * 99)).write_bytes(_content(100, 7))
        os.symlink("t" * 100, root / "link100")
    if profile is Profile.FULL:
        deep = root / ("a" * 120) / ("b" * 150)
        deep.mkdir(parents=True)
        (deep / ("c" * 200)).write_bytes(_content(70, 1))
        (deep / "small").write_bytes(b"x")
        os.symlink("T" * 180 + "/" + "U" * 150, root / "longlink")
        os.link(deep / ("c" * 200), root / "hardlink-to-long")
        target = files / "s0"
        _try_xattr(target, "user.comment", b"hello \x00\xff world")
        _try_xattr(target, "security.test", b"label")
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))
    return root


def has_xattrs(root: Path) -> bool:
    """Whether :func:`make_tree` managed to set xattrs (the filesystem supports them)."""
    try:
        return bool(os.listxattr(root / "files" / "s0"))
    except OSError:
        return False


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


# Writers: name -> (profile, how to run). The commands get the tree and output path.
GNU_FORMATS = ("gnu", "oldgnu", "posix", "ustar", "v7")
BSDTAR_FORMATS = ("default", "pax", "ustar", "gnutar", "v7")
TARFILE_FORMATS = {
    "USTAR": tarfile.USTAR_FORMAT,
    "GNU": tarfile.GNU_FORMAT,
    "PAX": tarfile.PAX_FORMAT,
}


def profile_for(writer: str) -> Profile:
    """The richest tree profile the writer can archive completely."""
    writer = writer.lower()
    if writer.endswith("v7"):
        return Profile.V7
    if writer.endswith("ustar") or writer in ("busybox",):
        return Profile.USTAR
    return Profile.FULL


WRITERS = (
    [f"gnutar-{f}" for f in GNU_FORMATS]
    + ["gnutar-posix-xattrs", "gnutar-gnu-b1", "gnutar-posix-b7"]
    + [f"bsdtar-{f}" for f in BSDTAR_FORMATS]
    + ["busybox"]
    + [f"tarfile-{f}" for f in TARFILE_FORMATS]
)


def write_archive(writer: str, tree: Path, out: Path) -> bytes:
    """Archive ``tree`` with ``writer`` (one of :data:`WRITERS`) into ``out``; return its bytes.

    GNU tar exits 2 for formats that cannot hold every file (v7 and devices); trees
    are built per :func:`profile_for` so that this does not happen, and any failure
    fails the test.
    """
    kind, _, fmt = writer.partition("-")
    if kind == "gnutar":
        cmd = [_need("tar"), "--numeric-owner", "--sort=name", "-C", str(tree)]
        if fmt.endswith("-b1"):
            cmd += ["--format=gnu", "-b", "1"]
        elif fmt.endswith("-b7"):
            cmd += ["--format=posix", "-b", "7"]
        elif fmt == "posix-xattrs":
            cmd += ["--format=posix", "--xattrs", "--xattrs-include=*"]
        else:
            cmd += [f"--format={fmt}"]
        subprocess.run([*cmd, "-cf", str(out), "."], check=True, capture_output=True)
    elif kind == "bsdtar":
        cmd = [_need("bsdtar"), "-C", str(tree), "-cf", str(out)]
        if fmt != "default":
            cmd += [f"--format={fmt}"]
        subprocess.run([*cmd, "."], check=True, capture_output=True)
    elif kind == "busybox":
        busybox = _need("busybox")
        subprocess.run(
            [busybox, "tar", "-C", str(tree), "-cf", str(out), "."], check=True, capture_output=True
        )
    elif kind == "tarfile":
        with tarfile.open(out, "w", format=TARFILE_FORMATS[fmt]) as archive:
            archive.add(tree, arcname=".")
    else:
        raise ValueError(writer)
    return out.read_bytes()


# --- driving the splitter ----------------------------------------------------------------


def split(
    data: bytes,
    feed: Sequence[int] | int | None = None,
    *,
    inline_max: int = INLINE_MAX,
    coalesce: bool = False,
) -> list[Event]:
    """All events for ``data``, fed whole (``None``), in pieces of ``feed`` bytes, or in
    pieces of the listed sizes (cycled)."""
    splitter = TarSplitter(inline_max=inline_max, coalesce=coalesce)
    events: list[Event] = []
    if feed is None:
        pieces: Iterable[bytes] = [data] if data else []  # b"" alone would mean EOF
    else:
        pieces = _pieces(data, [feed] if isinstance(feed, int) else list(feed))
    limit = 4 * len(data) + 16  # no event may be empty, so this bounds a healthy run
    for piece in [*pieces, b""]:
        splitter.receive_data(piece)
        while True:
            event = splitter.next_event()
            if event is NEED_DATA:
                break
            if event is END:
                assert piece == b""
                assert splitter.offset == len(data)
                return events
            assert isinstance(event, Inline | FileStart | FileData | FileEnd)
            events.append(event)
            assert len(events) <= limit, "splitter does not make progress"
    raise AssertionError("no END after end of input")


def _pieces(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    pos = 0
    index = 0
    while pos < len(data):
        size = max(1, sizes[index % len(sizes)])
        yield data[pos : pos + size]
        pos += size
        index += 1


def rebuild(events: Iterable[Event]) -> bytes:
    """Concatenate the bytes of the Inline and FileData events."""
    return b"".join(e.data for e in events if isinstance(e, Inline | FileData))


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Merge runs of Inline and runs of FileData, so that differently fed streams compare."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, Inline | FileData) and out and type(out[-1]) is type(event):
            out[-1] = type(event)(bytes(out[-1].data) + event.data)
        else:
            out.append(event)
    return out


def external_files(events: Iterable[Event]) -> list[tuple[FileStart, bytes]]:
    """Each FileStart with the concatenation of its FileData, checking the event grammar."""
    result: list[tuple[FileStart, bytes]] = []
    current: FileStart | None = None
    parts: list[bytes] = []
    for event in events:
        if isinstance(event, FileStart):
            assert current is None
            current, parts = event, []
        elif isinstance(event, FileData):
            assert current is not None
            parts.append(bytes(event.data))
        elif isinstance(event, FileEnd):
            assert current is not None
            content = b"".join(parts)
            assert len(content) == current.size
            result.append((current, content))
            current = None
        else:
            assert current is None, "Inline inside a file's content"
    assert current is None
    return result


def fake_digest(content: bytes) -> Digest:
    """A stand-in object id for tests (sha256 of the content, not an fs-verity digest)."""
    return Digest(Algorithm.SHA256, hashlib.sha256(content).digest())


def chunks_from_events(
    events: Iterable[Event], digest_of: Callable[[bytes], Digest] | None = None
) -> tuple[list[Chunk], dict[Digest, bytes]]:
    """The splitstream chunk sequence for the events, and the objects it refers to.

    Objects are named by ``digest_of`` (default :func:`fake_digest`).
    """
    name = digest_of or fake_digest
    chunks: list[Chunk] = []
    objects: dict[Digest, bytes] = {}
    parts: list[bytes] = []
    for event in events:
        if isinstance(event, Inline):
            chunks.append(InlineChunk(event.data))
        elif isinstance(event, FileStart):
            parts = []
        elif isinstance(event, FileData):
            parts.append(bytes(event.data))
        elif isinstance(event, FileEnd):
            content = b"".join(parts)
            digest = name(content)
            objects[digest] = content
            chunks.append(ExternalChunk(digest, len(content)))
    return chunks, objects


# --- hand-built headers, for malformed-input tests -------------------------------------

USTAR_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"
V7_MAGIC = b"\x00" * 8


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def raw_header(
    name: bytes = b"file",
    *,
    size: int = 0,
    typeflag: bytes = b"0",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = FIXED_MTIME,
    linkname: bytes = b"",
    magic: bytes = USTAR_MAGIC,
    prefix: bytes = b"",
    size_field: bytes | None = None,
    devmajor: int = 0,
    devminor: int = 0,
    checksum: str = "unsigned",
) -> bytes:
    """One 512-byte header block laid out by hand (for cases no tool will write).

    ``size_field`` replaces the 12-byte size field verbatim; ``checksum`` is
    ``"unsigned"``, ``"signed"`` (historic BSD) or ``"bad"``.
    """
    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\x00")
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(uid, 8)
    block[116:124] = _octal(gid, 8)
    block[124:136] = size_field if size_field is not None else _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[156:157] = typeflag
    block[157:257] = linkname[:100].ljust(100, b"\x00")
    block[257:265] = magic
    block[329:337] = _octal(devmajor, 8)
    block[337:345] = _octal(devminor, 8)
    block[345:500] = prefix[:155].ljust(155, b"\x00")
    block[148:156] = b" " * 8
    if checksum == "signed":
        total = sum(b - 256 if b > 127 else b for b in block)
    else:
        total = sum(block) + (1 if checksum == "bad" else 0)
    block[148:156] = b"%06o\x00 " % total
    return bytes(block)


def pad(data: bytes) -> bytes:
    """``data`` padded with NULs to a multiple of 512."""
    return data + bytes(-len(data) % 512)


def pax_records(records: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode PAX records (``"<len> <key>=<value>\\n"``)."""
    out = []
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out.append(str(length).encode() + body)
    return b"".join(out)


def member(header: bytes, content: bytes = b"") -> bytes:
    """A header followed by its padded content."""
    return header + pad(content)


EOA = bytes(1024)
