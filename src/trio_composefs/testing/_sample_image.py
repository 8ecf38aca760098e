"""The built-in sample image as an OCI image layout directory, byte for byte reproducible.

The three layers of :func:`trio_composefs.testing.sample_layers` are stored
gzip-compressed (level 6, mtime 0), zstd-compressed (level 3) and plain, so an
import of the sample exercises every layer encoding. The config's timestamps
are fixed and every JSON document is written with sorted keys and no spaces:
writing the layout twice gives the same bytes (with the same zlib and zstd
libraries).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from typing import Any

import zstandard

from ..oci._index import REF_NAME
from ..oci._model import MEDIA_TYPES, Platform
from ._sample import sample_layers

__all__ = ["SAMPLE_PLATFORM", "sample_layout_files", "write_sample_layout"]

#: The platform the sample's config names (its files run anywhere: a shell script and data).
SAMPLE_PLATFORM = Platform("linux", "amd64")

_CREATED = "2023-11-14T22:13:20Z"  # sample.py's mtime, 1_700_000_000


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def sample_layout_files(
    *, tag: str = "latest", platform: Platform = SAMPLE_PLATFORM
) -> dict[str, bytes]:
    """Every file of the sample layout: relative path → bytes (pure computation)."""
    layers = sample_layers()
    blobs = [
        (MEDIA_TYPES.OCI_LAYER_GZIP, gzip.compress(layers[0].tar, compresslevel=6, mtime=0)),
        (MEDIA_TYPES.OCI_LAYER_ZSTD, zstandard.ZstdCompressor(level=3).compress(layers[1].tar)),
        (MEDIA_TYPES.OCI_LAYER, layers[2].tar),
    ]
    config: dict[str, Any] = {
        "created": _CREATED,
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/usr/bin/hello"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": _CREATED, "created_by": "trio-composefs sample: " + layer.description}
            for layer in layers
        ],
    }
    if platform.variant:
        config["variant"] = platform.variant
    config_bytes = _json(config)
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPES.OCI_MANIFEST,
            "config": _descriptor(MEDIA_TYPES.OCI_CONFIG, config_bytes),
            "layers": [_descriptor(media_type, data) for media_type, data in blobs],
        }
    )
    manifest_descriptor = _descriptor(MEDIA_TYPES.OCI_MANIFEST, manifest)
    manifest_descriptor["annotations"] = {REF_NAME: tag}
    index = _json(
        {"schemaVersion": 2, "mediaType": MEDIA_TYPES.OCI_INDEX, "manifests": [manifest_descriptor]}
    )
    files = {}  # blobs first: whoever writes in this order never publishes a dangling index
    for data in (*(blob for _, blob in blobs), config_bytes, manifest):
        files["blobs/sha256/" + hashlib.sha256(data).hexdigest()] = data
    files["oci-layout"] = _json({"imageLayoutVersion": "1.0.0"})
    files["index.json"] = index
    return files


def write_sample_layout(
    path: str | os.PathLike[str], *, tag: str = "latest", platform: Platform = SAMPLE_PLATFORM
) -> str:
    """Write the sample image as an OCI layout at ``path`` (blocking); return its reference.

    The directory is created if needed; an existing ``index.json`` there is
    replaced, so the layout holds the sample alone under ``tag``. Each file is
    written to a temporary name and renamed, so no half-written file is ever
    visible.
    """
    root = os.fspath(path)
    for rel, data in sample_layout_files(tag=tag, platform=platform).items():
        dest = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    return f"oci:{root}:{tag}"
