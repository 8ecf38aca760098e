"""The built-in sample layout: reproducible, and read right by skopeo, umoci, zstd and gzip."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from trio_composefs.oci import MEDIA_TYPES, Platform
from trio_composefs.testing import sample_layers, sample_layout_files, write_sample_layout


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "layout"
    assert write_sample_layout(path) == f"oci:{path}:latest"
    return path


def blob(layout: Path, digest: str) -> bytes:
    algo, _, hexd = digest.partition(":")
    assert algo == "sha256"
    data = (layout / "blobs" / "sha256" / hexd).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexd
    return data


def manifest_of(layout: Path) -> dict[str, object]:
    index = json.loads((layout / "index.json").read_bytes())
    (entry,) = index["manifests"]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "latest"}
    assert entry["mediaType"] == MEDIA_TYPES.OCI_MANIFEST
    data = blob(layout, entry["digest"])
    assert len(data) == entry["size"]
    manifest: dict[str, object] = json.loads(data)
    return manifest


def test_writing_twice_gives_the_same_bytes(layout: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_sample_layout(again)
    assert tree(again) == tree(layout)
    assert sample_layout_files() == sample_layout_files()
    # and nothing but the layout: no temporary files left behind
    assert set(tree(layout)) == set(sample_layout_files())


def test_layout_structure(layout: Path) -> None:
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    manifest = manifest_of(layout)
    layers = manifest["layers"]
    assert isinstance(layers, list)
    assert [entry["mediaType"] for entry in layers] == [
        MEDIA_TYPES.OCI_LAYER_GZIP,
        MEDIA_TYPES.OCI_LAYER_ZSTD,
        MEDIA_TYPES.OCI_LAYER,
    ]
    config_desc = manifest["config"]
    assert isinstance(config_desc, dict)
    assert config_desc["mediaType"] == MEDIA_TYPES.OCI_CONFIG
    config = json.loads(blob(layout, config_desc["digest"]))
    assert config["rootfs"] == {
        "type": "layers",
        "diff_ids": [layer.diff_id for layer in sample_layers()],
    }
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["created"] == "2023-11-14T22:13:20Z"


def test_layers_decompress_to_the_sample_tars_with_real_tools(layout: Path) -> None:
    """gzip and zstd (the command-line tools) give back each sample layer's tar."""
    manifest = manifest_of(layout)
    layers = manifest["layers"]
    assert isinstance(layers, list)
    tools = {
        MEDIA_TYPES.OCI_LAYER_GZIP: [need("gzip"), "-dc"],
        MEDIA_TYPES.OCI_LAYER_ZSTD: [need("zstd"), "-dcq"],
    }
    for entry, sample in zip(layers, sample_layers(), strict=True):
        stored = blob(layout, entry["digest"])
        assert len(stored) == entry["size"]
        command = tools.get(entry["mediaType"])
        plain = stored if command is None else subprocess.check_output(command, input=stored)
        assert plain == sample.tar


def test_platform_is_configurable(tmp_path: Path) -> None:
    write_sample_layout(tmp_path, tag="arm", platform=Platform("linux", "arm64", "v8"))
    index = json.loads((tmp_path / "index.json").read_bytes())
    manifest = json.loads(blob(tmp_path, index["manifests"][0]["digest"]))
    config = json.loads(blob(tmp_path, manifest["config"]["digest"]))
    assert (config["os"], config["architecture"], config["variant"]) == ("linux", "arm64", "v8")
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "arm"


def test_skopeo_inspects_it(layout: Path) -> None:
    skopeo = need("skopeo")
    out = json.loads(subprocess.check_output([skopeo, "inspect", f"oci:{layout}:latest"]))
    layers = manifest_of(layout)["layers"]
    assert isinstance(layers, list)
    assert out["Layers"] == [entry["digest"] for entry in layers]
    assert (out["Os"], out["Architecture"]) == ("linux", "amd64")
    raw = subprocess.check_output([skopeo, "inspect", "--raw", f"oci:{layout}:latest"])
    index = json.loads((layout / "index.json").read_bytes())
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == index["manifests"][0]["digest"]


def test_umoci_reads_it(layout: Path) -> None:
    umoci = need("umoci")
    out = subprocess.run(
        [umoci, "stat", "--json", "--image", f"{layout}:latest"],
        capture_output=True,
        check=True,
    ).stdout
    history = json.loads(out)["history"]
    assert [h["created_by"] for h in history] == [
        "trio-composefs sample: " + layer.description for layer in sample_layers()
    ]


def test_umoci_unpacks_it_after_skopeo_recompresses(layout: Path, tmp_path: Path) -> None:
    """skopeo decodes the gzip and zstd layers (recompressing them for umoci 0.4, which has
    no zstd); umoci applies them, whiteouts included: the tree is the sample's."""
    skopeo, umoci = need("skopeo"), need("umoci")
    gz = tmp_path / "gz"
    subprocess.run(
        [skopeo, "copy", "-q", "--dest-compress", "--dest-compress-format", "gzip",
         f"oci:{layout}:latest", f"oci:{gz}:latest"],
        check=True,
    )  # fmt: skip
    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--rootless", "--image", f"{gz}:latest", str(bundle)],
        check=True,
        capture_output=True,
    )
    root = bundle / "rootfs"
    assert (root / "usr/bin/hello").read_bytes().startswith(b"#!/bin/sh\n")
    assert os.readlink(root / "usr/lib/libsample.so.1") == "libsample.so.1.0"
    assert os.stat(root / "usr/bin/hello").st_ino == os.stat(root / "usr/bin/hello-again").st_ino
    assert not (root / "usr/share/doc/obsolete.txt").exists()  # whiteout
    assert sorted(os.listdir(root / "etc/old")) == ["config"]  # opaque dir
    assert len((root / "etc/old/config").read_bytes()) == 5000  # the upper layer's
    assert (root / "opt/app/data.bin").stat().st_size == 1 << 20
    for size in (63, 64, 65):
        assert (root / f"usr/share/doc/{size}-bytes").stat().st_size == size
