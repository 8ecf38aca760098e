"""gc: keeps exactly what the refs reach, prunes the rest, and waits for running imports."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import trio

from test_fsck import FSVERITY, cli, content, diff_id, import_all, make_tar, tool_digest
from trio_composefs import RepositoryError
from trio_composefs.formats import Algorithm
from trio_composefs.importer import import_layer, layer_content_id
from trio_composefs.maintenance import fsck, gc
from trio_composefs.repository import Repository, copy_stream
from trio_composefs.testing import FaultyRepository

ALG = Algorithm.SHA256
SHARED = content("shared", 6000)
TARS = {
    "a": make_tar({"s": SHARED, "a": content("only-a", 7000)}),
    "b": make_tar({"s": SHARED, "b": content("only-b", 8000)}),
    "c": make_tar({"c": content("only-c", 9000)}),
}


def tree(path: Path) -> dict[str, str]:
    """Every entry under ``path``: symlink targets, file sizes, directories."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(root, name)
            rel = str(full.relative_to(path))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = str(full.stat().st_size)
    return out


def objects(path: Path) -> set[str]:
    return {str(p.relative_to(path / "objects")) for p in (path / "objects").glob("??/*")}


async def fresh_objects(tmp_path: Path, name: str, keys: str) -> set[str]:
    """The oracle: the objects of a new repository holding only the layers ``keys``."""
    path = tmp_path / name
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        await import_all(repo, [(TARS[k], None) for k in keys])
    return objects(path)


async def test_gc_keeps_exactly_what_refs_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        # a: one ref; b: two refs (one nested); c: no ref at all (garbage).
        await import_all(repo, [(TARS["a"], "a"), (TARS["b"], "b"), (TARS["c"], None)])
        await import_all(repo, [(TARS["b"], "nested/dir/b2")])
        # Leftovers of crashed writers, and a dangling ref.
        (path / "objects/.tmp-object-AAAAAAAAAAAA").write_bytes(b"x" * 123)
        os.symlink("../objects/00/" + "0" * 62, path / "streams/.symlink-BBBBBBBBBBBB")
        os.symlink("../oci-layer-sha256:" + "d" * 64, path / "streams/refs/dangling")

        ab = await fresh_objects(tmp_path, "oracle-ab", "ab")
        before = tree(path)
        dry = gc(repo, dry_run=True)
        assert tree(path) == before  # a dry run deletes nothing
        assert set(dry.objects_removed) == {f"objects/{o}" for o in objects(path) - ab}
        assert len(dry.objects_removed) == 2  # c's file and c's splitstream

        real = gc(repo)
        assert real.objects_removed == dry.objects_removed
        assert real.objects_bytes == dry.objects_bytes > 9000
        assert objects(path) == ab
        assert set(real.tmpfiles_removed) == {
            "objects/.tmp-object-AAAAAAAAAAAA",
            "streams/.symlink-BBBBBBBBBBBB",
        }
        assert real.tmpfiles_bytes == 123
        assert set(real.links_pruned) == {
            f"streams/{layer_content_id(diff_id(TARS['c']))}",
            "streams/refs/dangling",
        }
        assert real.bytes_freed == real.objects_bytes + 123
        assert (await fsck(repo)).ok

        # Remove ref a: only a's own object and splitstream go; the shared file stays.
        (path / "streams/refs/a").unlink()
        real = gc(repo)
        b_only = await fresh_objects(tmp_path, "oracle-b", "b")
        assert objects(path) == b_only
        assert len(real.objects_removed) == 2
        if FSVERITY is not None:
            own_a = tmp_path / "own-a"
            own_a.write_bytes(content("only-a", 7000))
            shared = tmp_path / "shared"
            shared.write_bytes(SHARED)
            own = tool_digest(own_a, ALG)
            assert f"objects/{own[:2]}/{own[2:]}" in real.objects_removed
            kept = tool_digest(shared, ALG)
            assert f"{kept[:2]}/{kept[2:]}" in objects(path)
        assert real.links_pruned == (f"streams/{layer_content_id(diff_id(TARS['a']))}",)

        # Remove ref b: b2 still holds the layer, nothing goes.
        (path / "streams/refs/b").unlink()
        before = tree(path)
        assert gc(repo).objects_removed == ()
        assert tree(path) == before
        assert (await fsck(repo)).ok
        h = hashlib.sha256()
        copy_stream(repo, "refs/nested/dir/b2", h.update)
        assert "sha256:" + h.hexdigest() == diff_id(TARS["b"])

    # The CLI: dry run, then everything (the last ref removed).
    (path / "streams/refs/nested/dir/b2").unlink()
    assert await cli(["--repo", str(path), "gc", "--dry-run", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.count("would remove objects/") == len(b_only)
    assert objects(path) == b_only
    assert await cli(["--repo", str(path), "gc", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["objectsRemoved"] == len(b_only)
    assert doc["streamsPruned"] == 1
    assert objects(path) == set()


async def test_gc_extra_roots_and_images(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        (c_name,) = await import_all(repo, [(TARS["c"], None)])
        with pytest.raises(RepositoryError, match="neither a stream nor an image"):
            gc(repo, ["no-such-stream"])
        result = gc(repo, [c_name])  # kept by --root
        assert result.objects_removed == ()
        assert objects(path) == await fresh_objects(tmp_path, "oracle-c", "c")

        # A stand-in "image" that only mentions c's file object the way composefs
        # images do ("/XX/rest") is not an EROFS: gc parses images, so it stops.
        c_stream = repo.resolve_stream(c_name).object_path()
        (c_obj,) = objects(path) - {c_stream}
        image = repo.store_object(b"\0erofs...trusted.overlay.redirect/" + c_obj.encode() + b"\0")
        os.symlink(f"../objects/{image.object_path()}", path / "images" / "img")
        os.symlink("../img", path / "images/refs/img")
        before = tree(path)
        with pytest.raises(RepositoryError, match="nothing was deleted: cannot read image"):
            gc(repo)
        assert tree(path) == before

        # Without the image ref, the image and its object go, and the link is pruned.
        (path / "images/refs/img").unlink()
        result = gc(repo)
        assert objects(path) == set()
        assert sorted(result.links_pruned) == ["images/img", f"streams/{c_name}"]


async def test_gc_refuses_unreadable_root(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=ALG, insecure=True) as repo:
        (a_name,) = await import_all(repo, [(TARS["a"], "a")])
        await import_all(repo, [(TARS["c"], None)])
        stream_file = path / "objects" / repo.resolve_stream(a_name).object_path()
        stream_file.write_bytes(b"garbage")
        before = tree(path)
        with pytest.raises(RepositoryError, match="nothing was deleted"):
            gc(repo)
        assert tree(path) == before


async def test_gc_waits_for_running_import(tmp_path: Path) -> None:
    """An import holding the shared lock blocks gc; its objects survive."""
    path = tmp_path / "repo"
    Repository.init(path, algorithm=ALG, insecure=True).close()
    tar = TARS["a"]
    importer_repo = Repository.open(path)
    faulty = FaultyRepository(importer_repo)
    gate = faulty.pause("sync")  # objects written, stream not yet named
    gc_done = threading.Event()
    waited = threading.Event()
    results = []

    def run_gc() -> None:
        with Repository.open(path) as repo:
            results.append(gc(repo, on_wait=waited.set))
        gc_done.set()

    async def do_import() -> None:
        try:
            await import_layer(faulty, tar, diff_id(tar), name="a")
        finally:
            importer_repo.close()  # releases the shared lock

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(do_import)
            await gate.wait_reached()
            assert objects(path)  # the import's objects exist, unnamed
            nursery.start_soon(trio.to_thread.run_sync, run_gc)
            while not waited.is_set():  # noqa: ASYNC110 - a thread sets it
                await trio.sleep(0.005)
            await trio.sleep(0.2)
            assert not gc_done.is_set()  # still blocked by the import
            gate.release()
    (result,) = results
    assert result.objects_removed == ()
    with Repository.open(path) as repo:
        assert objects(path) == await fresh_objects(tmp_path, "oracle-a", "a")
        assert (await fsck(repo)).ok


def write_layout(root: Path, images: dict[str, list[bytes]]) -> None:
    """An OCI image layout (gzip layers) with one tagged image per entry of ``images``."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    manifests = []
    for tag, tars in images.items():
        layers = [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
            | blob(gzip.compress(t, mtime=0))
            for t in tars
        ]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id(t) for t in tars]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json"}
            | blob(json.dumps(config).encode()),
            "layers": layers,
        }
        manifests.append(
            {"mediaType": "application/vnd.oci.image.manifest.v1+json"}
            | blob(json.dumps(manifest).encode())
            | {"annotations": {"org.opencontainers.image.ref.name": tag}}
        )
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


async def test_gc_with_oci_images_sharing_layers(tmp_path: Path) -> None:
    """Tagged OCI images keep manifest → config → layers alive; untagging frees only their own."""
    pytest.importorskip("trio_composefs.oci")
    layout = tmp_path / "layout"
    write_layout(layout, {"one": [TARS["a"], TARS["c"]], "two": [TARS["a"], TARS["b"]]})
    path, oracle = tmp_path / "repo", tmp_path / "oracle"
    for repo_path, tags in ((path, ("one", "two")), (oracle, ("two",))):
        Repository.init(repo_path, algorithm=ALG, insecure=True).close()
        for tag in tags:
            argv = ["--repo", str(repo_path), "oci", "pull", "--no-progress"]
            assert await cli([*argv, f"oci:{layout}:{tag}", tag]) == 0
    with Repository.open(path) as repo:
        assert gc(repo, dry_run=True).objects_removed == ()
        report = await fsck(repo)
        assert report.ok
        assert report.contents_checked == 7  # 3 layers, 2 configs, 2 manifests
        (path / "streams/refs/oci/one").unlink()
        result = gc(repo)
        assert objects(path) == objects(oracle)
        # c's file and splitstream, image one's config and manifest (JSON + splitstream
        # each), and image one's composefs EROFS image.
        assert len(result.objects_removed) == 7
        assert result.streams_pruned == 3
        assert (await fsck(repo)).ok
