"""oci-archive: sources, on archives written by skopeo and GNU tar; the shared index rules."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from trio_composefs import DigestMismatchError, FormatError
from trio_composefs.oci import MEDIA_TYPES, Descriptor, ImageSourceError, Platform, ResolvedImage
from trio_composefs.oci._index import REF_NAME, pick_from_index, pick_platform
from trio_composefs.oci.sources import OciArchiveSource
from trio_composefs.testing import open_fds, sample_layers, write_sample_layout


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def gnu_tar(src: Path, dest: Path, *extra: str) -> Path:
    subprocess.run([need("tar"), "-C", str(src), "-cf", str(dest), *extra, "."], check=True)
    return dest


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("layout") / "sample"
    write_sample_layout(path)
    return path


@pytest.fixture(scope="module")
def skopeo_archive(layout: Path) -> Path:
    """The sample, written as an oci-archive by skopeo."""
    dest = layout.parent / "sample-oci.tar"
    subprocess.run(
        [need("skopeo"), "copy", "-q", f"oci:{layout}:latest", f"oci-archive:{dest}:latest"],
        check=True,
    )
    return dest


@pytest.fixture(scope="module")
def multi_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layout with an image index (linux/amd64 + linux/arm64/v8) tagged 'multi' and the
    amd64 manifest tagged 'latest'."""
    base = tmp_path_factory.mktemp("multi")
    amd, arm, out = base / "amd", base / "arm", base / "layout"
    write_sample_layout(amd)
    write_sample_layout(arm, platform=Platform("linux", "arm64", "v8"))
    shutil.copytree(amd, out)
    for blob in (arm / "blobs/sha256").iterdir():
        shutil.copy(blob, out / "blobs/sha256" / blob.name)
    entries = []
    arm64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    for src, plat in ((amd, {"os": "linux", "architecture": "amd64"}), (arm, arm64)):
        (entry,) = json.loads((src / "index.json").read_bytes())["manifests"]
        del entry["annotations"]
        entries.append({**entry, "platform": plat})
    image_index = json.dumps(
        {"schemaVersion": 2, "mediaType": MEDIA_TYPES.OCI_INDEX, "manifests": entries}
    ).encode()
    (out / "blobs/sha256" / sha(image_index)[7:]).write_bytes(image_index)
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MEDIA_TYPES.OCI_INDEX,
                "digest": sha(image_index),
                "size": len(image_index),
                "annotations": {REF_NAME: "multi"},
            },
            {**entries[0], "annotations": {REF_NAME: "latest"}},
        ],
    }
    (out / "index.json").write_text(json.dumps(top))
    return out


@pytest.fixture(scope="module")
def multi_archive(multi_layout: Path) -> Path:
    """``multi_layout`` archived by GNU tar: member names start with ``./``."""
    return gnu_tar(multi_layout, multi_layout.parent / "multi.tar")


def skopeo_inspect(ref: str, *options: str) -> bytes:
    return subprocess.check_output([need("skopeo"), "inspect", *options, ref])


def derived(src: Path, dest: Path, change: Callable[[bytes], bytes]) -> Path:
    """A copy of ``src`` at ``dest``, its bytes changed by ``change``."""
    dest.write_bytes(change(src.read_bytes()))
    return dest


def decompress(media_type: str, data: bytes) -> bytes:
    if media_type.endswith("+gzip"):
        return gzip.decompress(data)
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


async def read_image(source: OciArchiveSource, platform: Platform | None = None) -> tuple[
    ResolvedImage, dict[str, Any], bytes, list[bytes]
]:  # fmt: skip
    """Resolve, read the config, stream every layer (checking chunk sizes)."""
    resolved = await source.resolve(platform)
    manifest = json.loads(resolved.manifest)
    config = await source.read_blob(Descriptor.from_json(manifest["config"], where="test"))
    layers = []
    for entry in manifest["layers"]:
        descriptor = Descriptor.from_json(entry, where="test")
        pieces = []
        async with source.open_blob(descriptor) as stream:
            async for piece in stream:
                assert 0 < len(piece) <= 1 << 20
                pieces.append(piece)
        data = b"".join(pieces)
        assert sha(data) == descriptor.digest
        layers.append(decompress(descriptor.media_type, data))
    return resolved, manifest, config, layers


async def test_reads_what_skopeo_wrote(skopeo_archive: Path) -> None:
    before = open_fds()
    ref = f"oci-archive:{skopeo_archive}:latest"
    async with OciArchiveSource(str(skopeo_archive), tag="latest") as source:
        assert source.description == ref
        resolved, _, config, layers = await read_image(source)
    assert open_fds() == before
    assert resolved.manifest == skopeo_inspect(ref, "--raw")
    assert resolved.digest == sha(resolved.manifest)
    assert resolved.media_type == MEDIA_TYPES.OCI_MANIFEST
    assert config == skopeo_inspect(ref, "--raw", "--config")
    assert layers == [layer.tar for layer in sample_layers()]


async def test_selection_by_digest_and_default(skopeo_archive: Path) -> None:
    async with OciArchiveSource(str(skopeo_archive)) as source:
        resolved = await source.resolve()
    async with OciArchiveSource(str(skopeo_archive), digest=resolved.digest) as source:
        assert (await source.resolve()).manifest == resolved.manifest
    async with OciArchiveSource(str(skopeo_archive), tag="nope") as source:
        with pytest.raises(ImageSourceError, match=r"no image tagged 'nope' \(tags: latest\)"):
            await source.resolve()
    async with OciArchiveSource(str(skopeo_archive), digest="sha256:" + "0" * 64) as source:
        with pytest.raises(ImageSourceError, match="no manifest sha256:0000"):
            await source.resolve()


async def test_gnu_tar_archive_with_an_image_index(multi_archive: Path) -> None:
    async with OciArchiveSource(str(multi_archive), tag="multi") as source:
        _, _, config, layers = await read_image(source, Platform("linux", "arm64"))
        assert json.loads(config)["architecture"] == "arm64"
        assert layers == [layer.tar for layer in sample_layers()]
        _, _, config, _ = await read_image(source, Platform("linux", "arm64", "v8"))
        assert json.loads(config)["architecture"] == "arm64"
        _, _, config, _ = await read_image(source, Platform("linux", "amd64"))
        assert json.loads(config)["architecture"] == "amd64"
        with pytest.raises(ImageSourceError, match="no image for platform linux/s390x"):
            await source.resolve(Platform("linux", "s390x"))
        with pytest.raises(ImageSourceError, match="linux/arm64/v7"):
            await source.resolve(Platform("linux", "arm64", "v7"))
    async with OciArchiveSource(str(multi_archive), tag="latest") as source:
        resolved = await source.resolve(Platform("linux", "amd64"))
        assert resolved.media_type == MEDIA_TYPES.OCI_MANIFEST
        with pytest.raises(ImageSourceError, match="is for linux/amd64, not linux/s390x"):
            await source.resolve(Platform("linux", "s390x"))
    async with OciArchiveSource(str(multi_archive)) as source:  # the top entry for the platform
        assert (await source.resolve(Platform("linux", "amd64"))).manifest == resolved.manifest
        message = r"no image for platform linux/arm64 \(offered: linux/amd64; tags: latest, mu"
        with pytest.raises(ImageSourceError, match=message):
            await source.resolve(Platform("linux", "arm64"))


async def test_digests_not_in_the_index(multi_archive: Path, skopeo_archive: Path) -> None:
    async with OciArchiveSource(str(multi_archive), tag="multi") as source:
        arm = await source.resolve(Platform("linux", "arm64"))
    async with OciArchiveSource(str(multi_archive), digest=arm.digest) as source:
        assert await source.resolve() == arm  # found among the blobs, type from its JSON
    async with OciArchiveSource(str(skopeo_archive)) as source:  # platform-less: taken as is
        resolved = await source.resolve(Platform("linux", "s390x"))
        config = json.loads(resolved.manifest)["config"]["digest"]
    async with OciArchiveSource(str(skopeo_archive), digest=config) as source:
        with pytest.raises(ImageSourceError, match="is not a manifest or an index"):
            await source.resolve()


async def test_missing_and_unreadable_archives(tmp_path: Path, skopeo_archive: Path) -> None:
    with pytest.raises(ImageSourceError, match=r"cannot open .*nothing.tar"):
        async with OciArchiveSource(str(tmp_path / "nothing.tar")):
            pass
    with pytest.raises(ImageSourceError, match=r"cannot read .*: Is a directory"):
        async with OciArchiveSource(str(tmp_path)):
            pass
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(FormatError, match=r"junk.tar: not a readable tar archive"):
        async with OciArchiveSource(str(junk)):
            pass
    compressed = derived(skopeo_archive, tmp_path / "sample.tar.gz", gzip.compress)
    with pytest.raises(FormatError, match=r"sample.tar.gz: a compressed archive"):
        async with OciArchiveSource(str(compressed)):
            pass
    before = open_fds()
    truncated = derived(skopeo_archive, tmp_path / "truncated.tar", lambda b: b[: len(b) // 2])
    with pytest.raises(FormatError, match=r"truncated.tar: (member '.*' is truncated|not a)"):
        async with OciArchiveSource(str(truncated)):
            pass
    assert open_fds() == before


def sample_manifest(layout: Path) -> dict[str, Any]:
    (entry,) = json.loads((layout / "index.json").read_bytes())["manifests"]
    manifest: dict[str, Any] = json.loads(
        (layout / "blobs/sha256" / entry["digest"][7:]).read_bytes()
    )
    return manifest


async def test_missing_members(tmp_path: Path, layout: Path) -> None:
    no_index = gnu_tar(layout, tmp_path / "no-index.tar", "--exclude=./index.json")
    async with OciArchiveSource(str(no_index)) as source:
        with pytest.raises(ImageSourceError, match=r"no-index.tar: no index.json member"):
            await source.resolve()
    manifest = sample_manifest(layout)
    config = Descriptor.from_json(manifest["config"], where="test")
    name = f"blobs/sha256/{config.digest[7:]}"
    no_config = gnu_tar(layout, tmp_path / "no-config.tar", f"--exclude=./{name}")
    async with OciArchiveSource(str(no_config)) as source:
        await source.resolve()
        with pytest.raises(ImageSourceError, match=f"no-config.tar: no member '{name}'"):
            await source.read_blob(config)
        layer = Descriptor.from_json(manifest["layers"][0], where="test")
        async with source.open_blob(layer) as stream:
            assert sum([len(piece) async for piece in stream]) == layer.size


async def test_descriptor_checks(tmp_path: Path, layout: Path) -> None:
    config = Descriptor.from_json(sample_manifest(layout)["config"], where="test")
    async with OciArchiveSource(str(gnu_tar(layout, tmp_path / "plain.tar"))) as source:
        wrong_size = Descriptor(config.media_type, config.digest, config.size + 1)
        with pytest.raises(FormatError, match=r"plain.tar: member .* has .* bytes, the descr"):
            await source.read_blob(wrong_size)
        with pytest.raises(FormatError, match=r"has .* bytes, the descriptor says"):
            async with source.open_blob(wrong_size):
                pass
        with pytest.raises(ImageSourceError, match=r"is 811 bytes \(more than 10\)"):
            await source.read_blob(config, max_size=10)
        assert json.loads(await source.read_blob(config))["os"] == "linux"


def member_offset(archive: Path, name: str) -> int:
    with tarfile.open(archive) as tar:
        for info in tar:
            if info.name.lstrip("./") == name or info.name == name:
                return info.offset_data
    raise AssertionError(name)


async def test_corrupted_blobs(tmp_path: Path, skopeo_archive: Path) -> None:
    async with OciArchiveSource(str(skopeo_archive)) as source:
        resolved = await source.resolve()
    manifest = json.loads(resolved.manifest)
    config_name = "blobs/sha256/" + manifest["config"]["digest"][7:]
    layer_name = "blobs/sha256/" + manifest["layers"][1]["digest"][7:]

    def corrupt(data: bytes) -> bytes:
        out = bytearray(data)
        out[member_offset(skopeo_archive, config_name) + 2] ^= 0x55
        out[member_offset(skopeo_archive, layer_name) + 100] ^= 0x55
        return bytes(out)

    bad = derived(skopeo_archive, tmp_path / "bad.tar", corrupt)
    async with OciArchiveSource(str(bad)) as source:
        resolved = await source.resolve()
        config = Descriptor.from_json(manifest["config"], where="test")
        with pytest.raises(DigestMismatchError, match=f"bad.tar: member '{config_name}'"):
            await source.read_blob(config)
        layer = Descriptor.from_json(manifest["layers"][1], where="test")
        async with source.open_blob(layer) as stream:
            streamed = b"".join([piece async for piece in stream])
        assert len(streamed) == layer.size
        assert sha(streamed) != layer.digest  # the importer's hash catches it


async def test_corrupted_index(tmp_path: Path, layout: Path) -> None:
    copy = tmp_path / "layout"
    shutil.copytree(layout, copy)
    (copy / "index.json").write_text("{not json")
    async with OciArchiveSource(str(gnu_tar(copy, tmp_path / "a.tar"))) as source:
        with pytest.raises(FormatError, match=r"a.tar: index.json: not valid JSON"):
            await source.resolve()


async def test_use_outside_async_with(skopeo_archive: Path) -> None:
    source = OciArchiveSource(str(skopeo_archive))
    with pytest.raises(ImageSourceError, match="outside 'async with'"):
        await source.resolve()


def test_index_rules() -> None:
    digest = "sha256:" + "a" * 64
    entry = {"mediaType": MEDIA_TYPES.OCI_MANIFEST, "digest": digest, "size": 3}
    index = {"manifests": [
        {**entry, "annotations": {REF_NAME: "one"}, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},  # noqa: E501
        {**entry, "digest": "sha256:" + "b" * 64, "platform": {"os": "linux", "architecture": "arm64"}},  # noqa: E501
    ]}  # fmt: skip
    assert [d.digest for d in pick_from_index(index, tag="one", where="x")] == [digest]
    assert pick_from_index(index, digest="sha256:" + "b" * 64, where="x")[0].size == 3
    assert pick_from_index(index, digest="sha256:" + "c" * 64, where="x") == []
    both = pick_from_index(index, where="x")
    assert len(both) == 2
    with pytest.raises(ImageSourceError, match=r"x: no image tagged 'two' \(tags: one\)"):
        pick_from_index(index, tag="two", where="x")
    assert pick_platform(both, Platform("linux", "arm64"), where="x").digest == digest
    assert pick_platform(both, Platform("linux", "arm64", "v8"), where="x").digest == digest
    assert pick_platform(both[1:], Platform("linux", "arm64", "v8"), where="x") == both[1]
    with pytest.raises(ImageSourceError, match="offered: linux/arm64, linux/arm64/v8; tags: one"):
        pick_platform(both, Platform("linux", "arm64", "v7"), where="x")
    with pytest.raises(ImageSourceError, match="is for linux/arm64/v8, not linux/amd64"):
        pick_platform(both[:1], Platform("linux", "amd64"), where="x")
    assert pick_platform(both[:1], Platform("linux", "amd64"), explicit=False, where="x")
    with pytest.raises(ImageSourceError, match="x: the index lists no images"):
        pick_from_index({"manifests": []}, where="x")
    with pytest.raises(FormatError, match="x: no 'manifests' list"):
        pick_from_index({}, where="x")
    with pytest.raises(FormatError, match=r"x manifests\[0\]: unsupported or malformed digest"):
        pick_from_index({"manifests": [{**entry, "digest": "md5:00"}]}, where="x")
