"""The skopeo sources: a copy through ``dir:``, and streaming through the image proxy."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard

from trio_composefs import DigestMismatchError
from trio_composefs.oci import MEDIA_TYPES, Descriptor, ImageSourceError, Platform
from trio_composefs.oci._index import REF_NAME
from trio_composefs.oci.sources import SkopeoProxySource, SkopeoSource, find_skopeo
from trio_composefs.testing import open_fds, sample_layers, write_sample_layout


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sample`` (an oci: layout), ``sample-dir`` (skopeo's dir: copy of it) and ``multi``
    (an oci: layout whose tag 'multi' is an image index: linux/amd64 and linux/arm64/v8)."""
    skopeo = need("skopeo")
    base = tmp_path_factory.mktemp("skopeo")
    write_sample_layout(base / "sample")
    subprocess.run(
        [skopeo, "copy", "-q", f"oci:{base / 'sample'}:latest", f"dir:{base / 'sample-dir'}"],
        check=True,
    )
    multi = base / "multi"
    write_sample_layout(multi)
    write_sample_layout(base / "arm", platform=Platform("linux", "arm64", "v8"))
    for blob in (base / "arm/blobs/sha256").iterdir():
        shutil.copy(blob, multi / "blobs/sha256" / blob.name)
    entries = []
    for src, plat in (
        (multi, {"os": "linux", "architecture": "amd64"}),
        (base / "arm", {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    ):
        (entry,) = json.loads((src / "index.json").read_bytes())["manifests"]
        del entry["annotations"]
        entries.append({**entry, "platform": plat})
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": MEDIA_TYPES.OCI_INDEX, "manifests": entries}
    ).encode()
    (multi / "blobs/sha256" / sha(index)[7:]).write_bytes(index)
    top = {"schemaVersion": 2, "manifests": [{
        "mediaType": MEDIA_TYPES.OCI_INDEX, "digest": sha(index), "size": len(index),
        "annotations": {REF_NAME: "multi"},
    }]}  # fmt: skip
    (multi / "index.json").write_text(json.dumps(top))
    return base


def decompress(media_type: str, data: bytes) -> bytes:
    """By the bytes' magic: skopeo labels docker-archive's plain tars as gzip."""
    if data[:2] == b"\x1f\x8b":
        assert media_type.endswith(("+gzip", ".gzip"))
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        assert media_type.endswith("+zstd")
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


async def read_image(
    source: SkopeoSource | SkopeoProxySource, platform: Platform | None = None
) -> tuple[bytes, dict[str, Any], list[bytes]]:
    resolved = await source.resolve(platform)
    assert resolved.digest == sha(resolved.manifest)
    manifest = json.loads(resolved.manifest)
    assert resolved.media_type == manifest["mediaType"]
    config = await source.read_blob(Descriptor.from_json(manifest["config"], where="test"))
    layers = []
    for entry in manifest["layers"]:
        descriptor = Descriptor.from_json(entry, where="test")
        async with source.open_blob(descriptor) as stream:
            pieces = [piece async for piece in stream]
        assert all(0 < len(piece) <= 1 << 20 for piece in pieces)
        data = b"".join(pieces)
        assert sha(data) == descriptor.digest
        layers.append(decompress(descriptor.media_type, data))
    return resolved.manifest, json.loads(config), layers


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


async def test_dir_transport_through_skopeo(layouts: Path, tmp_path: Path) -> None:
    before = open_fds()
    async with SkopeoSource(f"dir:{layouts / 'sample-dir'}", workdir=str(tmp_path)) as source:
        assert source.description == f"dir:{layouts / 'sample-dir'}"
        raw, config, layers = await read_image(source)
        assert len(leftovers(tmp_path)) == 1
    assert leftovers(tmp_path) == []  # the copy is gone
    assert open_fds() == before
    # the manifest is the original's, byte for byte (dir: keeps layers as stored)
    assert raw == (layouts / "sample-dir/manifest.json").read_bytes()
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in sample_layers()]
    assert layers == [layer.tar for layer in sample_layers()]


async def test_platform_is_passed_to_skopeo(layouts: Path, tmp_path: Path) -> None:
    async with SkopeoSource(f"oci:{layouts / 'multi'}:multi", workdir=str(tmp_path)) as source:
        _, config, _ = await read_image(source, Platform("linux", "arm64", "v8"))
        assert config["architecture"] == "arm64"
        raw, config, layers = await read_image(source, Platform("linux", "amd64"))
        assert config["architecture"] == "amd64"
        assert layers == [layer.tar for layer in sample_layers()]
        assert (await source.resolve(Platform("linux", "amd64"))).manifest == raw  # cached
        with pytest.raises(ImageSourceError, match="skopeo could not copy"):
            await source.resolve(Platform("linux", "s390x"))


async def test_copy_failure_carries_skopeo_message(tmp_path: Path) -> None:
    need("skopeo")
    async with SkopeoSource(f"oci:{tmp_path / 'absent'}:x", workdir=str(tmp_path)) as source:
        with pytest.raises(ImageSourceError, match=r"skopeo could not copy oci:.*absent:x \(exit"):
            await source.resolve()
    assert leftovers(tmp_path) == []


async def test_skopeo_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageSourceError, match="'no-such-skopeo' is not installed"):
        async with SkopeoSource("docker://example.org/x", skopeo="no-such-skopeo"):
            pass
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageSourceError, match=r"'skopeo' is not installed .* oci-archive:"):
        find_skopeo()


async def test_misuse(tmp_path: Path) -> None:
    need("skopeo")
    source = SkopeoSource("dir:/nowhere", workdir=str(tmp_path))
    with pytest.raises(ImageSourceError, match="outside 'async with'"):
        await source.resolve()
    descriptor = Descriptor(MEDIA_TYPES.OCI_CONFIG, "sha256:" + "0" * 64, 2)
    async with source:
        with pytest.raises(ImageSourceError, match=r"call resolve\(\) before reading blobs"):
            await source.read_blob(descriptor)
    with pytest.raises(ImageSourceError, match="cannot make a temporary directory in /nowhere"):
        async with SkopeoSource("dir:/x", workdir="/nowhere/at/all"):
            pass


# --------------------------------------------------------------------------- the image proxy


async def test_proxy_streams_an_oci_layout(layouts: Path) -> None:
    need("skopeo")
    before = open_fds()
    layout = layouts / "sample"
    async with SkopeoProxySource(f"oci:{layout}:latest") as source:
        raw, config, layers = await read_image(source)
        assert await source.resolve() is await source.resolve()  # cached
    assert open_fds() == before
    (entry,) = json.loads((layout / "index.json").read_bytes())["manifests"]
    assert raw == (layout / "blobs/sha256" / entry["digest"][7:]).read_bytes()
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in sample_layers()]
    assert layers == [layer.tar for layer in sample_layers()]


async def test_proxy_converts_docker_manifests_to_oci(layouts: Path, tmp_path: Path) -> None:
    archive = docker_archive_of(layouts / "sample-dir", tmp_path)
    async with SkopeoProxySource(f"docker-archive:{archive}") as source:
        raw, _, layers = await read_image(source)
    assert json.loads(raw)["mediaType"] == MEDIA_TYPES.OCI_MANIFEST
    assert layers == [layer.tar for layer in sample_layers()]


def docker_archive_of(dir_copy: Path, tmp_path: Path) -> Path:
    """skopeo cannot put zstd layers in a Docker image: recompress to gzip first."""
    gz, dest = tmp_path / "gz", tmp_path / "docker.tar"
    subprocess.run(
        [need("skopeo"), "copy", "-q", "--dest-compress", "--dest-compress-format", "gzip",
         f"dir:{dir_copy}", f"oci:{gz}:x"],
        check=True,
    )  # fmt: skip
    subprocess.run(["skopeo", "copy", "-q", f"oci:{gz}:x", f"docker-archive:{dest}"], check=True)
    return dest


async def test_proxy_platforms_and_errors(layouts: Path, tmp_path: Path) -> None:
    need("skopeo")
    async with SkopeoProxySource(f"oci:{layouts / 'multi'}:multi") as source:
        _, config, _ = await read_image(source, Platform("linux", "arm64", "v8"))
        assert config["architecture"] == "arm64"
        _, config, _ = await read_image(source, Platform("linux", "amd64"))
        assert config["architecture"] == "amd64"
    async with SkopeoProxySource(f"oci:{tmp_path / 'absent'}:x") as source:
        with pytest.raises(ImageSourceError, match=r"skopeo: OpenImage: .*absent/index.json"):
            await source.resolve()
    with pytest.raises(ImageSourceError, match="'no-such-skopeo' is not installed"):
        async with SkopeoProxySource("oci:x", skopeo="no-such-skopeo"):
            pass
    source = SkopeoProxySource("oci:x")
    with pytest.raises(ImageSourceError, match="outside 'async with'"):
        await source.resolve()


async def drain(source: SkopeoProxySource, descriptor: Descriptor) -> None:
    async with source.open_blob(descriptor) as stream:
        async for _ in stream:
            pass


def corrupted_copy(layout: Path, dest: Path) -> str:
    """A copy of ``layout`` whose plain (last) layer has one byte changed; its digest."""
    shutil.copytree(layout, dest)
    (entry,) = json.loads((dest / "index.json").read_bytes())["manifests"]
    manifest = json.loads((dest / "blobs/sha256" / entry["digest"][7:]).read_bytes())
    digest: str = manifest["layers"][2]["digest"]
    blob = dest / "blobs/sha256" / digest[7:]
    data = bytearray(blob.read_bytes())
    data[1000] ^= 1
    blob.write_bytes(bytes(data))
    return digest


async def test_proxy_reports_a_corrupted_blob(layouts: Path, tmp_path: Path) -> None:
    need("skopeo")
    digest = corrupted_copy(layouts / "sample", tmp_path / "bad")
    async with SkopeoProxySource(f"oci:{tmp_path / 'bad'}:latest") as source:
        manifest = json.loads((await source.resolve()).manifest)
        (entry,) = [e for e in manifest["layers"] if e["digest"] == digest]
        descriptor = Descriptor.from_json(entry, where="test")
        # a digest mismatch naming the blob, as our own check of the bytes would say
        with pytest.raises(
            DigestMismatchError, match=rf"blob {digest}: skopeo: FinishPipe: corrupted blob"
        ):
            await drain(source, descriptor)
        # the proxy is still usable
        config = Descriptor.from_json(manifest["config"], where="test")
        assert json.loads(await source.read_blob(config))["os"] == "linux"


async def test_proxy_abandoned_and_cancelled_reads(layouts: Path) -> None:
    need("skopeo")
    before = open_fds()
    async with SkopeoProxySource(f"oci:{layouts / 'sample'}:latest") as source:
        manifest = json.loads((await source.resolve()).manifest)
        big = Descriptor.from_json(manifest["layers"][0], where="test")
        async with source.open_blob(big) as stream:
            async for _ in stream:
                break  # abandoned after one piece
        with trio.CancelScope() as scope:
            async with source.open_blob(big) as stream:
                async for _ in stream:
                    scope.cancel()
        assert scope.cancelled_caught
        async with source.open_blob(big) as stream:
            data = b"".join([piece async for piece in stream])
        assert sha(data) == big.digest
    assert open_fds() == before
