"""A pull builds its image tree from the entries its layer imports tap (``oci/_tree_tap.py``).

The oracles: the entries an import hands out equal ``iter_entries`` over the layer's
stored splitstream (the re-reading path, tested against real tools elsewhere); the image
ID a pull makes equals the one built by re-reading every layer (``layers_filesystem`` +
``store_image``) and C ``mkcomposefs --print-digest-only`` of our dumpfile of the tree.
Every path is checked: all layers tapped (nothing read back), some layers already stored,
a buffer cap so small that later layers are read back, a tap that gives up, faults.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings

from ocifixtures import Layout
from oracles import need_c_tool
from test_pull_images import LAYER1, LAYER2, entry, tar_of
from trio_composefs import TarError, TreeError
from trio_composefs.formats import Digest, TarEntry, iter_chunks, parse_splitstream
from trio_composefs.formats._tarentries import iter_entries
from trio_composefs.fs import write_dumpfile
from trio_composefs.importer import EntryRun, import_layer
from trio_composefs.oci import (
    _image_tree,
    _tree_tap,
    config_content_id,
    manifest_content_id,
    open_image,
    open_source,
    parse_source,
    pull_image,
)
from trio_composefs.oci._image_tree import layers_filesystem
from trio_composefs.repository import Repository
from trio_composefs.repository._images import store_image
from trio_composefs.testing import FaultyRepository, FaultySource, ImportChecker

ROOT = os.geteuid() == 0
GNU_TAR = shutil.which("tar")


# --------------------------------------------------------------------------- helpers


class Sink:
    """An :class:`~trio_composefs.importer.EntrySink` that keeps everything."""

    def __init__(self) -> None:
        self.entries: list[TarEntry] = []
        self.runs = 0
        self.errors: list[Exception] = []

    async def add_entries(self, run: EntryRun) -> None:
        self.runs += 1
        if self.errors:
            return
        try:
            self.entries += run.entries()
        except TarError as error:
            self.errors.append(error)


def stored_entries(repo: Repository, stream: Digest) -> list[TarEntry]:
    data = repo.read_object(stream)
    info = parse_splitstream(data, algorithm=repo.algorithm)
    return list(iter_entries(iter_chunks(data, info, repo.object_size)))


def sha(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


async def tapped_import(repo: Repository, tar: bytes) -> tuple[Sink, Digest]:
    sink = Sink()
    stats = await import_layer(repo, [tar], sha(tar), entries=sink)
    return sink, stats.splitstream


@pytest.fixture
def taps(monkeypatch: pytest.MonkeyPatch) -> list[_tree_tap.ImageTreeTap]:
    """Every ImageTreeTap a pull makes in this test."""
    made: list[_tree_tap.ImageTreeTap] = []
    real = _tree_tap.ImageTreeTap.__attrs_post_init__

    def record(self: _tree_tap.ImageTreeTap) -> None:
        real(self)
        made.append(self)

    monkeypatch.setattr(_tree_tap.ImageTreeTap, "__attrs_post_init__", record)
    return made


@pytest.fixture(params=["trio-thread", "worker-thread"])
def apply_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of applying the entries of the layer whose turn it is."""
    monkeypatch.setattr(_tree_tap, "APPLY_ON_TRIO_THREAD", request.param == "trio-thread")
    return str(request.param)


@pytest.fixture
def read_back(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the layers read back from the repository (tap or image build)."""
    names: list[str] = []
    real = _image_tree.layer_entries

    def counting(repo: Repository, stream: Digest, *, name: str = "layer") -> Iterator[TarEntry]:
        names.append(name)
        return real(repo, stream, name=name)

    monkeypatch.setattr(_image_tree, "layer_entries", counting)
    monkeypatch.setattr(_tree_tap, "layer_entries", counting)
    return names


def image_by_rereading(repo: Repository, tag: str) -> Digest:
    """The oracle: the image built from the stored layer streams alone."""
    stored = open_image(repo, tag)
    return store_image(repo, layers_filesystem(repo, stored.layers), version=1)


def c_digest(repo: Repository, tag: str, tmp: Path) -> str:
    mkcomposefs = need_c_tool("mkcomposefs")
    stored = open_image(repo, tag)
    dump = tmp / f"{tag}.dump"
    dump.write_bytes(b"".join(write_dumpfile(layers_filesystem(repo, stored.layers))))
    versions = ["--min-version=1", "--max-version=1"]
    return subprocess.run(
        [mkcomposefs, *versions, "--print-digest-only", "--from-file", str(dump)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


async def pull(repo: Any, layout: Path, tag: str, **kw: Any) -> Digest:
    async with open_source(parse_source(f"oci:{layout}:{tag}")) as source:
        stats = await pull_image(repo, source, tag=tag, **kw)
    assert stats.image is not None
    return stats.image


def layout_of(path: Path, images: dict[str, list[bytes]], compression: Any = "gzip") -> Path:
    layout = Layout(path)
    for tag, tars in images.items():
        comp = compression[: len(tars)] if isinstance(compression, list) else compression
        layout.add_image(tars, compression=comp, tag=tag)
    layout.write_index()
    return path


def file_layer(prefix: str, count: int, size: int) -> bytes:
    members = [(entry(prefix, tarfile.DIRTYPE), b"")]
    members += [(entry(f"{prefix}/f{i}"), bytes([i % 251]) * size) for i in range(count)]
    return tar_of(members)


def rich_tars(tmp: Path) -> list[bytes]:
    if not ROOT or GNU_TAR is None:
        pytest.skip("the rich layers need root (devices, owners) and GNU tar")
    from test_tree_oracle import rich_layers

    return rich_layers(tmp)[0]


# --------------------------------------------------------------------------- the importer's tap


def odd_layer() -> bytes:
    """Every kind of entry the splitter knows, with the splitter's edge cases."""
    big = bytes(range(256)) * 5000  # > 1 MiB: streamed to its writer
    long_name = "d/" + "n" * 150
    members = [
        (entry("d", tarfile.DIRTYPE), b""),
        (entry("d/empty"), b""),
        (entry("d/s64"), b"x" * 64),
        (entry("d/s65"), b"y" * 65),
        (entry("d/big"), big),
        (entry(long_name), b"z" * 100),
        (entry("d/hard", tarfile.LNKTYPE, linkname="d/big"), b""),
        (entry("d/sym", tarfile.SYMTYPE, linkname="../nowhere"), b""),
        (entry("d/chr", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
        (entry("d/blk", tarfile.BLKTYPE, devmajor=300, devminor=70000), b""),
        (entry("d/fifo", tarfile.FIFOTYPE), b""),
        (entry("d/x", pax_headers={"SCHILY.xattr.user.a": "1", "mtime": "5.25"}), b"q" * 70),
        (entry("d/.wh.gone"), b""),
        (entry("d/.wh..wh..opq"), b""),
    ]
    return tar_of(members)


@pytest.mark.parametrize("which", ["odd", "layer1", "layer2", "empty", "many"])
async def test_tapped_entries_equal_the_stored_streams(repo: Repository, which: str) -> None:
    makers: dict[str, Callable[[], bytes]] = {
        "odd": odd_layer,
        "layer1": lambda: tar_of(LAYER1),
        "layer2": lambda: tar_of(LAYER2),
        "empty": lambda: tar_of([]),
        "many": lambda: file_layer("m", 300, 70),  # several builder messages
    }
    tar = makers[which]()
    sink, stream = await tapped_import(repo, tar)
    assert not sink.errors
    assert sink.entries == stored_entries(repo, stream)
    if which == "many":
        assert sink.runs > 1


async def test_rich_layers_tapped_equal_stored(repo: Repository, tmp_path: Path) -> None:
    for tar in rich_tars(tmp_path):
        sink, stream = await tapped_import(repo, tar)
        assert sink.entries == stored_entries(repo, stream)


@pytest.mark.parametrize("size", [1, 200])
async def test_an_entry_no_tree_holds_fails_when_made_not_the_import(
    repo: Repository, size: int
) -> None:
    # ".." paths are split and stored, but no tree can be built from them; the run
    # says so when its entries are made, with the error reading the layer back gives
    tar = tar_of([(entry("a"), b"1" * 80), (entry("b/../../etc"), b"x" * size), (entry("c"), b"2")])
    sink, stream = await tapped_import(repo, tar)
    assert len(sink.errors) == 1
    with pytest.raises(TarError) as stored:
        stored_entries(repo, stream)
    assert str(sink.errors[0]) == str(stored.value)


async def test_skipped_layer_sends_nothing(repo: Repository) -> None:
    tar = tar_of(LAYER1)
    await tapped_import(repo, tar)
    sink, _ = await tapped_import(repo, tar)
    assert sink.entries == []
    assert sink.runs == 0


# --------------------------------------------------------------------------- pulls


async def check_pull(
    repo: Repository, layout: Path, tag: str, tmp: Path, *, c: bool = True, **kw: Any
) -> Digest:
    image = await pull(repo, layout, tag, **kw)
    assert image == image_by_rereading(repo, tag)
    if c:
        assert c_digest(repo, tag, tmp) == image.hex()
    return image


async def test_two_layer_pull_reads_nothing_back(
    repo: Repository, tmp_path: Path, taps: list[Any], read_back: list[str], apply_mode: str
) -> None:
    layout = layout_of(tmp_path / "lay", {"t": [tar_of(LAYER1), tar_of(LAYER2)]})
    image = await pull(repo, layout, "t")
    assert read_back == []
    (tap,) = taps
    assert (tap.applied, tap.reread, tap.failed) == (2, 0, False)
    read_back.clear()
    assert image == image_by_rereading(repo, "t")
    assert c_digest(repo, "t", tmp_path) == image.hex()


async def test_rich_layers_pull(
    repo: Repository, tmp_path: Path, taps: list[Any], read_back: list[str], apply_mode: str
) -> None:
    tars = rich_tars(tmp_path / "src")
    # the top layer is largest in one image: it imports first and waits in the buffer
    top_heavy = [*tars, file_layer("heavy", 50, 100_000)]
    layout = layout_of(
        tmp_path / "lay", {"rich": tars, "top": top_heavy}, compression=["gzip", None, "zstd", None]
    )
    for tag in ("rich", "top"):
        read_back.clear()
        image = await pull(repo, layout, tag, layer_jobs=4)
        if tag == "rich":
            assert read_back == []
        else:  # the first three are stored: read back in order, the fourth tapped
            assert len(read_back) == 3
            assert taps[-1].reread == 3
        read_back.clear()
        assert image == image_by_rereading(repo, tag)
        assert c_digest(repo, tag, tmp_path) == image.hex()


async def test_top_layer_imported_first_is_buffered_then_applied(
    repo: Repository, tmp_path: Path, taps: list[Any], read_back: list[str], apply_mode: str
) -> None:
    base = tar_of(LAYER1)
    top = file_layer("usr/lib", 40, 200_000)  # the biggest, imported first
    layout = layout_of(tmp_path / "lay", {"t": [base, file_layer("etc/x", 3, 10), top]})
    image = await check_pull(repo, layout, "t", tmp_path / "c", layer_jobs=3, c=False)
    (tap,) = taps
    assert (tap.applied, tap.reread, tap.failed) == (3, 0, False)
    assert c_digest(repo, "t", tmp_path) == image.hex()


@pytest.mark.parametrize("stored", [[0], [1], [0, 2], [2]])
async def test_mixed_pull_some_layers_already_stored(
    repo: Repository, tmp_path: Path, stored: list[int], taps: list[Any], apply_mode: str
) -> None:
    layers = [tar_of(LAYER1), file_layer("usr/share", 5, 3000), tar_of(LAYER2)]
    layout = layout_of(tmp_path / "lay", {"t": layers})
    for i in stored:  # stored before (as another image's layer would be): the pull skips it
        await import_layer(repo, [layers[i]], sha(layers[i]))
    await check_pull(repo, layout, "t", tmp_path)
    tap = taps[-1]
    assert (tap.reread, tap.applied, tap.failed) == (len(stored), 3, False)


async def test_tiny_buffer_reads_later_layers_back(
    repo: Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    taps: list[Any],
    read_back: list[str],
    apply_mode: str,
) -> None:
    monkeypatch.setattr(_tree_tap, "BUFFER_ENTRIES", 2)
    tars = [file_layer("usr", 3, 70), file_layer("usr/a", 20, 100), file_layer("usr/b", 30, 90_000)]
    layout = layout_of(tmp_path / "lay", {"t": tars})
    gate = trio.Event()
    real_run = _tree_tap.ImageTreeTap.run

    async def late_run(self: _tree_tap.ImageTreeTap) -> None:
        await gate.wait()  # every layer's entries arrive before the first applies
        await real_run(self)

    monkeypatch.setattr(_tree_tap.ImageTreeTap, "run", late_run)
    from trio_composefs.oci import _pull

    real_ensure = _pull._Pull.ensure_layer
    done = 0

    async def ensure(self: Any, *a: Any, **kw: Any) -> Any:
        nonlocal done
        result = await real_ensure(self, *a, **kw)
        done += 1
        if done == len(tars):
            gate.set()
        return result

    monkeypatch.setattr(_pull._Pull, "ensure_layer", ensure)
    image = await pull(repo, layout, "t", layer_jobs=3)
    (tap,) = taps
    assert (tap.cap, tap.failed) == (2, False)
    assert tap.reread >= 2  # only what fits 2 entries waited; the others were read back
    assert len(read_back) == tap.reread
    read_back.clear()
    assert image == image_by_rereading(repo, "t")
    assert c_digest(repo, "t", tmp_path) == image.hex()


async def test_the_layer_being_applied_waits_for_the_applier_past_the_cap(
    repo: Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    taps: list[Any],
    read_back: list[str],
) -> None:
    monkeypatch.setattr(_tree_tap, "BUFFER_ENTRIES", 100)
    monkeypatch.setattr(_tree_tap, "APPLY_ON_TRIO_THREAD", False)
    real_apply = _tree_tap.ImageTreeTap._apply

    def slow_apply(self: Any, runs: list[EntryRun], diff_id: str) -> None:
        time.sleep(0.02)  # an applier slower than the import
        real_apply(self, runs, diff_id)

    monkeypatch.setattr(_tree_tap.ImageTreeTap, "_apply", slow_apply)
    most = 0
    real_take = _tree_tap._Layer.take

    def take(self: Any) -> list[EntryRun]:
        nonlocal most
        most = max(most, self.waiting)
        return real_take(self)

    monkeypatch.setattr(_tree_tap._Layer, "take", take)
    # files of 100 bytes: one object each, so a run of entries is at most 64 long
    layout = layout_of(tmp_path / "lay", {"t": [file_layer("usr", 1000, 100)]})
    image = await pull(repo, layout, "t")
    (tap,) = taps
    assert (tap.applied, tap.reread, tap.failed) == (1, 0, False)
    assert read_back == []
    assert 100 < most <= 100 + 64  # past the cap by at most one run: the import waited
    assert image == image_by_rereading(repo, "t")


async def test_a_tap_that_gives_up_falls_back_to_reading_back(
    repo: Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    taps: list[Any],
    read_back: list[str],
    apply_mode: str,
) -> None:
    layout = layout_of(tmp_path / "lay", {"t": [tar_of(LAYER1), tar_of(LAYER2)]})
    calls = 0
    real = _tree_tap.ImageTreeTap._apply

    def flaky(self: Any, runs: list[EntryRun], diff_id: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            real(self, [EntryRun(runs[0].parts[:1])], diff_id)  # half applied, then a bug
            raise RuntimeError("a bug in the tap")
        real(self, runs, diff_id)

    monkeypatch.setattr(_tree_tap.ImageTreeTap, "_apply", flaky)
    image = await pull(repo, layout, "t", layer_jobs=1)
    assert taps[0].failed
    assert taps[0].result() is None
    assert len(read_back) == 2  # the image build read both layers
    read_back.clear()
    assert image == image_by_rereading(repo, "t")


async def test_a_layer_the_tree_refuses_names_nothing(repo: Repository, tmp_path: Path) -> None:
    bad = tar_of(
        [
            (entry("usr", tarfile.DIRTYPE), b""),
            (entry("usr/x", tarfile.LNKTYPE, linkname="no"), b""),
        ]
    )
    layout = Layout(tmp_path / "lay")
    image = layout.add_image([tar_of(LAYER1), bad], tag="bad")
    layout.write_index()
    with pytest.RaisesGroup(TreeError, allow_unwrapped=True, flatten_subgroups=True):
        await pull(repo, tmp_path / "lay", "bad")
    assert repo.has_stream(manifest_content_id(image.manifest_digest)) is None
    assert repo.has_stream(config_content_id(image.config_digest)) is None
    assert repo.list_images() == {}


@pytest.mark.parametrize("nth", [1, 2, 3])
async def test_a_failed_layer_names_nothing_and_the_next_pull_works(
    tmp_path: Path, nth: int, taps: list[Any]
) -> None:
    tars = [tar_of(LAYER1), file_layer("usr/a", 20, 5000), file_layer("usr/b", 5, 50_000)]
    layout = layout_of(tmp_path / "lay", {"t": tars})
    with Repository.init(tmp_path / "repo", insecure=True) as repo:
        repo.begin_object().abort()
        checker = ImportChecker(repo)
        source = FaultySource(open_source(parse_source(f"oci:{layout}:t")))
        source.fail(nth=nth, after_bytes=100)
        with pytest.RaisesGroup(ConnectionResetError, flatten_subgroups=True):
            async with source:
                await pull_image(repo, source, tag="t", layer_jobs=2)
        checker.assert_nothing_published()
        await checker.assert_consistent()
        assert repo.list_images() == {}
        async with source:
            stats = await pull_image(repo, source, tag="t", layer_jobs=2)
        assert stats.image == image_by_rereading(repo, "t")


async def test_a_failing_object_write_names_nothing(tmp_path: Path) -> None:
    tars = [tar_of(LAYER1), file_layer("usr/a", 20, 5000)]
    layout = layout_of(tmp_path / "lay", {"t": tars})
    with Repository.init(tmp_path / "repo", insecure=True) as repo:
        repo.begin_object().abort()
        checker = ImportChecker(repo)
        faulty = FaultyRepository(repo).fail("write", nth=5)
        with pytest.RaisesGroup(OSError, flatten_subgroups=True):
            await pull(faulty, layout, "t")
        checker.assert_nothing_published()
        await checker.assert_consistent()
        image = await pull(repo, layout, "t")
        assert image == image_by_rereading(repo, "t")


# --------------------------------------------------------------------------- random stacks


def _stacks() -> Any:
    from test_tree_property import layer_stack

    return layer_stack()


@pytest.mark.skipif(not ROOT, reason="the random stacks hold devices (root)")
@settings(
    max_examples=int(os.environ.get("TAP_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_stacks())
def test_random_stacks_tapped_equal_reread(stack: Any) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        base = Path(tmp)
        tars = stack.tars()
        # a /usr so that the OCI transform has something to copy
        tars = [tar_of([(entry("usr", tarfile.DIRTYPE), b"")]), *tars]
        layout = layout_of(base / "lay", {"t": tars}, compression=None)

        async def main() -> None:
            with Repository.init(base / "repo", insecure=True) as repo:
                try:
                    image = await pull(repo, layout, "t", layer_jobs=3)
                except (TreeError, TarError, ExceptionGroup) as caught:
                    leaves = caught.exceptions if isinstance(caught, ExceptionGroup) else [caught]
                    (error,) = leaves
                    assert isinstance(error, TreeError | TarError)
                    # refused: re-reading the stored layers refuses alike
                    found = [repo.has_stream(f"oci-layer-{sha(t)}") for t in tars]
                    streams = [(sha(t), d) for t, d in zip(tars, found, strict=True) if d]
                    assert len(streams) == len(tars)
                    with pytest.raises(type(error)):
                        layers_filesystem(repo, streams)
                    event(f"refused: {type(error).__name__}")
                    return
                assert image == image_by_rereading(repo, "t")
                event("built")

        trio.run(main)


async def test_a_layer_twice_in_one_image(
    repo: Repository, tmp_path: Path, taps: list[Any], read_back: list[str], apply_mode: str
) -> None:
    # the same diff_id twice: imported once (tapped), the other place reads it back
    layers = [tar_of(LAYER1), tar_of(LAYER2), tar_of(LAYER1)]
    layout = layout_of(tmp_path / "lay", {"t": layers})
    image = await pull(repo, layout, "t", layer_jobs=3)
    (tap,) = taps
    assert (tap.applied, tap.reread, tap.failed) == (3, 1, False)
    read_back.clear()
    assert image == image_by_rereading(repo, "t")
    assert c_digest(repo, "t", tmp_path) == image.hex()


def test_a_partial_tree_must_fit_the_layers(repo: Repository) -> None:
    from trio_composefs.fs import TreeBuilder

    with pytest.raises(ValueError, match="a tree of 3 layers for an image of 2"):
        layers_filesystem(
            repo,
            [("a", Digest.from_hex("0" * 64)), ("b", Digest.from_hex("0" * 64))],
            tree=_image_tree.PartialTree(TreeBuilder(), 3),
        )


def test_entries_of_the_splitter_are_entry_readers() -> None:
    """SplitterEntries over the splitter's own events gives what EntryReader gives over
    the chunks (inline bytes cut anywhere; large files as external chunks)."""
    from trio_composefs.formats import (
        END,
        NEED_DATA,
        ExternalChunk,
        FileStart,
        Inline,
        InlineChunk,
        SplitterEntries,
        TarSplitter,
        entry_from_header,
    )

    tar = odd_layer() + b"\0" * 100  # trailing bytes after the end are kept inline
    fake = Digest.from_hex("ab" * 32)
    for step, coalesce in itertools.product((1, 511, 4096, len(tar)), (False, True)):
        splitter = TarSplitter(coalesce=coalesce, zero_copy=coalesce)
        watch = SplitterEntries(splitter)
        ours: list[TarEntry] = []
        chunks: list[Any] = []
        for i in range(0, len(tar), step):
            splitter.receive_data(tar[i : i + step])
            while (event := splitter.next_event()) is not NEED_DATA:
                if isinstance(event, FileStart):
                    assert splitter.header is not None
                    ours.append(entry_from_header(splitter.header, ExternalChunk(fake, event.size)))
                    chunks.append(ExternalChunk(fake, event.size))
                elif isinstance(event, Inline):
                    chunks.append(InlineChunk(event.data))
                    ours += watch.inline(event)
        splitter.receive_data(b"")
        while (event := splitter.next_event()) is not END:
            assert isinstance(event, Inline)
            chunks.append(InlineChunk(event.data))
            assert watch.inline(event) == []
        assert ours == list(iter_entries(chunks)), (step, coalesce)
