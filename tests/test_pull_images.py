"""A pull commits the image's composefs EROFS as composefs-rs does, checked with C tools."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import trio

from ocifixtures import Layout
from oracles import need_c_tool
from trio_composefs import TreeError
from trio_composefs.formats import ContentType
from trio_composefs.fs import write_dumpfile
from trio_composefs.oci import (
    ImageStats,
    config_content_id,
    image_filesystem,
    manifest_content_id,
    open_image,
    open_source,
    parse_source,
    pull_image,
)
from trio_composefs.oci._build import commit_image_streams, read_external
from trio_composefs.repository import Repository, open_splitstream, read_image


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_700_000_000
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    return info


LAYER1 = [
    (entry("usr", tarfile.DIRTYPE, mode=0o755, uid=0), b""),
    (entry("usr/bin", tarfile.DIRTYPE), b""),
    (entry("usr/bin/tool", mode=0o4755), b"#!/bin/sh\n" + b"x" * 5000),
    (entry("usr/bin/link", tarfile.LNKTYPE, linkname="usr/bin/tool"), b""),
    (entry("etc", tarfile.DIRTYPE), b""),
    (entry("etc/small"), b"tiny"),
    (entry("etc/gone"), b"old"),
    (entry("etc/sym", tarfile.SYMTYPE, linkname="../usr/bin/tool"), b""),
    (entry("run", tarfile.DIRTYPE), b""),
    (entry("run/lock"), b"x" * 100),
]
LAYER2 = [
    (entry("etc/.wh.gone"), b""),
    (entry("etc/new", uid=1000, gid=70000), b"y" * 65),
]


def two_layer_layout(path: Path) -> Layout:
    layout = Layout(path)
    layout.add_image([tar_of(LAYER1), tar_of(LAYER2)], compression="gzip", tag="t")
    layout.write_index()
    return layout


def c_mkcomposefs(tool: str, dump: Path, out: Path) -> Path:
    argv = [tool, "--min-version=1", "--max-version=1", "--from-file", str(dump), str(out)]
    subprocess.run(argv, check=True)
    return out


def fsverity_tool_digest(path: Path) -> str:
    done = subprocess.run(
        ["fsverity", "digest", "--compact", str(path)], check=True, capture_output=True
    )
    return done.stdout.decode().strip()


async def pull(repo: Repository, layout: Layout, tag: str = "t") -> ImageStats:
    async with open_source(parse_source(f"oci:{layout.path}:{tag}")) as source:
        return await pull_image(repo, source, tag=tag)


async def test_pulled_image_is_c_mkcomposefs_of_its_dump(tmp_path: Path, repo: Repository) -> None:
    mkcomposefs = need_c_tool("mkcomposefs")
    stats = await pull(repo, two_layer_layout(tmp_path / "lay"))
    assert stats.image is not None
    stored = open_image(repo, "t")
    assert stored.image == stats.image
    # what upstream lays out: images/<hex> -> the object, composefs.image.v1 in the config
    assert repo.list_images() == {stats.image.hex(): stats.image}
    _raw, named = read_external(
        repo, config_content_id(stats.config_digest), ContentType.OCI_CONFIG
    )
    assert named["composefs.image.v1"] == stats.image
    # the manifest stream points at the final config stream
    with open_splitstream(repo, manifest_content_id(stats.manifest_digest)) as (info, _):
        assert info.named_refs[f"config:{stats.config_digest}"] == stats.config_stream
    # C mkcomposefs on our dump of the same tree gives the same bytes, so the same ID
    dump = tmp_path / "dump"
    dump.write_bytes(b"".join(write_dumpfile(image_filesystem(repo, stored))))
    c_image = c_mkcomposefs(mkcomposefs, dump, tmp_path / "c.img")
    assert read_image(repo, stats.image.hex()) == c_image.read_bytes()
    assert fsverity_tool_digest(c_image) == stats.image.hex()
    # whiteout applied, /run emptied, hard link shared
    text = dump.read_text()
    assert "/etc/gone " not in text
    assert "/etc/new " in text
    assert "/run/lock" not in text


async def test_repository_without_image_gets_it_on_pull(tmp_path: Path, repo: Repository) -> None:
    layout = two_layer_layout(tmp_path / "lay")
    first = await pull(repo, layout)
    assert first.image is not None
    # make the repository look as one written before images existed: a config stream
    # without composefs.image.v1, and no images/ link
    stored = open_image(repo, "t")
    commit_image_streams(
        repo,
        config_digest=stored.config_digest,
        config_bytes=stored.config,
        config_stream=None,
        manifest_digest=stored.manifest_digest,
        manifest_bytes=stored.manifest,
        layer_refs=stored.layers,
        ref=None,
        container=False,
    )
    (Path(repo.path) / "images" / first.image.hex()).unlink()
    assert open_image(repo, "t").image is None
    again = await pull(repo, layout)
    assert again.image == first.image
    assert open_image(repo, "t").image == first.image
    assert repo.list_images() == {first.image.hex(): first.image}
    # and a third pull of a complete image takes the fast path
    third = await pull(repo, layout)
    assert third.skipped
    assert third.image == first.image


async def test_image_that_cannot_be_built_names_nothing(tmp_path: Path, repo: Repository) -> None:
    layout = Layout(tmp_path / "lay")
    bad = tar_of(
        [
            (entry("usr", tarfile.DIRTYPE), b""),
            (entry("usr/x", tarfile.LNKTYPE, linkname="nope"), b""),
        ]
    )
    image = layout.add_image([bad], tag="bad")
    layout.write_index()
    with pytest.RaisesGroup(TreeError, allow_unwrapped=True, flatten_subgroups=True):
        await pull(repo, layout, "bad")
    assert repo.has_stream(manifest_content_id(image.manifest_digest)) is None
    assert repo.has_stream(config_content_id(image.config_digest)) is None
    assert repo.list_stream_refs() == {}
    assert repo.list_images() == {}


def test_two_trio_runs_pull_into_one_repository(tmp_path: Path) -> None:
    """Nothing of a pull is process-global: two event loops in two threads, one repository."""
    import threading

    from trio_composefs.formats import Algorithm

    layout = two_layer_layout(tmp_path / "lay")
    Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True).close()
    results: list[object] = []

    def run() -> None:
        async def main() -> ImageStats:
            with Repository.open(tmp_path / "repo") as repo:
                return await pull(repo, layout)

        try:
            results.append(trio.run(main))
        except BaseException as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, ImageStats) for r in results), results
    images = {r.image for r in results if isinstance(r, ImageStats)}
    assert len(images) == 1


async def test_pulls_sharing_an_importer_import_a_layer_once(
    tmp_path: Path, repo: Repository
) -> None:
    from trio_composefs.importer import Importer, open_importer

    layout = Layout(tmp_path / "lay")
    shared = tar_of(LAYER1)
    layout.add_image([shared], tag="a")
    layout.add_image([shared, tar_of(LAYER2)], tag="b")
    layout.write_index()
    stats: dict[str, ImageStats] = {}

    async def one(importer: Importer, tag: str) -> None:
        async with open_source(parse_source(f"oci:{layout.path}:{tag}")) as source:
            stats[tag] = await pull_image(importer, source, tag=tag)

    async with open_importer(repo) as importer, trio.open_nursery() as nursery:
        nursery.start_soon(one, importer, "a")
        nursery.start_soon(one, importer, "b")
    imported = [layer for s in stats.values() for layer in s.layers if not layer.skipped]
    assert len(imported) == 2  # the shared layer once, the second layer of b once
