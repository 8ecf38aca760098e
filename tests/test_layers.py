"""Layers → tree: whiteouts, opaque directories, hard links, merging, hostile input.

Hand-made entry sequences, each rule checked against upstream's documented semantics
(``composefs-rs`` ``image.rs``/``generic_tree.rs``, notes §4.6). The end-to-end oracle
(real images unpacked by umoci) is ``test_tree_oracle.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_composefs._errors import FormatError, TreeError
from trio_composefs.formats import EntryType, ExternalChunk, TarEntry, fsverity_digest
from trio_composefs.fs import Directory, FileSystem, Leaf
from trio_composefs.fs._layers import (
    MAX_DEPTH,
    TreeBuilder,
    transform_for_oci,
    tree_from_layers,
)
from trio_composefs.fs._tree import (
    BlockDevice,
    CharDevice,
    ExternalFile,
    Fifo,
    InlineFile,
    Stat,
    Symlink,
)


def entry(path: str, kind: EntryType = EntryType.REGULAR, **kw: Any) -> TarEntry:
    defaults: dict[str, Any] = {
        "mode": 0o755 if kind is EntryType.DIRECTORY else 0o644,
        "uid": 0,
        "gid": 0,
        "mtime": 1000,
        "mtime_nsec": 0,
        "link_target": None,
        "rdev": 0,
        "xattrs": {},
        "content": b"",
    }
    defaults.update(kw)
    return TarEntry(path=path, type=kind, **defaults)


def d(path: str, **kw: Any) -> TarEntry:
    return entry(path, EntryType.DIRECTORY, **kw)


def f(path: str, data: bytes = b"", **kw: Any) -> TarEntry:
    return entry(path, content=data, **kw)


def link(path: str, target: str) -> TarEntry:
    return entry(path, EntryType.HARDLINK, link_target=target)


def sym(path: str, target: str) -> TarEntry:
    return entry(path, EntryType.SYMLINK, link_target=target, mode=0o777)


def build(*layers: list[TarEntry]) -> FileSystem:
    builder = TreeBuilder()
    for layer in layers:
        builder.add_layer(layer)
    return builder.filesystem


def paths(fs: FileSystem) -> list[str]:
    return [p.decode() for p, _ in fs.walk()]


def lookup(fs: FileSystem, path: str) -> Directory | Leaf:
    node: Directory | Leaf = fs.root
    for part in path.strip("/").split("/"):
        assert isinstance(node, Directory)
        node = node.entries[part.encode()]
    return node


def test_contents_of_every_kind() -> None:
    digest = fsverity_digest(b"x" * 65)
    fs = build(
        [
            d("/"),
            f("/small", b"hello"),
            f("/s64", b"y" * 64),
            f("/big", ExternalChunk(digest, 65)),  # type: ignore[arg-type]
            sym("/sym", "../t"),
            entry("/chr", EntryType.CHAR, rdev=259),
            entry("/blk", EntryType.BLOCK, rdev=1793),
            entry("/fifo", EntryType.FIFO),
        ]
    )
    assert paths(fs) == ["/", "/big", "/blk", "/chr", "/fifo", "/s64", "/small", "/sym"]
    assert lookup(fs, "small").content == InlineFile(b"hello")  # type: ignore[union-attr]
    assert lookup(fs, "s64").content == InlineFile(b"y" * 64)  # type: ignore[union-attr]
    big = lookup(fs, "big").content  # type: ignore[union-attr]
    assert big == ExternalFile(65, digest)
    assert lookup(fs, "sym").content == Symlink(b"../t")  # type: ignore[union-attr]
    assert lookup(fs, "chr").content == CharDevice(259)  # type: ignore[union-attr]
    assert lookup(fs, "blk").content == BlockDevice(1793)  # type: ignore[union-attr]
    assert lookup(fs, "fifo").content == Fifo()  # type: ignore[union-attr]


def test_stat_and_names_as_bytes() -> None:
    name = b"caf\xe9-\xff".decode("utf-8", "surrogateescape")
    fs = build(
        [
            f(
                "/" + name,
                b"",
                mode=0o104755,  # type bits in the mode field (old Go archive/tar)
                uid=4_000_000_000,
                gid=70000,
                mtime=-5,
                mtime_nsec=123456789,
                xattrs={"user.x\udcff": b"\x00\xff"},
            )
        ]
    )
    (got,) = fs.root.entries.items()
    assert got[0] == b"caf\xe9-\xff"
    assert got[1].stat == Stat(
        0o4755, 4_000_000_000, 70000, -5, 123456789, {b"user.x\xff": b"\x00\xff"}
    )


def test_root_entry_sets_the_root_stat_and_must_be_a_directory() -> None:
    fs = build([d("/", mode=0o700, uid=5, mtime=7, xattrs={"user.a": b"1"})])
    assert fs.root.stat == Stat(0o700, 5, 0, 7, 0, {b"user.a": b"1"})
    assert build([]).root.stat == Stat(0)  # uninitialised, as upstream
    with pytest.raises(TreeError, match="root must be a directory") as info:
        build([f("/", b"")])
    assert isinstance(info.value, FormatError)


def test_whiteout_removes_lower_and_same_layer_entries() -> None:
    fs = build(
        [d("/a"), f("/a/x"), f("/a/y"), d("/a/sub"), f("/a/sub/z")],
        [f("/a/new"), f("/a/.wh.x"), f("/a/.wh.new"), f("/a/.wh.sub"), f("/a/.wh.missing")],
    )
    assert paths(fs) == ["/", "/a", "/a/y"]


def test_opaque_clears_immediately_even_within_the_layer() -> None:
    fs = build(
        [d("/a"), f("/a/old"), d("/a/sub"), f("/a/sub/deep")],
        [d("/a"), f("/a/before"), f("/a/.wh..wh..opq"), f("/a/after")],
    )
    # upstream: the marker clears everything present, "before" included (issue #8)
    assert paths(fs) == ["/", "/a", "/a/after"]


def test_other_wh_names_remove_the_rest_of_the_name() -> None:
    fs = build([d("/a"), f("/a/.wh.plnk"), f("/a/keep")], [f("/a/.wh..wh.plnk")])
    # the first layer's ".wh.plnk" is itself a whiteout of "plnk" (nothing), not an entry
    assert paths(fs) == ["/", "/a", "/a/keep"]
    fs = build([f("/.wh.")])
    assert paths(fs) == ["/"]


def test_whiteout_in_a_missing_directory_does_nothing() -> None:
    fs = build([f("/gone/.wh.x"), f("/gone2/.wh..wh..opq")])
    assert paths(fs) == ["/"]


def test_hard_links_share_one_leaf_within_and_across_layers() -> None:
    fs = build(
        [d("/a"), f("/a/t", b"data", uid=3), link("/a/l1", "/a/t")],
        [link("/l2", "/a/t"), link("/l3", "a/l1")],
    )
    t = lookup(fs, "a/t")
    assert lookup(fs, "a/l1") is t
    assert lookup(fs, "l2") is t
    assert lookup(fs, "l3") is t
    assert fs.nlinks()[id(t)] == 4
    assert t.stat.uid == 3  # the link entries' own metadata is ignored
    # replacing the original name keeps the others
    fs2 = build([f("/t", b"1"), link("/l", "/t")], [f("/t", b"2")])
    assert lookup(fs2, "l").content == InlineFile(b"1")  # type: ignore[union-attr]
    # a link to a symlink is a link to the symlink itself
    fs3 = build([sym("/s", "x"), link("/l", "/s")])
    assert lookup(fs3, "l") is lookup(fs3, "s")


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ([link("/l", "/nothing")], "target does not exist"),
        ([d("/dir"), link("/l", "/dir")], "target is a directory"),
        ([link("/l", "/")], "target is a directory"),
        ([f("/file"), link("/l", "/file/x")], "goes through a non-directory"),
        ([link("/l", "/no/such")], "target does not exist"),
    ],
)
def test_bad_hard_links_name_both_paths(layer: list[TarEntry], message: str) -> None:
    with pytest.raises(TreeError, match=message) as info:
        build(layer)
    text = str(info.value)
    assert "'/l'" in text
    assert repr(layer[-1].link_target) in text
    assert "layer 1" in text


def test_directory_over_directory_keeps_children_and_replaces_stat() -> None:
    fs = build(
        [d("/a", mode=0o700, uid=1, xattrs={"user.old": b"1"}), f("/a/x")],
        [d("/a", mode=0o750, uid=2, mtime=99, mtime_nsec=5, xattrs={"user.new": b"2"})],
    )
    a = lookup(fs, "a")
    assert isinstance(a, Directory)
    assert list(a.entries) == [b"x"]
    assert a.stat == Stat(0o750, 2, 0, 99, 5, {b"user.new": b"2"})


def test_anything_else_replaces() -> None:
    fs = build([d("/a"), f("/a/x"), f("/b")], [f("/a", b"now a file"), d("/b")])
    assert paths(fs) == ["/", "/a", "/b"]
    assert isinstance(lookup(fs, "a"), Leaf)
    assert isinstance(lookup(fs, "b"), Directory)
    fs = build([f("/x", b"1")], [sym("/x", "y")], [f("/x", b"3")])
    assert lookup(fs, "x").content == InlineFile(b"3")  # type: ignore[union-attr]


def test_missing_parents_are_created_deterministically() -> None:
    fs = build([f("/a/b/c", b"x", mtime=1234, mtime_nsec=56, uid=7)])
    for name in ("a", "a/b"):
        node = lookup(fs, name)
        assert isinstance(node, Directory)
        assert node.stat == Stat(0o755, 0, 0, 1234, 56, {})
    # a later entry for the directory replaces the invented stat, keeping the children
    fs = build([f("/a/b", b"x", mtime=5)], [d("/a", mode=0o700, mtime=6, uid=9)])
    a = lookup(fs, "a")
    assert isinstance(a, Directory)
    assert a.stat == Stat(0o700, 9, 0, 6, 0, {})
    assert b"b" in a.entries


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ([f("/a/../b")], r"'\.\.' component"),
        ([f("/a/x"), f("/a/..")], r"'\.\.' component"),  # after a sibling (shortcut)
        ([f("/a/x"), f("/a/" + "n" * 256)], "256 bytes"),
        ([f("/a/x"), f("/a/n\0")], "NUL"),
        ([f("/" + "n" * 256)], "256 bytes"),
        ([f("/a\0b")], "NUL"),
        ([sym("/s", "/etc"), f("/s/passwd")], "goes through a symlink, '/s'"),
        ([f("/file"), f("/file/x")], "goes through a non-directory, '/file'"),
        ([f("/file"), f("/file/.wh.x")], "non-directory"),
        ([f("/a/" + "x/" * MAX_DEPTH + "y")], "components deep"),
    ],
)
def test_hostile_paths_get_clear_errors(layer: list[TarEntry], message: str) -> None:
    builder = TreeBuilder()
    with pytest.raises(TreeError, match=message) as info:
        builder.add_layer(layer, name="sha256:abc")
    assert "sha256:abc" in str(info.value)
    assert "entry '" in str(info.value)


def test_names_of_255_bytes_and_deep_trees_are_fine() -> None:
    fs = build([f("/" + "n" * 255)])
    assert paths(fs) == ["/", "/" + "n" * 255]
    deep = "/x" * (MAX_DEPTH - 1) + "/leaf"
    fs = build([f(deep, b"ok")])
    assert sum(1 for _ in fs.walk()) == MAX_DEPTH + 1


def test_inline_external_consistency() -> None:
    digest = fsverity_digest(b"x" * 64)
    with pytest.raises(TreeError, match="64 bytes stored as an object"):
        build([f("/x", ExternalChunk(digest, 64))])  # type: ignore[arg-type]
    with pytest.raises(TreeError, match="65 bytes stored inline"):
        build([f("/x", b"x" * 65)])


def test_transform_for_oci() -> None:
    fs = build(
        [
            d("/", mode=0o700, uid=9, xattrs={"security.selinux": b"root_t"}),
            d(
                "/usr",
                mode=0o751,
                uid=1,
                gid=2,
                mtime=500,
                mtime_nsec=77,
                xattrs={"security.capability": b"c", "user.u": b"u", "security.selinux": b"s"},
            ),
            d("/run", mtime=900),
            f("/run/pid", b"1"),
            d("/run/sub"),
            f("/bin", b"", xattrs={"trusted.x": b"t", "user.y": b"y", "security.capability": b"k"}),
            link("/bin2", "/bin"),
        ]
    )
    transform_for_oci(fs)
    assert fs.root.stat == Stat(0o751, 1, 2, 500, 77, {b"security.capability": b"c"})
    run = lookup(fs, "run")
    assert isinstance(run, Directory)
    assert not run.entries
    assert (run.stat.mtime, run.stat.mtime_nsec, run.stat.mode) == (500, 77, 0o755)
    assert lookup(fs, "bin").stat.xattrs == {b"security.capability": b"k"}
    assert lookup(fs, "usr").stat.xattrs == {b"security.capability": b"c"}


def test_transform_keep_user_xattrs_and_root_copy_is_independent() -> None:
    fs = build(
        [
            d("/usr", xattrs={"user.u": b"u", "trusted.t": b"t"}),
            f("/x", b"", xattrs={"user.a": b"1"}),
        ]
    )
    transform_for_oci(fs, keep_user_xattrs=True)
    assert fs.root.stat.xattrs == {b"user.u": b"u"}
    assert lookup(fs, "x").stat.xattrs == {b"user.a": b"1"}
    fs.root.stat.xattrs[b"user.z"] = b""
    assert b"user.z" not in lookup(fs, "usr").stat.xattrs


def test_transform_without_a_usr_directory() -> None:
    """Upstream refuses these; we keep the root the layers gave (0755 when none did)."""
    fs = build([d("/etc")])
    fs.root.stat.xattrs[b"security.selinux"] = b"x"
    transform_for_oci(fs)
    assert (fs.root.stat.mode, fs.root.stat.uid, fs.root.stat.mtime) == (0o755, 0, 0)
    assert fs.root.stat.xattrs == {}
    fs = build([sym("/usr", "x")])
    transform_for_oci(fs)
    assert fs.root.stat.mode == 0o755
    # a /run that is not a directory is left alone (upstream fails here)
    fs = build([d("/usr"), sym("/run", "var/run")])
    transform_for_oci(fs)
    assert lookup(fs, "run").content == Symlink(b"var/run")  # type: ignore[union-attr]


def test_tree_from_layers() -> None:
    fs = tree_from_layers([[d("/usr", mtime=3), f("/usr/a", b"1")], [f("/usr/.wh.a"), f("/usr/b")]])
    assert paths(fs) == ["/", "/usr", "/usr/b"]
    assert fs.root.stat.mtime == 3
    with pytest.raises(TreeError, match="layer 2"):
        tree_from_layers([[d("/usr")], [link("/x", "/nope")]])


def test_removed_or_replaced_directories_are_not_reused() -> None:
    """The last-parent shortcut never writes into a directory that left the tree."""
    fs = build([f("/a/b/x"), f("/.wh.a"), f("/a/b/y", mtime=9)])
    assert paths(fs) == ["/", "/a", "/a/b", "/a/b/y"]
    assert lookup(fs, "a").stat.mtime == 9  # made again, as a missing parent
    fs = build([f("/a/b/x"), f("/a/.wh..wh..opq"), f("/a/b/y")])
    assert paths(fs) == ["/", "/a", "/a/b", "/a/b/y"]
    with pytest.raises(TreeError, match="non-directory, '/a'"):
        build([f("/a/b/x"), f("/a", b"file now"), f("/a/b/y")])
    fs = build([f("/a/b/x"), d("/a", mode=0o700), f("/a/b/y")])  # dir over dir: same object
    assert paths(fs) == ["/", "/a", "/a/b", "/a/b/x", "/a/b/y"]
    fs = build([f("/a/b/x"), f("/./a//b/./z"), f("/a/b/w")])  # unnormalised paths too
    assert paths(fs) == ["/", "/a", "/a/b", "/a/b/w", "/a/b/x", "/a/b/z"]


_SEGMENTS = st.sampled_from(["a", "b", ".", "..", "", ".wh.a", ".wh..wh..opq", "n" * 256, "x\0"])


@st.composite
def hostile_entry(draw: st.DrawFn) -> TarEntry:
    path = "/".join(draw(st.lists(_SEGMENTS, max_size=5)))
    kind = draw(st.sampled_from(list(EntryType)))
    target = "/".join(draw(st.lists(_SEGMENTS, max_size=4)))
    data = draw(st.sampled_from([b"", b"x" * 64, b"x" * 65]))
    content: bytes | ExternalChunk = data
    if kind is EntryType.REGULAR and draw(st.booleans()):
        content = ExternalChunk(fsverity_digest(b""), draw(st.sampled_from([1, 64, 65])))
    link = target if kind in (EntryType.HARDLINK, EntryType.SYMLINK) else None
    return entry(path, kind, link_target=link, content=content)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(hostile_entry(), max_size=8), max_size=4))
def test_any_entry_sequence_builds_or_fails_cleanly(layers: list[list[TarEntry]]) -> None:
    """Arbitrary input: a TreeError or a sound tree, never another exception."""
    builder = TreeBuilder()
    message = "tree: "
    try:
        for layer in layers:
            builder.add_layer(layer)
    except TreeError as e:
        message = str(e)
    assert message.startswith("tree: ")
    fs = builder.filesystem
    directories = [id(i) for _, i in fs.walk() if isinstance(i, Directory)]
    assert len(directories) == len(set(directories))  # a tree: no directory twice
    for path, _inode in fs.walk():
        parts = path.split(b"/")[1:] if path != b"/" else []
        assert all(p and p not in (b".", b"..") and len(p) <= 255 for p in parts), path
        assert b"\0" not in path
