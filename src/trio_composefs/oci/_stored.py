"""Images stored in a repository: open by tag or digest, list, tag and untag.

Blocking (layer L1 work inside the trio shell: call it from a worker thread).
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from .._errors import ComposefsError, FormatError, ObjectNotFoundError
from ..formats._fsverity import Digest
from ..formats._splitstream import ContentType
from ..repository._repository import Repository
from ._build import (
    DEFAULT_IMAGE_REF,
    config_content_id,
    image_refs,
    manifest_content_id,
    read_external,
)
from ._manifest import _IMAGE_CONFIG_TYPES, _check_bytes, _diff_ids, _json, _parse_manifest
from ._names import OCI_REF_PREFIX, _check_digest, _check_tag, decode_tag

__all__ = [
    "ImageInfo",
    "StoredImage",
    "list_images",
    "list_tags",
    "open_image",
    "resolve_tag",
    "tag_image",
    "untag_image",
]


@attrs.frozen
class StoredImage:
    """An image as stored in the repository: raw manifest and config, their streams, layers."""

    manifest_digest: str
    manifest_stream: Digest
    manifest: bytes
    config_digest: str
    config_stream: Digest
    config: bytes
    config_media_type: str
    layers: tuple[tuple[str, Digest], ...]
    """``(diff_id, layer stream)`` in config order."""
    images: tuple[tuple[str, Digest], ...] = ()
    """The config's ``composefs.image…`` named refs: ``(name, image ID)``."""

    @property
    def image(self) -> Digest | None:
        """The image ID of the default (V1) composefs image, if the config names one."""
        return dict(self.images).get(DEFAULT_IMAGE_REF)

    @property
    def is_container(self) -> bool:
        """A container image (not an artifact): its config is an image config."""
        return self.config_media_type in _IMAGE_CONFIG_TYPES

    def config_json(self) -> dict[str, Any]:
        """The parsed config (empty for an artifact whose config is not JSON)."""
        try:
            return _json(self.config, "config")
        except FormatError:
            return {}


def open_image(repo: Repository, image: str) -> StoredImage:
    """Open a stored image by tag, ``@sha256:...`` or ``sha256:...`` (manifest digest).

    Raises:
        ObjectNotFoundError: no such tag or image.
        DigestMismatchError: a manifest opened by digest that does not match it.
    """
    if image.startswith("@"):
        return _open_by_digest(repo, _check_digest(image[1:]))
    try:
        digest = resolve_tag(repo, image)
    except ObjectNotFoundError:
        if image.startswith("sha256:"):
            return _open_by_digest(repo, _check_digest(image))
        raise
    return _open_by_digest(repo, digest, verified=True)


def _open_by_digest(repo: Repository, digest: str, *, verified: bool = False) -> StoredImage:
    cid = manifest_content_id(digest)
    stream = repo.has_stream(cid)
    if stream is None:
        raise ObjectNotFoundError(f"image {digest} is not in {repo.path}")
    manifest, named = read_external(repo, cid, ContentType.OCI_MANIFEST)
    if not verified:
        _check_bytes(manifest, digest, f"stored manifest {digest}")
    config_desc, layer_descs = _parse_manifest(manifest, f"stored manifest {digest}")
    config_stream = named.get(f"config:{config_desc.digest}")
    if config_stream is None:
        raise FormatError(f"stored manifest {digest} has no config reference")
    config, config_named = read_external(
        repo, config_content_id(config_desc.digest), ContentType.OCI_CONFIG
    )
    if config_desc.media_type in _IMAGE_CONFIG_TYPES:
        ids = _diff_ids(config_desc, config, layer_descs, f"stored image {digest}")
        layers = tuple((d, config_named[d]) for d in ids if d in config_named)
    else:
        layers = tuple((d.digest, named[d.digest]) for d in layer_descs if d.digest in named)
    return StoredImage(
        manifest_digest=digest,
        manifest_stream=stream,
        manifest=manifest,
        config_digest=config_desc.digest,
        config_stream=config_stream,
        config=config,
        config_media_type=config_desc.media_type,
        layers=layers,
        images=tuple(image_refs(config_named)),
    )


def resolve_tag(repo: Repository, name: str) -> str:
    """The manifest digest a tag points at.

    Raises:
        ObjectNotFoundError: no such tag.
    """
    ref = _check_tag(name)
    try:
        target = os.readlink(f"streams/refs/{ref}", dir_fd=repo.dirfd)
    except FileNotFoundError:
        raise ObjectNotFoundError(f"no image tagged {name!r} in {repo.path}") from None
    base = target.rsplit("/", 1)[-1]
    if not base.startswith("oci-manifest-"):
        raise FormatError(f"tag {name!r} points at {target!r}, not a manifest stream")
    return _check_digest(base[len("oci-manifest-") :])


def list_tags(repo: Repository) -> list[tuple[str, str]]:
    """``(tag, manifest digest)`` for every tag, sorted by tag."""
    out = []
    for ref, target in repo.list_stream_refs().items():
        if not ref.startswith(OCI_REF_PREFIX) or "/" in ref[len(OCI_REF_PREFIX) :]:
            continue
        if target.startswith("oci-manifest-"):
            out.append((decode_tag(ref[len(OCI_REF_PREFIX) :]), target[len("oci-manifest-") :]))
    return sorted(out)


def tag_image(repo: Repository, manifest_digest: str, name: str) -> None:
    """Point tag ``name`` at a stored manifest (replacing the tag if it exists).

    Raises:
        ObjectNotFoundError: the manifest is not stored.
    """
    ref = _check_tag(name)
    digest = _check_digest(manifest_digest.removeprefix("@"))
    cid = manifest_content_id(digest)
    stream = repo.has_stream(cid)
    if stream is None:
        raise ObjectNotFoundError(f"image {digest} is not in {repo.path}")
    repo.publish_stream(cid, stream, ref, sync=False)


def untag_image(repo: Repository, name: str) -> None:
    """Remove a tag (the image stays until gc finds it unreferenced).

    Raises:
        ObjectNotFoundError: no such tag.
    """
    ref = _check_tag(name)
    repo.ensure_writable()
    try:
        os.unlink(f"streams/refs/{ref}", dir_fd=repo.dirfd)
    except FileNotFoundError:
        raise ObjectNotFoundError(f"no image tagged {name!r} in {repo.path}") from None


@attrs.frozen
class ImageInfo:
    """One line of ``oci images`` (the fields of cfsctl's JSON)."""

    name: str
    manifest_digest: str
    is_container: bool
    architecture: str
    os: str
    created: str | None
    layer_count: int
    referrer_count: int = 0

    def to_json(self) -> dict[str, Any]:
        """As cfsctl's ``oci images --json`` spells it."""
        return attrs.asdict(self)


def list_images(repo: Repository) -> list[ImageInfo]:
    """Every tagged image (unreadable ones are skipped)."""
    out = []
    for name, digest in list_tags(repo):
        try:
            image = _open_by_digest(repo, digest, verified=True)
        except ComposefsError:
            continue
        config = image.config_json() if image.is_container else {}
        created = config.get("created")
        _, layer_descs = _parse_manifest(image.manifest, digest)
        out.append(
            ImageInfo(
                name=name,
                manifest_digest=digest,
                is_container=image.is_container,
                architecture=str(config.get("architecture", "")) if image.is_container else "",
                os=str(config.get("os", "")) if image.is_container else "",
                created=created if isinstance(created, str) else None,
                layer_count=len(layer_descs),
            )
        )
    return out
