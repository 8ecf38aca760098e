"""gc and fsck with composefs images, damaged roots and symlinked layout directories.

The damage is built with plain Python; the real library and CLI run on it; what is
asserted is what a user sees (files still there, exit codes, one-line errors naming
the file). The objects an image references are checked against C ``composefs-info
objects`` when it is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import sys
import tarfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ocifixtures import Layout
from oracles import c_tool
from test_fsck import cli
from trio_composefs import RepositoryError
from trio_composefs.formats import Algorithm, ContentType, InlineChunk, encode_splitstream
from trio_composefs.formats._splitstream import parse_splitstream
from trio_composefs.maintenance import gc
from trio_composefs.oci import open_image, open_source, parse_source, pull_image, tag_image
from trio_composefs.oci._image_tree import image_filesystem
from trio_composefs.repository import Repository, referenced_objects, store_image

ALG = Algorithm.SHA256


def blob(seed: str, size: int) -> bytes:
    out = bytearray()
    n = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{n}".encode()).digest()
        n += 1
    return bytes(out[:size])


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("usr", "usr/share"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1_700_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def files_for(seed: str, names: str | None = None) -> dict[str, bytes]:
    """Files over the inline limit (so the image references them as objects).

    With ``names``, the paths of ``files_for(names)``: an upper layer that replaces
    them, so the lower files are in no image, only in their layer stream.
    """
    prefix = names or seed
    return {f"usr/share/{prefix}-{i}": blob(f"{seed}{i}", 200 + 100 * i) for i in range(3)}


def objects(path: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in (path / "objects").glob("??/*")}


def tree(path: Path) -> dict[str, str]:
    """Every entry of the repository (files with their content hash, links with targets)."""
    out = {}
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            p = Path(root) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


async def pull(repo: Repository, layout: Path, tag: str) -> None:
    async with open_source(parse_source(f"oci:{layout}:{tag}")) as source:
        await pull_image(repo, source, tag=tag)


def build_image(repo: Repository, tag: str, ref: str | None) -> str:
    """The composefs image of a pulled image, stored and published; its hex digest."""
    digest = store_image(repo, image_filesystem(repo, open_image(repo, tag)))
    repo.publish_image(digest, ref)
    return digest.hex()


def layout_with(tmp: Path, images: dict[str, list[dict[str, bytes]]]) -> Path:
    layout = Layout(tmp / "layout")
    for tag, layers in images.items():
        layout.add_image([tar_of(files) for files in layers], tag=tag)
    return layout.write_index()


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("algorithm", [Algorithm.SHA256, Algorithm.SHA512])
async def test_gc_keeps_image_roots_and_their_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: Algorithm
) -> None:
    layout = layout_with(tmp_path, {"t": [files_for("a")]})
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=algorithm, insecure=True) as repo:
        await pull(repo, layout, "t")
        # The image pull commits is live through the config's composefs.image.v1 ref.
        pulled = repo.list_images()
        assert len(pulled) == 1
        dry = gc(repo, dry_run=True)
        assert dry.objects_removed == ()
        assert dry.links_pruned == ()
        hexd = build_image(repo, "t", "img")
        assert set(pulled) == {hexd}  # the same tree gives the same image
        image_obj = f"{hexd[:2]}/{hexd[2:]}"
        refs = {d.object_path() for d in referenced_objects(repo, repo.resolve_image(hexd))}
    assert len(refs) == 3
    tool = c_tool("composefs-info")
    if (
        tool is not None and algorithm is Algorithm.SHA256
    ):  # C knows only SHA-256 metacopy  # the C tool's list of objects is the oracle
        done = await trio.run_process(
            [tool, "objects", str(path / "objects" / image_obj)], capture_stdout=True
        )
        assert set(done.stdout.decode().split()) == refs
    (path / "streams/refs/oci/t").unlink()
    code, _out, err = await run_cli(capsys, "--repo", str(path), "gc")
    assert code == 0, err
    assert objects(path) == refs | {image_obj}
    # The image is intact: fsck parses it and finds every object.
    code, out, _ = await run_cli(capsys, "--repo", str(path), "fsck", "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["imagesChecked"] == 1
    assert doc["imagesCorrupted"] == 0
    # Without its ref, images/ is not a root: all goes, the link is pruned.
    (path / "images/refs/img").unlink()
    code, out, _ = await run_cli(capsys, "--repo", str(path), "gc", "--json")
    assert code == 0
    assert objects(path) == set()
    assert json.loads(out)["imagesPruned"] == 1
    assert not (path / "images" / hexd).is_symlink()


async def test_gc_keeps_image_named_by_config_ref(tmp_path: Path) -> None:
    """A stream's named ref ``composefs.image.v1`` keeps the image and its objects live."""
    layout = layout_with(tmp_path, {"t": [files_for("b")]})
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        await pull(repo, layout, "t")
        hexd = build_image(repo, "t", None)
        image = repo.resolve_image(hexd)
        keep = {d.object_path() for d in referenced_objects(repo, image)} | {image.object_path()}
        data = encode_splitstream(
            [InlineChunk(b"{}")],
            algorithm=ALG,
            content_type=ContentType.OCI_CONFIG,
            named_refs={"composefs.image.v1": image},
        )
        stream = repo.store_object(data)
        repo.publish_stream("test-config", stream, "cfg")
        (path / "streams/refs/oci/t").unlink()
        result = gc(repo)
        assert objects(path) == keep | {stream.object_path()}
        assert f"images/{hexd}" not in result.links_pruned
        # A reachable image that does not parse stops gc before any deletion.
        os.chmod(path / "objects" / image.object_path(), 0o644)
        (path / "objects" / image.object_path()).write_bytes(b"\0" * 2048)
        before = tree(path)
        with pytest.raises(RepositoryError, match=r"nothing was deleted.*composefs.image.v1"):
            gc(repo)
        assert tree(path) == before


async def test_gc_unparseable_image_root_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        bogus = repo.store_object(b"not an erofs image" * 100)
        repo.publish_image(bogus, "bad")
        junk = repo.store_object(b"unreferenced")
    before = tree(path)
    code, _out, err = await run_cli(capsys, "--repo", str(path), "gc")
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert f"images/{bogus.hex()}" in err
    assert "nothing was deleted" in err
    assert tree(path) == before
    assert junk.object_path() in objects(path)
    code, out, _ = await run_cli(capsys, "--repo", str(path), "fsck", "--json")
    doc = json.loads(out)
    assert code == 0  # cfsctl: --json exits 0 once the check ran
    assert doc["images_corrupted"] == 1
    assert [e["type"] for e in doc["problems"]] == ["image-invalid"]


async def test_fsck_image_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = layout_with(tmp_path, {"t": [files_for("c")]})
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        await pull(repo, layout, "t")
        hexd = build_image(repo, "t", "img")
        image = repo.resolve_image(hexd)
        victim = sorted(referenced_objects(repo, image), key=lambda d: d.hex())[0]
    report_cmd = ("--repo", str(path), "fsck", "--metadata-only", "--json")
    # A referenced object missing.
    moved = tmp_path / "moved"
    os.rename(path / "objects" / victim.object_path(), moved)
    code, out, _ = await run_cli(capsys, *report_cmd)
    errors = json.loads(out)["problems"]
    assert code == 0  # cfsctl: --json exits 0 once the check ran
    assert {"type": "image-missing-object", "path": f"images/{hexd}", "objectId": victim.hex()} in [
        {k: e[k] for k in ("type", "path", "objectId") if k in e} for e in errors
    ]
    os.rename(moved, path / "objects" / victim.object_path())
    # An image link named by another digest.
    other = "ab" * 32
    os.symlink(f"../objects/{image.object_path()}", path / "images" / other)
    code, out, _ = await run_cli(capsys, *report_cmd)
    kinds = {(e["type"], e["path"]) for e in json.loads(out)["problems"]}
    assert kinds == {("image-invalid", f"images/{other}")}
    (path / "images" / other).unlink()
    # The image's bytes changed: no longer named by its digest.
    image_file = path / "objects" / image.object_path()
    os.chmod(image_file, 0o644)
    data = bytearray(image_file.read_bytes())
    data[-1] ^= 1
    image_file.write_bytes(bytes(data))
    code, out, _ = await run_cli(capsys, *report_cmd)
    kinds = {(e["type"], e["path"]) for e in json.loads(out)["problems"]}
    assert ("image-digest-mismatch", f"images/{hexd}") in kinds
    assert code == 0  # cfsctl: --json exits 0 once the check ran


# --------------------------------------------------------------------------- damage


async def tagged_repo(tmp_path: Path) -> tuple[Path, Path]:
    layout = layout_with(tmp_path, {"t": [files_for("d"), files_for("e", "d")]})
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        await pull(repo, layout, "t")
        repo.store_object(b"garbage nobody references")
    return path, layout


async def test_gc_never_follows_symlinked_object_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = await tagged_repo(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [outside / ("7" * 62), outside / ("8" * 62)]
    for v in victims:
        v.write_bytes(b"precious")
    (path / "objects" / "ee").mkdir(exist_ok=True)
    (path / "objects" / "ee").rmdir()
    os.symlink(outside, path / "objects" / "ee")
    code, _out, err = await run_cli(capsys, "--repo", str(path), "gc")
    assert code == 0, err
    assert all(v.read_bytes() == b"precious" for v in victims)
    code, out, _ = await run_cli(capsys, "--repo", str(path), "fsck", "--json")
    errors = json.loads(out)["problems"]
    assert code == 0  # cfsctl: --json exits 0 once the check ran
    assert [(e["type"], e["path"]) for e in errors] == [("unexpected-file-type", "objects/ee")]


@pytest.mark.parametrize(
    "damage",
    ["symlinked-refs", "regular-file", "absolute", "escaping", "loop", "dir-symlink"],
)
async def test_gc_stops_on_damaged_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    path, _ = await tagged_repo(tmp_path)
    refs = path / "streams/refs"
    tag = refs / "oci" / "t"
    if damage == "symlinked-refs":
        outside = tmp_path / "outside-refs"
        os.rename(refs, outside)
        os.symlink(outside, refs)
        where = "streams/refs"
    elif damage == "regular-file":
        target = os.readlink(tag)
        tag.unlink()
        tag.write_text(target)
        where = "streams/refs/oci/t"
    elif damage == "absolute":
        target = os.readlink(tag)
        tag.unlink()
        os.symlink(posixpath.normpath(f"{tag.parent}/{target}"), tag)
        where = "streams/refs/oci/t"
    elif damage == "escaping":
        os.symlink("../../../../elsewhere", refs / "oci" / "u")
        where = "streams/refs/oci/u"
    elif damage == "loop":
        os.symlink("v", refs / "oci" / "w")
        os.symlink("w", refs / "oci" / "v")
        where = "streams/refs/oci/"
    else:
        os.symlink(str(tmp_path), refs / "oci" / "x")
        where = "streams/refs/oci/x"
    before = tree(path)
    code, _out, err = await run_cli(capsys, "--repo", str(path), "gc")
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert where in err
    assert "nothing was deleted" in err
    assert tree(path) == before
    code, _out, _err = await run_cli(capsys, "--repo", str(path), "fsck", "--metadata-only")
    assert code == 1


async def test_symlinked_refs_fsck_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = await tagged_repo(tmp_path)
    refs = path / "streams/refs"
    outside = tmp_path / "outside-refs"
    os.rename(refs, outside)
    os.symlink(outside, refs)
    code, out, _ = await run_cli(capsys, "--repo", str(path), "fsck", "--json")
    errors = json.loads(out)["problems"]
    assert code == 0  # cfsctl: --json exits 0 once the check ran
    assert ("unexpected-file-type", "streams/refs") in [(e["type"], e["path"]) for e in errors]


async def test_gc_walks_streams_without_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tagged image whose ``streams/oci-layer-…`` name is gone keeps its file objects."""
    path, _ = await tagged_repo(tmp_path)
    # The lower layer: its files are replaced by the upper one, so no image has them.
    lower = hashlib.sha256(tar_of(files_for("d"))).hexdigest()
    layer = path / "streams" / f"oci-layer-sha256:{lower}"
    target = os.readlink(layer)
    with Repository.open(path) as repo:
        info = parse_splitstream(repo.read_object(repo.resolve_stream(layer.name)), algorithm=ALG)
        files = {d.object_path() for d in info.object_refs}
    assert len(files) == 3
    layer.unlink()
    code, out, _ = await run_cli(capsys, "--repo", str(path), "fsck", "--metadata-only", "--json")
    errors = json.loads(out)["problems"]
    assert code == 0  # cfsctl: --json exits 0 once the check ran
    assert {e["type"] for e in errors} == {"missing-stream-name"}
    assert all(layer.name in e["detail"] for e in errors)
    code, _out, err = await run_cli(capsys, "--repo", str(path), "gc")
    assert code == 0, err
    assert (path / "streams" / target).resolve().is_file()
    assert files <= objects(path)
    # The repair: the name again; `cat` reassembles the layer to its diff_id.
    os.symlink(target, layer)
    done = await trio.run_process(
        [sys.executable, "-m", "trio_composefs", "--repo", str(path), "cat", layer.name],
        capture_stdout=True,
    )
    assert "sha256:" + hashlib.sha256(done.stdout).hexdigest() == layer.name.removeprefix(
        "oci-layer-"
    )
    code, out, _ = await run_cli(capsys, "--repo", str(path), "fsck", "--json")
    assert code == 0, out
    with Repository.open(path) as repo:
        assert gc(repo, dry_run=True).objects_removed == ()


# --------------------------------------------------------------------------- property


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["pull", "image", "tag", "untag", "unimage", "unname", "unname", "damage", "gc", "gc"]
        ),
        st.integers(0, 2),
    ),
    min_size=2,
    max_size=10,
)


@settings(
    max_examples=20,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
@example(ops=[("unname", 0), ("untag", 1), ("gc", 0), ("image", 0), ("untag", 0), ("gc", 0)])
def test_gc_never_deletes_what_a_root_reaches(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    trio.run(_property_run, tmp_path_factory.mktemp("prop"), ops)


async def _property_run(tmp: Path, ops: list[tuple[str, int]]) -> None:
    shared = files_for("shared")
    layout = layout_with(tmp, {f"t{i}": [shared, files_for(f"own{i}", "shared")] for i in range(3)})
    path = tmp / "repo"
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        for i in range(3):
            await pull(repo, layout, f"t{i}")
        for op, i in ops:
            tag = f"t{i}"
            if op == "pull":
                await pull(repo, layout, tag)
            elif op == "image" and (path / "streams/refs/oci" / tag).is_symlink():
                build_image(repo, tag, f"img{i}")
            elif op == "untag" and (path / "streams/refs/oci" / tag).is_symlink():
                (path / "streams/refs/oci" / tag).unlink()
            elif op == "unimage" and (path / "images/refs" / f"img{i}").is_symlink():
                (path / "images/refs" / f"img{i}").unlink()
            elif op == "unname":
                names = sorted((path / "streams").glob("oci-layer-*"))
                if names:
                    names[i % len(names)].unlink()
            elif op == "tag" and (path / "streams/refs/oci" / tag).is_symlink():
                manifest = os.readlink(path / "streams/refs/oci" / tag).rsplit("/", 1)[-1]
                tag_image(repo, manifest.removeprefix("oci-manifest-"), f"alias{i}")
            elif op == "damage":
                # A ref left as a regular file: gc must stop and delete nothing.
                (path / "streams/refs/oci" / f"broken{i}").write_text("../../x")
                before = tree(path)
                with pytest.raises(RepositoryError, match="nothing was deleted"):
                    gc(repo)
                assert tree(path) == before
                (path / "streams/refs/oci" / f"broken{i}").unlink()  # the repair
            elif op == "gc":
                live = _reachable(repo)
                gc(repo)
                assert live <= objects(path)
        live = _reachable(repo)
        gc(repo)
        assert live <= objects(path)


def _reachable(repo: Repository) -> set[str]:
    """What resolvable roots reach, computed from the splitstream reader and the EROFS
    reader independently of gc's walk (every stream ref that is a stream is followed)."""
    out: set[str] = set()
    pending = []
    for ref in repo.list_stream_refs():
        try:
            pending.append(repo.resolve_stream(f"refs/{ref}"))
        except RepositoryError:
            continue
    for ref in repo.list_image_refs():
        try:
            image = repo.resolve_image(f"refs/{ref}")
        except RepositoryError:
            continue
        out.add(image.object_path())
        out |= {d.object_path() for d in referenced_objects(repo, image)}
    seen = set()
    while pending:
        d = pending.pop()
        if d in seen:
            continue
        seen.add(d)
        out.add(d.object_path())
        fd = repo.open_object(d)
        try:
            head = os.pread(fd, 11, 0)
        finally:
            os.close(fd)
        if head != b"SplitStream":
            with contextlib.suppress(Exception):
                out |= {x.object_path() for x in referenced_objects(repo, d)}
            continue
        info = parse_splitstream(repo.read_object(d), algorithm=repo.algorithm)
        out |= {x.object_path() for x in info.object_refs}
        pending.extend(info.stream_refs)
    return out


async def test_tag_never_follows_symlinked_refs_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A symlinked ``streams/refs/oci`` or ``images/refs`` is refused; nothing is made outside."""
    path, _ = await tagged_repo(tmp_path)
    (manifest,) = [p.name for p in (path / "streams").glob("oci-manifest-*")]
    outside = tmp_path / "outside-oci"
    os.rename(path / "streams/refs/oci", outside)
    os.symlink(outside, path / "streams/refs/oci")
    before = sorted(p.name for p in outside.iterdir())
    digest = manifest.removeprefix("oci-manifest-")
    code, _out, err = await run_cli(capsys, "--repo", str(path), "oci", "tag", digest, "new")
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert "streams/refs/oci" in err
    assert sorted(p.name for p in outside.iterdir()) == before
    with Repository.open(path) as repo:
        image = repo.store_object(b"x")
        os.rename(path / "images/refs", tmp_path / "outside-images")
        os.symlink(tmp_path / "outside-images", path / "images/refs")
        with pytest.raises(RepositoryError, match="images/refs is a symlink"):
            repo.publish_image(image, "named")
    assert list((tmp_path / "outside-images").iterdir()) == []


async def test_listing_never_follows_symlinked_refs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = await tagged_repo(tmp_path)
    outside = tmp_path / "outside-refs"
    os.rename(path / "streams/refs", outside)
    os.symlink(outside, path / "streams/refs")
    code, _out, err = await run_cli(capsys, "--repo", str(path), "oci", "images")
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert "streams/refs: a symlink" in err
