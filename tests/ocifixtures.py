"""Build OCI image layouts in a test's tmp_path, from tar layers (plain, gzip or zstd)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import attrs
import zstandard

from trio_composefs.oci import MEDIA_TYPES, Platform

LAYER_TYPES = {
    None: MEDIA_TYPES.OCI_LAYER,
    "gzip": MEDIA_TYPES.OCI_LAYER_GZIP,
    "zstd": MEDIA_TYPES.OCI_LAYER_ZSTD,
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str | None) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def make_tar(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@attrs.frozen
class BuiltImage:
    manifest_digest: str
    manifest_size: int
    config_digest: str
    diff_ids: tuple[str, ...]
    layer_digests: tuple[str, ...]
    tars: tuple[bytes, ...]

    def descriptor(
        self, platform: Platform | None = None, tag: str | None = None
    ) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": MEDIA_TYPES.OCI_MANIFEST,
            "digest": self.manifest_digest,
            "size": self.manifest_size,
        }
        if platform is not None:
            d["platform"] = {"os": platform.os, "architecture": platform.architecture}
            if platform.variant:
                d["platform"]["variant"] = platform.variant
        if tag is not None:
            d["annotations"] = {"org.opencontainers.image.ref.name": tag}
        return d


class Layout:
    """An OCI layout directory under construction; call :meth:`write_index` when done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict[str, Any]] = []

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def add_blob(self, data: bytes) -> tuple[str, int]:
        digest = sha256(data)
        self.blob_path(digest).write_bytes(data)
        return digest, len(data)

    def add_image(
        self,
        tars: list[bytes],
        *,
        compression: str | list[str | None] | None = None,
        config: dict[str, Any] | None = None,
        config_bytes: bytes | None = None,
        diff_ids: list[str] | None = None,
        tag: str | None = None,
        platform: Platform | None = None,
        index: bool = True,
    ) -> BuiltImage:
        comps = compression if isinstance(compression, list) else [compression] * len(tars)
        layers: list[dict[str, Any]] = []
        for tar, comp in zip(tars, comps, strict=True):
            digest, size = self.add_blob(compress(tar, comp))
            layers.append({"mediaType": LAYER_TYPES[comp], "digest": digest, "size": size})
        ids = diff_ids if diff_ids is not None else [sha256(t) for t in tars]
        if config_bytes is None:
            cfg = dict(config or {"architecture": "amd64", "os": "linux"})
            cfg["rootfs"] = {"type": "layers", "diff_ids": ids}
            config_bytes = compact(cfg)
        cdigest, csize = self.add_blob(config_bytes)
        manifest = compact(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPES.OCI_MANIFEST,
                "config": {"mediaType": MEDIA_TYPES.OCI_CONFIG, "digest": cdigest, "size": csize},
                "layers": layers,
            }
        )
        mdigest, msize = self.add_blob(manifest)
        image = BuiltImage(
            mdigest,
            msize,
            cdigest,
            tuple(ids),
            tuple(layer["digest"] for layer in layers),
            tuple(tars),
        )
        if index:
            self.index.append(image.descriptor(platform, tag))
        return image

    def add_index(self, entries: list[dict[str, Any]], *, tag: str | None = None) -> str:
        data = compact(
            {"schemaVersion": 2, "mediaType": MEDIA_TYPES.OCI_INDEX, "manifests": entries}
        )
        digest, size = self.add_blob(data)
        entry: dict[str, Any] = {"mediaType": MEDIA_TYPES.OCI_INDEX, "digest": digest, "size": size}
        if tag:
            entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.index.append(entry)
        return digest

    def write_index(self) -> Path:
        (self.path / "index.json").write_bytes(
            compact({"schemaVersion": 2, "manifests": self.index})
        )
        return self.path


def umoci_layout(tmp: Path, files: dict[str, bytes], tag: str = "latest") -> Path | None:
    """A layout made by umoci: a new image, unpacked, files added, repacked (None: no umoci)."""
    umoci = shutil.which("umoci")
    if umoci is None:
        return None
    layout = tmp / "umoci-layout"
    bundle = tmp / "umoci-bundle"

    def run(*args: str) -> None:
        subprocess.run([umoci, *args], check=True, capture_output=True)

    run("init", "--layout", str(layout))
    run("new", "--image", f"{layout}:{tag}")
    run("unpack", "--image", f"{layout}:{tag}", str(bundle))
    for name, data in files.items():
        target = bundle / "rootfs" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    run("repack", "--image", f"{layout}:{tag}", str(bundle))
    # a second layer: unpack the new image again (a bundle remembers what it came from)
    bundle2 = tmp / "umoci-bundle2"
    run("unpack", "--image", f"{layout}:{tag}", str(bundle2))
    (bundle2 / "rootfs" / "second.bin").write_bytes(bytes(range(256)) * 100)
    run("repack", "--image", f"{layout}:{tag}", str(bundle2))
    return layout
