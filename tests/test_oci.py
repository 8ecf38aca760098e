"""Pulling OCI images from layout directories: digests, layers in parallel, tags, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard

from checks import assert_consistent, busy_threads
from ocifixtures import Layout, compact, make_tar, sha256, umoci_layout
from test_splitstream import LAYERS, layer_tar
from trio_composefs import ComposefsError, DigestMismatchError, FormatError, cli
from trio_composefs.formats import (
    Algorithm,
    ContentType,
    ExternalChunk,
    encode_splitstream,
    fsverity_digest,
)
from trio_composefs.importer import LayerStats, open_importer
from trio_composefs.importer._decompress import OUTPUT_PIECE, open_verified_stream
from trio_composefs.oci import (
    ImageProgress,
    ImageSourceError,
    ImageStats,
    Platform,
    config_content_id,
    decode_tag,
    encode_tag,
    list_images,
    list_tags,
    manifest_content_id,
    open_image,
    open_source,
    parse_source,
    pull_image,
    resolve_tag,
    tag_image,
    untag_image,
)
from trio_composefs.oci.sources import (
    DockerArchiveSource,
    OciArchiveSource,
    OciLayoutSource,
    SkopeoProxySource,
)
from trio_composefs.repository import Repository, copy_stream, open_splitstream
from trio_composefs.testing import open_fds

SHA256 = Algorithm.SHA256


def streams(repo: Repository) -> set[str]:
    return set(os.listdir(os.path.join(repo.path, "streams"))) - {"refs"}


def oci_refs(repo: Repository) -> list[str]:
    path = os.path.join(repo.path, "streams", "refs", "oci")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def layer_sha(repo: Repository, diff_id: str) -> str:
    h = hashlib.sha256()
    copy_stream(repo, f"oci-layer-{diff_id}", h.update)
    return "sha256:" + h.hexdigest()


async def pull(repo: Repository, ref: str, **kwargs: Any) -> ImageStats:
    async with open_source(parse_source(ref)) as source:
        return await pull_image(repo, source, **kwargs)


def files(seed: int, n: int = 6) -> list[tuple[str, bytes]]:
    return [(f"d{seed}/f{i}", bytes([seed, i]) * (20 + 700 * i)) for i in range(n)]


# --------------------------------------------------------------------------- golden


async def test_upstream_golden_config_stream(tmp_path: Path, repo: Repository) -> None:
    """The three tar-rs layers and config of upstream's test give its config stream id."""
    tars = [layer_tar(name, size)[0] for name, size, _, _ in LAYERS]
    layout = Layout(tmp_path / "lay")
    image = layout.add_image(tars, compression=["gzip", "zstd", None], tag="golden")
    layout.write_index()
    config = (layout.blob_path(image.config_digest)).read_bytes()
    assert len(config) == 299  # oci-spec's compact serialisation, keys in struct order
    stats = await pull(repo, f"oci:{layout.path}:golden", tag="golden")
    assert [layer.splitstream.hex() for layer in stats.layers] == [v for *_, v in LAYERS]
    # Upstream's pin is the config stream as ensure_config_with_layers writes it, before
    # the pull adds the composefs image: the same bytes with only the layer refs.
    config_object = repo.store_object(config)
    before_image = encode_splitstream(
        [ExternalChunk(config_object, len(config))],
        algorithm=repo.algorithm,
        content_type=ContentType.OCI_CONFIG,
        named_refs={layer.diff_id: layer.splitstream for layer in stats.layers},
    )
    assert fsverity_digest(before_image, repo.algorithm).hex() == (
        "4839518dea22749f8ff233e7f7baec65f23dd5336462f46ad6884769af84bf95"
    )
    # The stored config stream: the same raw JSON, the layer refs in config order, then the
    # V1 image under composefs.image.v1 (named refs sorted: composefs.image.v1 first).
    assert stats.image is not None
    with open_splitstream(repo, config_content_id(image.config_digest)) as (info, _):
        assert info.stream_refs == (*(layer.splitstream for layer in stats.layers), stats.image)
        assert list(info.named_refs) == [
            "composefs.image.v1",
            *(layer.diff_id for layer in stats.layers),
        ]
        assert info.stream_size == len(config)
    assert repo.list_images() == {stats.image.hex(): stats.image}
    # manifest stream: config ref first, then the layers in config order, raw JSON as one object
    with open_splitstream(repo, manifest_content_id(image.manifest_digest)) as (info, _):
        assert info.content_type == ContentType.OCI_MANIFEST
        assert info.stream_size == image.manifest_size
        assert list(info.named_refs) != []
        assert info.stream_refs[0] == stats.config_stream
        assert list(info.stream_refs[1:]) == [layer.splitstream for layer in stats.layers]
        assert info.named_refs[f"config:{image.config_digest}"] == stats.config_stream
    target = os.readlink(os.path.join(repo.path, "streams/refs/oci/golden"))
    assert target == f"../../oci-manifest-{image.manifest_digest}"
    assert_consistent(Path(repo.path), SHA256)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
async def test_multilayer_round_trip(
    tmp_path: Path, repo: Repository, compression: str | None
) -> None:
    tars = [make_tar(files(i)) for i in range(3)]
    layout = Layout(tmp_path / "lay")
    image = layout.add_image(tars, compression=compression, tag="v1")
    layout.write_index()
    progress: list[ImageProgress] = []
    stats = await pull(repo, f"oci:{layout.path}:v1", tag="mine/app:v1", progress=progress.append)
    assert stats.manifest_digest == image.manifest_digest
    for diff_id in image.diff_ids:
        assert layer_sha(repo, diff_id) == diff_id
    assert {f"oci-layer-{d}" for d in image.diff_ids} | {
        config_content_id(image.config_digest),
        manifest_content_id(image.manifest_digest),
    } == streams(repo)
    assert oci_refs(repo) == ["mine%2Fapp:v1"]
    assert progress[-1].layers_done == 3
    assert any(p.layer is not None and p.layer.done for p in progress)
    stored = open_image(repo, "mine/app:v1")
    assert stored.manifest == layout.blob_path(image.manifest_digest).read_bytes()
    assert stored.config == layout.blob_path(image.config_digest).read_bytes()
    assert [d for d, _ in stored.layers] == list(image.diff_ids)
    assert_consistent(Path(repo.path), SHA256)


async def test_umoci_layout(tmp_path: Path, repo: Repository) -> None:
    layout = umoci_layout(tmp_path, {"etc/hello": b"hello world\n" * 50, "small": b"x"})
    if layout is None:
        pytest.skip("umoci is not installed")
    stats = await pull(repo, f"oci:{layout}:latest", tag="umoci")
    assert len(stats.layers) == 2
    index = json.loads((layout / "index.json").read_bytes())
    assert stats.manifest_digest == index["manifests"][0]["digest"]
    image = open_image(repo, "umoci")
    for diff_id, _ in image.layers:
        assert layer_sha(repo, diff_id) == diff_id
    assert image.config_json()["rootfs"]["diff_ids"] == [d for d, _ in image.layers]
    [info] = list_images(repo)
    assert info.name == "umoci"
    assert info.layer_count == 2
    assert info.is_container


# --------------------------------------------------------------------------- platforms


async def test_multi_platform_index(tmp_path: Path, repo: Repository) -> None:
    here = Platform.current()
    other = Platform("linux", "s390x" if here.architecture != "s390x" else "amd64")
    layout = Layout(tmp_path / "lay")
    mine = layout.add_image([make_tar(files(1))], index=False)
    theirs = layout.add_image([make_tar(files(2))], index=False)
    layout.add_index([theirs.descriptor(other), mine.descriptor(here)], tag="multi")
    layout.write_index()
    ref = f"oci:{layout.path}:multi"
    stats = await pull(repo, ref)
    assert stats.manifest_digest == mine.manifest_digest
    stats = await pull(repo, ref, platform=other)
    assert stats.manifest_digest == theirs.manifest_digest
    with pytest.raises(ImageSourceError, match="no image for platform linux/mips"):
        await pull(repo, ref, platform=Platform("linux", "mips"))
    # by digest, and a tag that is not there
    stats = await pull(repo, f"oci:{layout.path}@{theirs.manifest_digest}")
    assert stats.manifest_digest == theirs.manifest_digest
    with pytest.raises(ImageSourceError, match=r"no image tagged 'nope'.*multi"):
        await pull(repo, f"oci:{layout.path}:nope")
    # two tagged images, no platforms declared, none named
    layout2 = Layout(tmp_path / "lay2")
    layout2.add_image([make_tar(files(1))], tag="a")
    layout2.add_image([make_tar(files(2))], tag="b")
    layout2.write_index()
    with pytest.raises(ImageSourceError, match=r"none declared; tags: a, b"):
        await pull(repo, f"oci:{layout2.path}")
    stats = await pull(repo, f"oci:{layout2.path}:b")
    assert stats.layers_imported == 0  # the same tar as theirs: already there


# --------------------------------------------------------------------------- refusals


async def test_corrupt_blob_publishes_nothing(tmp_path: Path, repo: Repository) -> None:
    tars = [make_tar(files(i)) for i in range(3)]
    layout = Layout(tmp_path / "lay")
    image = layout.add_image(tars, compression="gzip", tag="t")
    layout.write_index()
    blob = layout.blob_path(image.layer_digests[1])
    data = bytearray(blob.read_bytes())
    data[-12] ^= 0xFF  # inside the deflate stream / crc: still the same size
    blob.write_bytes(bytes(data))
    with pytest.RaisesGroup(
        pytest.RaisesExc(DigestMismatchError, match=image.layer_digests[1]),
        flatten_subgroups=True,
    ):
        await pull(repo, f"oci:{layout.path}:t", tag="t")
    assert f"oci-layer-{image.diff_ids[1]}" not in streams(repo)
    assert not any(s.startswith(("oci-config", "oci-manifest")) for s in streams(repo))
    assert oci_refs(repo) == []


async def test_failing_layer_cancels_the_others(tmp_path: Path, repo: Repository) -> None:
    """A small corrupt layer fails while a big one streams: the big one is cancelled, no leaks."""
    big = make_tar([(f"big/{i}", os.urandom(200_000)) for i in range(40)])
    small = make_tar(files(3))
    layout = Layout(tmp_path / "lay")
    image = layout.add_image([big, small], compression=["zstd", None], tag="t")
    layout.write_index()
    blob = layout.blob_path(image.layer_digests[1])
    blob.write_bytes(blob.read_bytes()[:-1] + b"x")
    repo2 = Repository.init(tmp_path / "repo2", algorithm=SHA256, insecure=True)
    with repo2:
        repo2.store_object(b"opens the objects/ fd the repository keeps")
        fds = open_fds()
        with pytest.RaisesGroup(
            pytest.RaisesExc(DigestMismatchError, match=image.layer_digests[1]),
            flatten_subgroups=True,
        ):
            await pull(repo2, f"oci:{layout.path}:t", tag="t")
        assert open_fds() == fds
        assert streams(repo2) == set()
        assert_consistent(Path(repo2.path), SHA256)
    assert busy_threads() == []


async def test_blob_digest_mismatch_names_both(tmp_path: Path, repo: Repository) -> None:
    tar = make_tar(files(1))
    layout = Layout(tmp_path / "lay")
    image = layout.add_image([tar], compression="zstd", tag="t")
    layout.write_index()
    # a different valid zstd stream of the same tar, same length: decompresses fine
    other = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(tar)
    blob = layout.blob_path(image.layer_digests[0])
    blob.write_bytes(other)
    manifest = json.loads(layout.blob_path(image.manifest_digest).read_bytes())
    manifest["layers"][0]["size"] = len(other)
    mdigest, msize = layout.add_blob(compact(manifest))
    layout.index = [{"mediaType": manifest["mediaType"], "digest": mdigest, "size": msize}]
    layout.write_index()
    with pytest.RaisesGroup(
        pytest.RaisesExc(DigestMismatchError, match=f"{sha256(other)}.*{image.layer_digests[0]}"),
        flatten_subgroups=True,
    ):
        await pull(repo, f"oci:{layout.path}", tag="t")
    assert streams(repo) == set()
    assert oci_refs(repo) == []


async def test_wrong_diff_id_refused(tmp_path: Path, repo: Repository) -> None:
    tars = [make_tar(files(1)), make_tar(files(2))]
    wrong = [sha256(tars[0]), sha256(b"not this")]
    layout = Layout(tmp_path / "lay")
    layout.add_image(tars, compression="gzip", diff_ids=wrong, tag="t")
    layout.write_index()
    with pytest.RaisesGroup(
        pytest.RaisesExc(DigestMismatchError, match=f"{wrong[1]}.*{sha256(tars[1])}"),
        flatten_subgroups=True,
    ):
        await pull(repo, f"oci:{layout.path}:t", tag="t")
    assert f"oci-layer-{wrong[1]}" not in streams(repo)
    assert not any(s.startswith(("oci-config", "oci-manifest")) for s in streams(repo))
    assert oci_refs(repo) == []


async def test_truncated_blob_and_bad_layout(tmp_path: Path, repo: Repository) -> None:
    layout = Layout(tmp_path / "lay")
    image = layout.add_image([make_tar(files(1))], tag="t")
    layout.write_index()
    blob = layout.blob_path(image.layer_digests[0])
    blob.write_bytes(blob.read_bytes()[:-512])
    with pytest.RaisesGroup(
        pytest.RaisesExc(ComposefsError, match="bytes"), flatten_subgroups=True
    ):
        await pull(repo, f"oci:{layout.path}:t")
    assert streams(repo) == set()
    with pytest.raises(ImageSourceError, match="not an OCI image layout"):
        await pull(repo, f"oci:{tmp_path}")
    with pytest.raises(ComposefsError, match="leading '@'"):
        await pull(repo, f"oci:{layout.path}:t", tag="@x")
    # other transports go through skopeo (tests/test_skopeo.py runs it)
    assert isinstance(open_source(parse_source("docker://quay.io/x")), SkopeoProxySource)
    assert isinstance(open_source(parse_source("oci-archive:/x.tar:t")), OciArchiveSource)
    assert isinstance(open_source(parse_source("docker-archive:/x.tar:a:b")), DockerArchiveSource)


# --------------------------------------------------------------------------- tags


def test_tag_encoding() -> None:
    for name in ["a", "docker://quay.io/fedora/fedora:latest", "50%/x", "%2F", "%252F", "%"]:
        assert decode_tag(encode_tag(name)) == name
        assert "/" not in encode_tag(name)
    assert encode_tag("oci:/a/b:t") == "oci:%2Fa%2Fb:t"
    assert encode_tag("%2F") == "%252F"
    assert decode_tag("%252F") == "%2F"
    assert decode_tag("%zz%2") == "%zz%2"


async def test_tag_untag_and_repull(tmp_path: Path, repo: Repository) -> None:
    layout = Layout(tmp_path / "lay")
    image = layout.add_image([make_tar(files(1)), make_tar(files(2))], compression="gzip")
    layout.write_index()
    ref = f"oci:{layout.path}"
    first = await pull(repo, ref, tag="one")
    assert first.layers_imported == 2
    again = await pull(repo, ref, tag="two")
    assert again.skipped
    assert again.layers_imported == 0
    assert again.manifest_stream == first.manifest_stream
    assert list_tags(repo) == [("one", image.manifest_digest), ("two", image.manifest_digest)]
    tag_image(repo, image.manifest_digest, "a/b%c")
    assert resolve_tag(repo, "a/b%c") == image.manifest_digest
    assert "a%2Fb%25c" in oci_refs(repo)
    untag_image(repo, "one")
    with pytest.raises(ComposefsError, match="no image tagged 'one'"):
        untag_image(repo, "one")
    with pytest.raises(ComposefsError, match="no image tagged"):
        open_image(repo, "one")
    assert open_image(repo, f"@{image.manifest_digest}").manifest_stream == first.manifest_stream
    # drop the manifest and config streams: layers are found and skipped
    os.unlink(os.path.join(repo.path, "streams", manifest_content_id(image.manifest_digest)))
    os.unlink(os.path.join(repo.path, "streams", config_content_id(image.config_digest)))
    third = await pull(repo, ref)
    assert not third.skipped
    assert third.layers_imported == 0
    assert third.manifest_stream == first.manifest_stream


async def test_concurrent_images_share_layers(tmp_path: Path, repo: Repository) -> None:
    shared = [make_tar(files(10)), make_tar(files(11, 9))]
    layout = Layout(tmp_path / "lay")
    for i in range(3):
        layout.add_image([*shared, make_tar(files(20 + i))], compression="zstd", tag=f"img{i}")
    layout.write_index()
    results: list[ImageStats] = []
    async with open_importer(repo, jobs=3) as importer:

        async def one(i: int) -> None:
            async with OciLayoutSource(str(layout.path), tag=f"img{i}") as source:
                results.append(await pull_image(importer, source, tag=f"img{i}"))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
    imported: dict[str, int] = {}
    for stats in results:
        for layer in stats.layers:
            assert isinstance(layer, LayerStats)
            imported[layer.diff_id] = imported.get(layer.diff_id, 0) + (not layer.skipped)
    assert len(imported) == 5
    assert set(imported.values()) == {1}
    assert [name for name, _ in list_tags(repo)] == ["img0", "img1", "img2"]
    assert_consistent(Path(repo.path), SHA256)


def _artifact_layout(tmp_path: Path) -> tuple[Layout, str, bytes]:
    """An OCI layout holding one artifact: a 5000-byte non-tar layer, an empty config."""
    layout = Layout(tmp_path / "lay")
    payload = os.urandom(5000)
    digest, size = layout.add_blob(payload)
    empty, esize = layout.add_blob(b"{}")
    manifest = compact(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/x-test",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": empty,
                "size": esize,
            },
            "layers": [{"mediaType": "application/x-test", "digest": digest, "size": size}],
        }
    )
    mdigest, msize = layout.add_blob(manifest)
    layout.index.append(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest,
            "size": msize,
        }
    )
    layout.write_index()
    return layout, digest, payload


async def test_non_tar_blob_stored_raw(tmp_path: Path, repo: Repository) -> None:
    layout, digest, _payload = _artifact_layout(tmp_path)
    await pull(repo, f"oci:{layout.path}", tag="art")
    with open_splitstream(repo, f"oci-layer-{digest}") as (info, _):
        assert info.content_type == ContentType.OCI_BLOB
        assert info.stream_size == 5000
    assert layer_sha(repo, digest) == digest
    image = open_image(repo, "art")
    assert not image.is_container
    assert image.layers[0][0] == digest


async def test_non_tar_blob_counts_as_written_then_deduplicated(
    tmp_path: Path, repo: Repository
) -> None:
    layout, _digest, payload = _artifact_layout(tmp_path)
    first = await pull(repo, f"oci:{layout.path}")
    assert (first.objects_written, first.objects_deduplicated) == (1, 0)
    with Repository.init(tmp_path / "again", insecure=True) as again:
        again.store_object(payload)  # the blob's bytes are an object there already
        second = await pull(again, f"oci:{layout.path}")
    assert (second.objects_written, second.objects_deduplicated) == (0, 1)


# --------------------------------------------------------------------------- decompression


async def _collect(pieces: list[bytes], **kwargs: Any) -> bytes:
    async def gen() -> AsyncIterator[bytes]:
        for p in pieces:
            yield p

    out = []
    async with open_verified_stream(gen(), **kwargs) as stream:
        async for piece in stream:
            assert len(piece) <= OUTPUT_PIECE
            out.append(piece)
    return b"".join(out)


@pytest.mark.parametrize("piece", [1, 4093, 100_000])
async def test_decompress_multi_member(piece: int) -> None:
    data = os.urandom(100_000) + bytes(2_500_000)
    gz = gzip.compress(data[:1000]) + gzip.compress(data[1000:])
    zs = zstandard.ZstdCompressor().compress(data[:1000]) + zstandard.ZstdCompressor().compress(
        data[1000:]
    )
    for comp, blob in [("gzip", gz), ("zstd", zs), (None, data)]:
        pieces = [blob[i : i + piece] for i in range(0, len(blob), piece)] if piece > 1 else [blob]
        got = await _collect(
            pieces, compression=comp, digest=sha256(blob), size=len(blob), where="x"
        )
        assert got == data
    with pytest.RaisesGroup(
        pytest.RaisesExc(FormatError, match=r"cannot decompress \(gzip\)"), flatten_subgroups=True
    ):
        await _collect(
            [gz + b"junk"],
            compression="gzip",
            digest=sha256(gz + b"junk"),
            size=len(gz) + 4,
            where="x",
        )
    with pytest.RaisesGroup(
        pytest.RaisesExc(DigestMismatchError, match="longer"), flatten_subgroups=True
    ):
        await _collect([zs], compression="zstd", digest=sha256(zs), size=10, where="x")


# --------------------------------------------------------------------------- CLI


def test_cli_pull_images_inspect_tag(
    tmp_path: Path, repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = Layout(tmp_path / "lay")
    image = layout.add_image(
        [make_tar(files(1)), make_tar(files(2))],
        compression="gzip",
        tag="v1",
        config={"architecture": "arm64", "os": "linux", "created": "2026-01-01T00:00:00Z"},
    )
    layout.write_index()
    base = ["--repo", repo.path]
    source = f"oci:{layout.path}:v1"
    assert cli.run([*base, "oci", "pull", source, "-j", "2"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"manifest {image.manifest_digest}"
    assert lines[1] == f"config   {image.config_digest}"
    assert lines[3] == f"tagged   {source}"
    assert "2 layers" in err
    assert resolve_tag(repo, source) == image.manifest_digest

    assert cli.run([*base, "oci", "images", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing == {
        "images": [
            {
                "name": source,
                "manifest_digest": image.manifest_digest,
                "is_container": True,
                "architecture": "arm64",
                "os": "linux",
                "created": "2026-01-01T00:00:00Z",
                "layer_count": 2,
                "referrer_count": 0,
            }
        ]
    }
    assert cli.run([*base, "oci", "tag", image.manifest_digest, "short"]) == 0
    assert capsys.readouterr().out == f"Tagged {image.manifest_digest} as short\n"
    assert cli.run([*base, "oci", "images"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "DIGEST", "ARCH", "LAYERS", "REFS"]
    assert table[3].split() == ["short", image.manifest_digest[7:19], "arm64", "2", "0"]

    assert cli.run([*base, "oci", "inspect", "short", "--manifest"]) == 0
    manifest = layout.blob_path(image.manifest_digest).read_bytes()
    assert capsys.readouterr().out == manifest.decode() + "\n"
    assert cli.run([*base, "oci", "inspect", f"@{image.manifest_digest}", "--config"]) == 0
    assert capsys.readouterr().out == layout.blob_path(image.config_digest).read_text() + "\n"
    assert cli.run([*base, "oci", "inspect", "short"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["manifest"] == manifest.decode()
    assert full["referrers"] == []
    assert set(full) == {
        "manifest",
        "config",
        "referrers",
        "composefs_erofs",
        "composefs_boot_erofs",
    }

    assert cli.run([*base, "oci", "untag", "short"]) == 0
    assert capsys.readouterr().out == "Removed tag short\n"
    assert cli.run([*base, "oci", "untag", "short"]) == 1
    assert "no image tagged 'short'" in capsys.readouterr().err
    assert cli.run([*base, "oci", "inspect", "nope"]) == 1
    assert cli.run([*base, "oci", "pull", f"oci:{tmp_path}/missing"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2
    assert "no such directory" in err
    # a corrupt layer: one line, exit 1
    blob = layout.blob_path(image.layer_digests[0])
    blob.write_bytes(blob.read_bytes()[:-1] + bytes([blob.read_bytes()[-1] ^ 0xFF]))
    with Repository.init(tmp_path / "repo2", algorithm=SHA256, insecure=True):
        pass
    assert cli.run(["--repo", str(tmp_path / "repo2"), "oci", "pull", source, "x"]) == 1
    err = capsys.readouterr().err
    assert image.layer_digests[0] in err
    assert len(err.splitlines()) == 1
    assert cli.run([*base, "oci", "images"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == source


async def test_a_fifo_in_a_layout_is_refused_not_waited_for(
    tmp_path: Path, repo: Repository
) -> None:
    layout = Layout(tmp_path / "lay")
    image = layout.add_image([make_tar(files(1))], tag="t")
    layout.write_index()
    blob = layout.blob_path(image.layer_digests[0])
    blob.unlink()
    os.mkfifo(blob)  # opening it for reading would block until a writer came
    with (
        trio.fail_after(20),
        pytest.RaisesGroup(
            pytest.RaisesExc(ImageSourceError, match="not a regular file"), flatten_subgroups=True
        ),
    ):
        await pull(repo, f"oci:{layout.path}:t")
    assert streams(repo) == set()


async def test_an_impossible_tag_is_refused_before_any_work(
    tmp_path: Path, repo: Repository
) -> None:
    layout = Layout(tmp_path / "lay")
    layout.add_image([make_tar(files(1))], tag="t")
    layout.write_index()
    with pytest.raises(ComposefsError, match="longer than 255 bytes"):
        await pull(repo, f"oci:{layout.path}:t", tag="x" * 300)
    assert streams(repo) == set()
    assert not os.listdir(os.path.join(repo.path, "objects")) or all(
        not os.listdir(os.path.join(repo.path, "objects", d))
        for d in os.listdir(os.path.join(repo.path, "objects"))
    )
