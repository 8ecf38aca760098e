"""docker-archive: sources, on archives by skopeo and by GNU tar (legacy and docker 25+ layouts)."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard

from trio_composefs import FormatError, Repository
from trio_composefs.oci import MEDIA_TYPES, Descriptor, ImageSourceError, open_image, pull_image
from trio_composefs.oci.sources import DockerArchiveSource, SkopeoProxySource, normalize_repo_tag
from trio_composefs.testing import open_fds, sample_layers, write_sample_layout


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def skopeo_inspect(ref: str, *options: str) -> bytes:
    return subprocess.check_output(
        [need("skopeo"), "inspect", *options, ref], stderr=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def skopeo_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample saved by skopeo as docker-archive (via gzip: Docker images have no zstd)."""
    skopeo = need("skopeo")
    base = tmp_path_factory.mktemp("docker")
    write_sample_layout(base / "sample")
    subprocess.run(
        [skopeo, "copy", "-q", "--dest-compress", "--dest-compress-format", "gzip",
         f"oci:{base / 'sample'}:latest", f"oci:{base / 'gz'}:latest"],
        check=True,
    )  # fmt: skip
    dest = base / "sample-docker.tar"
    subprocess.run(
        [skopeo, "copy", "-q", f"oci:{base / 'gz'}:latest", f"docker-archive:{dest}:foo/bar:v1"],
        check=True,
    )
    return dest


def config_for(*diff_ids: str) -> bytes:
    return json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images, written by GNU tar: a legacy one (a gzip layer reached through a symlink,
    a plain one) and a docker 25+ one (blobs/sha256/, a zstd layer)."""
    base = tmp_path_factory.mktemp("crafted")
    tree = base / "tree"
    (tree / "aaa").mkdir(parents=True)
    (tree / "blobs/sha256").mkdir(parents=True)
    layers = sample_layers()
    (tree / "first.gz").write_bytes(gzip.compress(layers[0].tar, mtime=0))
    os.symlink("../first.gz", tree / "aaa/layer.tar")
    (tree / "plain.tar").write_bytes(layers[2].tar)
    (tree / "cfg-a.json").write_bytes(config_for(layers[0].diff_id, layers[2].diff_id))
    zst = zstandard.ZstdCompressor(level=3).compress(layers[1].tar)
    (tree / "blobs/sha256" / sha(zst)[7:]).write_bytes(zst)
    cfg_b = config_for(layers[1].diff_id)
    (tree / "blobs/sha256" / sha(cfg_b)[7:]).write_bytes(cfg_b)
    manifest = [
        {"Config": "cfg-a.json", "RepoTags": ["localhost/a:1"],
         "Layers": ["aaa/layer.tar", "plain.tar"]},
        {"Config": f"blobs/sha256/{sha(cfg_b)[7:]}", "RepoTags": ["busybox:latest"],
         "Layers": [f"blobs/sha256/{sha(zst)[7:]}"]},
    ]  # fmt: skip
    (tree / "manifest.json").write_text(json.dumps(manifest))
    dest = base / "crafted.tar"
    subprocess.run([need("tar"), "-C", str(tree), "-cf", str(dest), "."], check=True)
    return dest


async def read_image(source: DockerArchiveSource) -> tuple[bytes, dict[str, Any], list[bytes]]:
    """Resolve; read the config; stream each layer and check its digest."""
    resolved = await source.resolve()
    assert resolved.media_type == MEDIA_TYPES.DOCKER_MANIFEST
    assert resolved.digest == sha(resolved.manifest)
    manifest = json.loads(resolved.manifest)
    config = await source.read_blob(Descriptor.from_json(manifest["config"], where="test"))
    assert sha(config) == manifest["config"]["digest"]
    layers = []
    for entry in manifest["layers"]:
        descriptor = Descriptor.from_json(entry, where="test")
        async with source.open_blob(descriptor) as stream:
            data = b"".join([piece async for piece in stream])
        assert sha(data) == descriptor.digest
        assert len(data) == descriptor.size
        layers.append(data)
    return resolved.manifest, manifest, layers


async def test_reads_what_skopeo_wrote(skopeo_archive: Path) -> None:
    before = open_fds()
    for ref in (None, "foo/bar:v1", "docker.io/foo/bar:v1", "@0"):
        async with DockerArchiveSource(str(skopeo_archive), ref) as source:
            raw, manifest, layers = await read_image(source)
            assert (await source.resolve()).manifest == raw  # deterministic
        assert layers == [layer.tar for layer in sample_layers()]
        # skopeo calls every layer gzip, whatever it is (these are plain tars)
        assert [e["mediaType"] for e in manifest["layers"]] == [MEDIA_TYPES.DOCKER_LAYER_GZIP] * 3
    assert open_fds() == before
    # skopeo synthesizes the same manifest, byte for byte
    assert raw == skopeo_inspect(f"docker-archive:{skopeo_archive}", "--raw")
    assert json.loads(tar_config(skopeo_archive)) == json.loads(
        skopeo_inspect(f"docker-archive:{skopeo_archive}", "--raw", "--config")
    )


def tar_config(archive: Path) -> bytes:
    """The config member, read with tar (an independent reader)."""
    listing = json.loads(subprocess.check_output(["tar", "-xOf", str(archive), "manifest.json"]))
    return subprocess.check_output(["tar", "-xOf", str(archive), listing[0]["Config"]])


async def test_crafted_archive(crafted: Path) -> None:
    layers = sample_layers()
    async with DockerArchiveSource(str(crafted), "@0") as source:
        _, manifest, data = await read_image(source)
    # as skopeo: every layer is "gzip" and served decompressed, named by its diff_id
    assert [e["mediaType"] for e in manifest["layers"]] == [MEDIA_TYPES.DOCKER_LAYER_GZIP] * 2
    assert data == [layers[0].tar, layers[2].tar]
    assert [e["digest"] for e in manifest["layers"]] == [layers[0].diff_id, layers[2].diff_id]
    for ref in ("busybox", "docker.io/library/busybox:latest", "@1"):
        async with DockerArchiveSource(str(crafted), ref) as source:
            raw, manifest, data = await read_image(source)
        assert [e["mediaType"] for e in manifest["layers"]] == [MEDIA_TYPES.DOCKER_LAYER_GZIP]
        assert data == [layers[1].tar]
    assert raw == skopeo_inspect(f"docker-archive:{crafted}:busybox:latest", "--raw")
    async with DockerArchiveSource(str(crafted), "localhost/a:1") as source:
        await read_image(source)


async def test_selection_errors(crafted: Path) -> None:
    cases = {
        None: r"holds 2 images; choose one .* \(tags: localhost/a:1, busybox:latest\)",
        "@2": r"no image @2 \(the archive holds 2\)",
        "@x": "not an image number: '@x'",
        "nope:1": r"no image tagged 'nope:1' \(tags: localhost/a:1, busybox:latest\)",
    }
    for ref, message in cases.items():
        async with DockerArchiveSource(str(crafted), ref) as source:
            with pytest.raises(ImageSourceError, match=message):
                await source.resolve()


def tree_archive(tmp_path: Path, files: dict[str, bytes], name: str = "a.tar") -> Path:
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    dest = tmp_path / name
    subprocess.run([need("tar"), "-C", str(tree), "-cf", str(dest), *files], check=True)
    return dest


def manifest_json(config: str, *layers: str) -> bytes:
    return json.dumps([{"Config": config, "RepoTags": None, "Layers": list(layers)}]).encode()


async def test_broken_archives(tmp_path: Path) -> None:
    layer = sample_layers()[2]
    cases = [
        ({"x": b""}, ImageSourceError, r"a.tar: no member 'manifest.json' in the archive"),
        ({"manifest.json": b"{}"}, FormatError, "manifest.json is not a list of objects"),
        ({"manifest.json": b"[{"}, FormatError, "member 'manifest.json' is not valid JSON"),
        ({"manifest.json": manifest_json("c.json", "l.tar"), "c.json": config_for(layer.diff_id)},
         ImageSourceError, "a.tar: no member 'l.tar' in the archive"),
        ({"manifest.json": manifest_json("c.json", "l.tar"), "c.json": config_for(),
          "l.tar": layer.tar}, FormatError, "config 'c.json' lists 0 diff_ids for 1 layers"),
        ({"manifest.json": manifest_json("c.json", "l.tar"), "c.json": b"[]", "l.tar": layer.tar},
         FormatError, "member 'c.json': not a JSON object"),
        ({"manifest.json": b"[]"}, ImageSourceError, "the archive holds no image"),
    ]  # fmt: skip
    for i, (files, error, message) in enumerate(cases):
        case = tmp_path / str(i)
        case.mkdir()
        async with DockerArchiveSource(str(tree_archive(case, files))) as source:
            with pytest.raises(error, match=message):
                await source.resolve()


async def test_corrupted_plain_layer_is_caught_by_its_digest(tmp_path: Path) -> None:
    layer = sample_layers()[2]
    bad = bytearray(layer.tar)
    bad[5000] ^= 1
    files = {
        "manifest.json": manifest_json("c.json", "l.tar"),
        "c.json": config_for(layer.diff_id),
        "l.tar": bytes(bad),
    }
    async with DockerArchiveSource(str(tree_archive(tmp_path, files))) as source:
        descriptor = Descriptor.from_json(
            json.loads((await source.resolve()).manifest)["layers"][0], where="test"
        )
        assert descriptor.digest == layer.diff_id  # what the config promises
        async with source.open_blob(descriptor) as stream:
            assert sha(b"".join([piece async for piece in stream])) != descriptor.digest


async def test_blobs_need_resolve_first(skopeo_archive: Path) -> None:
    descriptor = Descriptor(MEDIA_TYPES.DOCKER_CONFIG, "sha256:" + "0" * 64, 3)
    async with DockerArchiveSource(str(skopeo_archive)) as source:
        with pytest.raises(ImageSourceError, match=r"call resolve\(\) first"):
            await source.read_blob(descriptor)
        await source.resolve()
        with pytest.raises(ImageSourceError, match="no blob sha256:000"):
            async with source.open_blob(descriptor):
                pass


def test_reference_parsing() -> None:
    source = DockerArchiveSource.from_reference("/x/f.tar:foo/bar:v1")
    assert (source.path, source.ref) == ("/x/f.tar", "foo/bar:v1")
    assert source.description == "docker-archive:/x/f.tar:foo/bar:v1"
    assert DockerArchiveSource.from_reference("f.tar").ref is None
    assert DockerArchiveSource.from_reference("f.tar:@1").ref == "@1"
    assert normalize_repo_tag("busybox") == "busybox:latest"
    assert normalize_repo_tag("docker.io/library/busybox:1") == "busybox:1"
    assert normalize_repo_tag("localhost:5000/x") == "localhost:5000/x:latest"
    assert normalize_repo_tag("quay.io/a/b:c") == "quay.io/a/b:c"


# ------------------------------------------------ the manifest digest is skopeo's

COMPRESSORS: dict[str, Any] = {
    "plain": lambda data: data,
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "zstd": lambda data: zstandard.ZstdCompressor(level=3).compress(data),
    "bzip2": bz2.compress,
    "xz": lzma.compress,
}


def archive_with(tmp_path: Path, compressions: list[str]) -> Path:
    """The sample image as ``docker save`` lays it out (``<id>/layer.tar``, a config
    named by its digest), each layer compressed as asked, and the first layer
    listed again at the end through a symbolic link (as docker saves a repeated layer)."""
    layers = sample_layers()
    tree = tmp_path / "tree"
    names = []
    for i, (layer, how) in enumerate(zip(layers, compressions, strict=True)):
        (tree / f"l{i}").mkdir(parents=True)
        (tree / f"l{i}/layer.tar").write_bytes(COMPRESSORS[how](layer.tar))
        names.append(f"l{i}/layer.tar")
    (tree / "dup").mkdir()
    os.symlink("../l0/layer.tar", tree / "dup/layer.tar")
    names.append("dup/layer.tar")
    config = config_for(*[layer.diff_id for layer in layers], layers[0].diff_id)
    (tree / f"{sha(config)[7:]}.json").write_bytes(config)
    (tree / "manifest.json").write_text(
        json.dumps([{"Config": f"{sha(config)[7:]}.json", "RepoTags": ["x:1"], "Layers": names}])
    )
    dest = tmp_path / "image.tar"
    subprocess.run([need("tar"), "-C", str(tree), "-cf", str(dest), "."], check=True)
    return dest


async def proxy_manifest_digest(ref: str) -> str:
    """The digest skopeo's image proxy reports for an image (what cfsctl names it by)."""
    async with SkopeoProxySource(ref) as source:
        await source.resolve()
        assert source._proxy is not None
        digest, _ = await source._proxy.read_all("GetManifest", source._image)
    assert isinstance(digest, str)
    return digest


def oci_copy_diff_ids(tmp_path: Path, ref: str) -> tuple[list[str], list[str]]:
    """``skopeo copy REF oci:DIR``: the diff_ids its config lists, and the digests of
    its layer blobs once decompressed (skopeo gzips the plain layers it copies)."""
    dest = tmp_path / "oci"
    subprocess.run([need("skopeo"), "copy", "-q", ref, f"oci:{dest}:x"], check=True)
    blobs = dest / "blobs/sha256"
    (entry,) = json.loads((dest / "index.json").read_bytes())["manifests"]
    manifest = json.loads((blobs / entry["digest"][7:]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
    uncompressed = []
    for layer in manifest["layers"]:
        data = (blobs / layer["digest"][7:]).read_bytes()
        assert layer["mediaType"] == MEDIA_TYPES.OCI_LAYER_GZIP
        uncompressed.append(sha(gzip.decompress(data)))
    return config["rootfs"]["diff_ids"], uncompressed


@pytest.mark.parametrize(
    "compressions",
    [
        ["plain"] * 3,
        ["gzip"] * 3,
        ["zstd"] * 3,
        ["plain", "gzip", "zstd"],
        ["bzip2", "xz", "plain"],
    ],
    ids="-".join,
)
async def test_manifest_digest_is_skopeos(
    tmp_path: Path, repo: Repository, compressions: list[str]
) -> None:
    """Whatever the layers' compression, our synthesized manifest is the one
    ``skopeo inspect --raw`` prints, byte for byte; its digest is the one skopeo's
    image proxy reports (the name cfsctl stores the image under); the pulled image
    is stored under it, with skopeo's config and the diff_ids of ``skopeo copy``."""
    archive = archive_with(tmp_path, compressions)
    ref = f"docker-archive:{archive}"
    theirs = skopeo_inspect(ref, "--raw")
    their_config = skopeo_inspect(ref, "--raw", "--config")
    async with DockerArchiveSource(str(archive)) as source:
        raw, manifest, data = await read_image(source)
        config = await source.read_blob(Descriptor.from_json(manifest["config"], where="test"))
    assert raw == theirs
    assert config == their_config
    layers = sample_layers()
    assert data == [layer.tar for layer in layers] + [layers[0].tar]
    assert await proxy_manifest_digest(ref) == sha(theirs)

    async with DockerArchiveSource(str(archive)) as source:
        await pull_image(repo, source, tag="t")
    stored = open_image(repo, "t")
    assert stored.manifest_digest == sha(theirs)
    assert stored.manifest == theirs
    assert stored.config_digest == json.loads(theirs)["config"]["digest"] == sha(their_config)
    diff_ids, uncompressed = oci_copy_diff_ids(tmp_path, ref)
    assert [d for d, _ in stored.layers] == diff_ids == uncompressed


async def test_layer_member_for_two_diff_ids_is_refused(tmp_path: Path) -> None:
    """As skopeo: one member cannot stand for two different diff_ids."""
    a, b = sample_layers()[1:]
    files = {
        "manifest.json": manifest_json("c.json", "l.tar", "l.tar"),
        "c.json": config_for(a.diff_id, b.diff_id),
        "l.tar": a.tar,
    }
    archive = tree_archive(tmp_path, files)
    with pytest.raises(subprocess.CalledProcessError):
        skopeo_inspect(f"docker-archive:{archive}", "--raw")
    async with DockerArchiveSource(str(archive)) as source:
        with pytest.raises(FormatError, match=r"'l\.tar' stands for two diff_ids"):
            await source.resolve()


async def test_corrupt_compressed_layer(tmp_path: Path) -> None:
    layer = sample_layers()[2]
    bad = bytearray(gzip.compress(layer.tar, mtime=0))
    bad[len(bad) // 2] ^= 0xFF
    files = {
        "manifest.json": manifest_json("c.json", "l.tar"),
        "c.json": config_for(layer.diff_id),
        "l.tar": bytes(bad),
    }
    async with DockerArchiveSource(str(tree_archive(tmp_path, files))) as source:
        with pytest.raises(FormatError, match=r"member 'l.tar' \(gzip\) does not decompress"):
            await source.resolve()
