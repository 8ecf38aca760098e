"""Manifest and config JSON of a pulled or stored image: parsing and digest checks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from .._errors import ComposefsError, DigestMismatchError, FormatError
from ._index import parse_json
from ._model import MEDIA_TYPES, Descriptor
from ._names import _check_digest

_IMAGE_CONFIG_TYPES: Final = (MEDIA_TYPES.OCI_CONFIG, MEDIA_TYPES.DOCKER_CONFIG)


def _json(data: bytes, what: str) -> dict[str, Any]:
    return parse_json(data, where=what)


def _parse_manifest(data: bytes, where: str) -> tuple[Descriptor, list[Descriptor]]:
    obj = _json(data, f"{where}: the manifest")
    media_type = obj.get("mediaType")
    if media_type is not None and media_type not in (
        MEDIA_TYPES.OCI_MANIFEST,
        MEDIA_TYPES.DOCKER_MANIFEST,
    ):
        raise FormatError(f"{where}: not an image manifest (mediaType {media_type!r})")
    if "config" not in obj or not isinstance(obj.get("layers", []), list):
        raise FormatError(f"{where}: the manifest has no config or no layers list")
    config = Descriptor.from_json(obj["config"], where=f"{where}: manifest config")
    layers = [
        Descriptor.from_json(layer, where=f"{where}: manifest layer {i}")
        for i, layer in enumerate(obj.get("layers", []))
    ]
    return config, layers


def _diff_ids(
    config: Descriptor, data: bytes, layers: Sequence[Descriptor], where: str
) -> list[str]:
    """The config's ``rootfs.diff_ids`` (an artifact's layers use their blob digests)."""
    if config.media_type not in _IMAGE_CONFIG_TYPES:
        return [layer.digest for layer in layers]
    obj = _json(data, f"{where}: config {config.digest}")
    rootfs = obj.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
        raise FormatError(f"{where}: config {config.digest} has no rootfs.diff_ids list")
    for d in ids:
        try:
            _check_digest(d)
        except ComposefsError:
            raise FormatError(f"{where}: config {config.digest}: bad diff_id {d!r}") from None
    if len(ids) != len(layers):
        raise FormatError(
            f"{where}: the manifest has {len(layers)} layers but config {config.digest}"
            f" lists {len(ids)} diff_ids"
        )
    return list(ids)


def _check_bytes(data: bytes, digest: str, what: str) -> None:
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DigestMismatchError(f"{what}: its sha256 is {actual}, expected {digest}")
