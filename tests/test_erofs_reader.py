"""The composefs EROFS reader against C composefs 1.0.8.

Oracles: images made by C ``mkcomposefs --from-file`` (pinned ones in
``tests/data/composefs-c``, two of them with the SHA-256 that C's own test suite pins,
and fresh ones from hypothesis trees when the C tools are present) and what C
``composefs-info dump``/``objects`` says about them.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fstree import (
    c_tool,
    composefs_info,
    dumpfile,
    filesystems,
    have_c_tools,
    mkcomposefs,
    signature,
)
from rs_snapshot import image_from_snapshot
from trio_composefs._errors import ErofsError, FormatError
from trio_composefs.formats import Algorithm, Digest, fsverity_digest
from trio_composefs.fs import CharDevice, Directory, ExternalFile, FileSystem, Leaf, Stat
from trio_composefs.fs._dumpfile import write_dumpfile
from trio_composefs.fs._dumpfile_parse import parse_dumpfile
from trio_composefs.fs.erofs import write_erofs
from trio_composefs.fs.erofs._reader import image_objects, read_erofs, read_erofs_header

DATA = Path(__file__).parent / "data" / "composefs-c"
RS_DATA = Path(__file__).parent / "data" / "composefs-rs"
IMAGES = ["links-v0.cfs", "links-v1.cfs", "special-v0.cfs", "special-v1.cfs"]
# composefs-rs's pinned fs-verity digests of its V2 images (tests/mkfs.rs at 54d248f)
RS_V2_PINS = {
    "empty": "086b702a519b57d6ef5aea6f8b3f2be24355cd1fb835cd80fb4e3d388b24d5a5",
    "simple": "a8fcd41f8b313bede69f462f2af0a38d64b99a6333f5df884ea9ab4037fac722",
}
# the same trees (composefs-rs tests/mkfs.rs `empty` and `simple`) as dumpfiles
RS_TREES = {
    "empty": b"/ 0 40755 2 0 0 0 0.0 - - -\n",
    "simple": b"/ 0 40755 2 0 0 0 0.0 - - -\n"
    b"/blkdev 0 60000 1 0 0 123 0.0 - - -\n"
    b"/chrdev 0 20000 1 0 0 123 0.0 - - -\n"
    b"/fifo 0 10000 1 0 0 0 0.0 - - -\n"
    b"/regular-external 1234 100000 1 0 0 0 0.0 5a/" + b"5a" * 31 + b" - " + b"5a" * 32 + b"\n"
    b"/regular-inline 4 100000 1 0 0 0 0.0 - hihi -\n"
    b"/socket 0 140000 1 0 0 0 0.0 - - -\n"
    b"/symlink 7 120000 1 0 0 0 0.0 /target - -\n",
}


def load(name: str) -> bytes:
    """A pinned image: C's (``*.cfs``) or composefs-rs's V2 (``rs-v2-NAME``)."""
    if name.startswith("rs-v2-"):
        snap = (RS_DATA / f"mkfs__{name[6:]}.snap").read_text()
        return image_from_snapshot(snap)
    return (DATA / name).read_bytes()


ALL_IMAGES = [*IMAGES, "rs-v2-empty", "rs-v2-simple"]


def normalise_c(fs: FileSystem) -> FileSystem:
    """Undo the one documented C/rs difference of ``composefs-info dump``.

    C keeps the ``trusted.overlay.opaque=x`` / ``user.overlay.opaque=x`` pair its
    writer adds to a directory holding a user whiteout; composefs-rs (and we) drop it.
    """
    for _path, inode in fs.walk():
        if isinstance(inode, Directory) and any(
            isinstance(c, Leaf) and c.content == CharDevice(0) for c in inode.entries.values()
        ):
            for key in (b"trusted.overlay.opaque", b"user.overlay.opaque"):
                if inode.stat.xattrs.get(key) == b"x":
                    del inode.stat.xattrs[key]
    return fs


def external_files(fs: FileSystem) -> list[ExternalFile]:
    return [
        inode.content
        for _path, inode in fs.walk()
        if isinstance(inode, Leaf) and isinstance(inode.content, ExternalFile)
    ]


# -- pinned C images (no tools needed) --------------------------------------------------


def test_pinned_images_are_cs_own() -> None:
    """The special images are byte for byte the ones C's test suite pins."""
    for name, pin in [("special-v0.cfs", "special.dump"), ("special-v1.cfs", "special_v1.dump")]:
        want = (DATA / f"{pin}.sha256").read_text().split()[0]
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == want


@pytest.mark.parametrize("name", IMAGES)
def test_pinned_image_equals_c_dump(name: str) -> None:
    image = (DATA / name).read_bytes()
    c_tree = normalise_c(parse_dumpfile((DATA / f"{name}.dump").read_bytes()))
    assert signature(read_erofs(image)) == signature(c_tree)
    # memoryview and bytearray inputs read the same
    assert signature(read_erofs(memoryview(image))) == signature(c_tree)
    assert signature(read_erofs(bytearray(image))) == signature(c_tree)


@pytest.mark.parametrize("name", IMAGES)
def test_pinned_image_rewritten_identically(name: str) -> None:
    """C's image, read and written again by our writer, is C's image byte for byte."""
    image = (DATA / name).read_bytes()
    version = read_erofs_header(image).composefs_version
    assert write_erofs(read_erofs(image), version=version) == image


@pytest.mark.parametrize("name", IMAGES)
def test_pinned_image_objects(name: str) -> None:
    image = (DATA / name).read_bytes()
    c_objects = set((DATA / f"{name}.objects").read_text().split())
    ours = image_objects(image)
    assert {d.object_path() for d in ours} == c_objects
    # and C lists the redirect payloads, which the tree keeps too
    assert {f.payload for f in external_files(read_erofs(image)) if f.payload} == c_objects


@pytest.mark.parametrize("name", IMAGES)
def test_pinned_image_is_the_source_tree(name: str) -> None:
    """Reading C's image gives back the dumpfile it was made from."""
    source = (DATA / (name.split("-v")[0] + ".dump")).read_bytes()
    assert signature(read_erofs((DATA / name).read_bytes())) == signature(parse_dumpfile(source))


@pytest.mark.parametrize("tree", sorted(RS_V2_PINS))
def test_composefs_rs_v2(tree: str) -> None:
    """composefs-rs's legacy V2 images, rebuilt from its snapshots and proven by its pins."""
    image = load(f"rs-v2-{tree}")
    assert fsverity_digest(image).hex() == RS_V2_PINS[tree]
    assert read_erofs_header(image).composefs_version == 2
    want = parse_dumpfile(RS_TREES[tree])
    assert signature(read_erofs(image)) == signature(want)
    assert image_objects(image) == {f.digest for f in external_files(want) if f.digest}


def test_header() -> None:
    assert read_erofs_header((DATA / "links-v0.cfs").read_bytes()).composefs_version == 0
    header = read_erofs_header((DATA / "links-v1.cfs").read_bytes())
    assert header.composefs_version == 1
    assert header.root_nid == 36


# -- hostile input -------------------------------------------------------------------------


def check_hostile(image: bytes) -> FileSystem | None:
    """Only ErofsError may come out; image_objects agrees with read_erofs when it reads.

    (image_objects checks less than read_erofs: it may succeed where read_erofs fails,
    never the other way round.)
    """
    objects: set[Digest] | None = None
    with contextlib.suppress(ErofsError):
        objects = image_objects(image)
    error: FormatError | None = None
    try:
        fs = read_erofs(image)
    except ErofsError as e:
        error = e
    if error is not None:
        assert "nid" in str(error) or "byte offset" in str(error)
        return None
    assert objects == {f.digest for f in external_files(fs) if f.digest}
    return fs


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_truncated(name: str) -> None:
    image = load(name)
    full = signature(read_erofs(image))
    assert signature(read_erofs(image + b"\0" * 4096)) == full  # trailing data is ignored
    for k in range(64):
        with pytest.raises(ErofsError):
            read_erofs(image[: len(image) * k // 64])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(ALL_IMAGES),
    edits=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 12287), st.integers(0, 1 << 20)),
            st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF])),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_fuzz_mutations(name: str, edits: list[tuple[int, int]]) -> None:
    image = bytearray(load(name))
    for pos, value in edits:
        if pos < len(image):
            image[pos] = value
    check_hostile(bytes(image))


def test_directory_cycle_is_an_error() -> None:
    """A subdirectory's dirent pointing back at the root must not loop."""
    image = bytearray((DATA / "links-v1.cfs").read_bytes())
    root_nid = read_erofs_header(image).root_nid
    root_off = 1152  # nid 36
    (i_u,) = struct.unpack_from("<I", image, root_off + 16)
    # the root's dirents: '.', '..', 00..ff stubs, 'a', ...; find 'a' by scanning names
    start = i_u * 4096
    count = struct.unpack_from("<H", image, start + 8)[0] // 12
    for i in range(count):
        _nid, nameoff, ftype = struct.unpack_from("<QHB", image, start + 12 * i)
        end = struct.unpack_from("<H", image, start + 12 * i + 20)[0] if i + 1 < count else None
        if ftype == 2 and end is not None and image[start + nameoff : start + end] == b"a":
            struct.pack_into("<Q", image, start + 12 * i, root_nid)
            break
    else:
        raise AssertionError("no directory 'a' in the root")
    with pytest.raises(ErofsError, match="reached twice"):
        read_erofs(bytes(image))


def test_not_an_image() -> None:
    for junk in [b"", b"\0" * 4096, b"x" * 20000, (DATA / "links.dump").read_bytes()]:
        with pytest.raises(ErofsError):
            read_erofs(junk)


# -- fresh images from hypothesis trees (C tools needed) -----------------------------------


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=filesystems())
def test_c_images_of_random_trees(fs: FileSystem, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("img")
    text = dumpfile(fs)
    want = signature(fs)
    for version in (0, 1):
        image = mkcomposefs(text, version=version)
        # the library's dumpfile writer gives C the same input
        assert mkcomposefs(b"".join(write_dumpfile(fs)), version=version) == image
        ours = read_erofs(image)
        assert write_erofs(ours, version=version) == image  # read, rewritten: C's bytes
        assert signature(ours) == want
        c_tree = normalise_c(parse_dumpfile(composefs_info("dump", image, tmp)))
        assert signature(ours) == signature(c_tree)
        c_objects = set(composefs_info("objects", image, tmp).decode().split())
        assert {f.payload for f in external_files(ours) if f.payload} == c_objects
        assert image_objects(image) == {f.digest for f in external_files(fs) if f.digest}


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
def test_c_reader_quirk_empty_last_xattr(tmp_path: Path) -> None:
    """C 1.0.8's reader loses a last inline xattr of exactly 4 bytes; we keep it.

    (An empty ``system.posix_acl_access``: index 2, empty suffix, empty value.)
    """
    text = b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - - system.posix_acl_access=\n"
    image = mkcomposefs(text, version=1)
    d = read_erofs(image).root.entries[b"d"]
    assert d.stat.xattrs == {b"system.posix_acl_access": b""}
    c_d = parse_dumpfile(composefs_info("dump", image, tmp_path)).root.entries[b"d"]
    assert c_d.stat.xattrs == {}


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
@pytest.mark.parametrize("tree", ["/etc", "/usr/share/doc"])
def test_c_images_of_real_trees(tree: str, tmp_path: Path) -> None:
    """C ``mkcomposefs DIR`` on this machine's trees; we read what C's dump says."""
    if not Path(tree).is_dir():
        pytest.skip(f"{tree} does not exist here")
    image_path = tmp_path / "tree.cfs"
    subprocess.run(
        [c_tool("mkcomposefs"), "--min-version=1", "--max-version=1", tree, str(image_path)],
        check=True,
        capture_output=True,
    )
    image = image_path.read_bytes()
    ours = read_erofs(image)
    c_dump = composefs_info("dump", image, tmp_path)
    assert signature(ours) == signature(normalise_c(parse_dumpfile(c_dump)))
    assert b"".join(write_dumpfile(ours)) == c_dump_as_rs(c_dump)
    assert write_erofs(ours) == image
    c_objects = set(composefs_info("objects", image, tmp_path).decode().split())
    assert {d.object_path() for d in image_objects(image)} == c_objects


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
@pytest.mark.parametrize("depth", [400, 2040])
def test_deep_tree(depth: int, tmp_path: Path) -> None:
    """Nested directories up to PATH_MAX, read iteratively.

    C ``composefs-info dump`` 1.0.8 recurses with two PATH_MAX buffers per level and
    crashes (SIGSEGV) from about 1000 levels, so the deep case compares with the
    source tree only.
    """
    lines = [b"/ 0 40755 2 0 0 0 0.0 - - -\n"]
    path = b""
    for _ in range(depth):
        path += b"/d"
        lines.append(path + b" 0 40755 2 0 0 0 0.0 - - -\n")
    lines.append(path + b"/f 1 100644 1 0 0 0 0.0 - x -\n")
    text = b"".join(lines)
    image = mkcomposefs(text, version=1)
    ours = read_erofs(image)
    assert sum(1 for _ in ours.walk()) == depth + 2
    assert signature(ours) == signature(parse_dumpfile(text))
    if depth < 1000:
        c_tree = parse_dumpfile(composefs_info("dump", image, tmp_path))
        assert signature(ours) == signature(c_tree)


def c_dump_as_rs(c_dump: bytes) -> bytes:
    """C ``composefs-info dump`` text, with the documented C/rs differences removed.

    Directories get SIZE 0 (C prints the EROFS size); ``@`` lines take composefs-rs's
    form ``PATH 0 @120000 - - - - 0.0 TARGET - -`` (C repeats the target's fields);
    xattrs are sorted (C keeps the EROFS order); a directory's ``opaque=x`` pair is
    dropped when it holds a whiteout (C keeps what its writer added).
    """
    lines = c_dump.splitlines()
    fields = [line.split(b" ") for line in lines]
    whiteout_dirs = {
        f[0].rpartition(b"/")[0] or b"/"
        for f in fields
        if len(f[2]) == 5 and f[2].startswith(b"2") and f[6] == b"0"  # char device 0/0
    }
    out = []
    for f in fields:
        if f[2].startswith(b"@"):
            out.append(b"%s 0 @120000 - - - - 0.0 %s - -" % (f[0], f[8]))
            continue
        xattrs = f[11:]
        if f[2].startswith(b"4"):
            f[1] = b"0"
            if f[0] in whiteout_dirs:
                xattrs = [
                    x
                    for x in xattrs
                    if x not in (b"trusted.overlay.opaque=x", b"user.overlay.opaque=x")
                ]
        out.append(b" ".join(f[:11] + sorted(xattrs)))
    return b"".join(line + b"\n" for line in out)


@pytest.mark.parametrize("name", IMAGES)
def test_dump_text_equals_c_dump(name: str) -> None:
    """write_dumpfile(read_erofs(image)) is C's dump, up to the documented differences."""
    ours = b"".join(write_dumpfile(read_erofs((DATA / name).read_bytes())))
    assert ours == c_dump_as_rs((DATA / f"{name}.dump").read_bytes())


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=filesystems())
def test_dump_text_of_random_trees(
    fs: FileSystem, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("dump")
    image = mkcomposefs(b"".join(write_dumpfile(fs)), version=1)
    ours = b"".join(write_dumpfile(read_erofs(image)))
    assert ours == c_dump_as_rs(composefs_info("dump", image, tmp))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=filesystems(), version=st.sampled_from([0, 1]))
def test_round_trip_library_writer(fs: FileSystem, version: int) -> None:
    """read_erofs(write_erofs(fs)) == fs, and image_objects lists its digests."""
    image = write_erofs(fs, version=version)
    assert signature(read_erofs(image)) == signature(fs)
    assert image_objects(image) == {f.digest for f in external_files(fs) if f.digest}


def test_sha512_metacopy() -> None:
    """SHA-512 repositories: a 68-byte metacopy (algorithm 2) reads back."""
    digest = Digest(Algorithm.SHA512, bytes(range(64)))
    leaf = Leaf(Stat(0o644), ExternalFile(123456, digest))
    fs = FileSystem(Directory(Stat(0o755), {b"big": leaf, b"link": leaf}))
    image = write_erofs(fs)
    back = read_erofs(image)
    assert signature(back) == signature(fs)
    assert back.root.entries[b"big"] is back.root.entries[b"link"]
    assert image_objects(image) == {digest}


# A hard-linked inode whose canonical (first depth-first) name /a/x sits deeper than
# another name /b that BFS meets first: C queues the inode at its canonical name
# (notes §3.1). The writer of branch erofs at 72386b2 numbered it at /b; found by
# test_c_images_of_random_trees, fixed on that branch since.
HARDLINK_ORDER = (
    b"/ 0 40755 3 0 0 0 0.0 - - -\n"
    b"/a 0 40755 2 0 0 0 0.0 - - -\n"
    b"/a/x 0 100644 2 0 0 0 0.0 - - -\n"
    b"/b 0 @120000 - - - - 0.0 /a/x - -\n"
)


@pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")
def test_writer_hardlink_order() -> None:
    image = mkcomposefs(HARDLINK_ORDER, version=1)
    fs = read_erofs(image)
    assert signature(fs) == signature(parse_dumpfile(HARDLINK_ORDER))  # the reader is right
    assert write_erofs(fs) == image


def test_too_deep() -> None:
    """Nesting beyond 2048 directories (no 4096-byte path goes deeper) is refused."""
    for depth, ok in [(2048, True), (2049, False)]:
        root = Directory(Stat(0o755))
        d = root
        for _ in range(depth):
            sub = Directory(Stat(0o755))
            d.entries[b"d"] = sub
            d = sub
        image = write_erofs(FileSystem(root))
        if ok:
            assert sum(1 for _ in read_erofs(image).walk()) == depth + 1
            assert image_objects(image) == set()
        else:
            with pytest.raises(ErofsError, match="deeper than 2048"):
                read_erofs(image)
            with pytest.raises(ErofsError, match="deeper than 2048"):
                image_objects(image)
