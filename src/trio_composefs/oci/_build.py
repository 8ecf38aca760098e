"""The composefs images of a pulled OCI image, committed as composefs-rs's pull does.

Blocking (layer L1 work inside the trio shell: call it from a worker thread).

After the layers of a container image are stored, composefs-rs's
``ensure_oci_composefs_erofs`` (composefs-rs-notes §5.1 step 6):

1. builds the merged tree of the layers in config order, then the OCI transform;
2. writes one EROFS per format the repository's ``meta.json`` lists and stores it as
   an object (its fs-verity digest is the *image ID*);
3. (re)writes the config splitstream with the same raw JSON bytes, its named refs
   now ``diff_id -> layer stream`` plus ``composefs.image.v1 -> image`` (V1;
   ``composefs.image`` is V2's name), stream refs in that order;
4. rewrites the manifest splitstream to point at the new config stream;
5. one ``syncfs``, then names: ``streams/oci-config-…``, ``streams/oci-manifest-…``
   (and the tag), ``images/<hex>``.

Nothing is named before the sync, and nothing at all if any step failed. The old
config and manifest splitstream objects become garbage for ``gc``.

We write V1 (byte-identical to C ``mkcomposefs --min-version=1``) and V0; a
repository whose ``meta.json`` asks for composefs-rs's legacy V2 gets a V1 image
(named ``composefs.image.v1``) instead, since V2 is not written here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .._errors import FormatError
from ..formats._chunks import ExternalChunk
from ..formats._fsverity import Digest
from ..formats._splitstream import ContentType, encode_splitstream, iter_chunks
from ..repository._images import store_image
from ..repository._reading import open_splitstream
from ..repository._repository import Repository
from ..repository._writing import ImageName, StreamName, publish_after_sync
from ._image_tree import PartialTree, layers_filesystem

if TYPE_CHECKING:
    from ._stored import StoredImage

__all__ = [
    "IMAGE_REFS",
    "commit_image_streams",
    "config_content_id",
    "ensure_oci_image",
    "image_ref_name",
    "image_refs",
    "image_versions",
    "manifest_content_id",
    "read_external",
    "store_oci_images",
]


def manifest_content_id(digest: str) -> str:
    """``oci-manifest-<digest>``."""
    return f"oci-manifest-{digest}"


def config_content_id(digest: str) -> str:
    """``oci-config-<digest>``."""
    return f"oci-config-{digest}"


IMAGE_REFS = {1: "composefs.image.v1", 2: "composefs.image"}
"""Config named-ref names of the EROFS formats, as composefs-rs names them."""

DEFAULT_IMAGE_REF = IMAGE_REFS[1]


def image_ref_name(version: int) -> str:
    return IMAGE_REFS.get(version, f"composefs.image.v{version}")


def image_versions(repo: Repository) -> list[int]:
    """The EROFS versions to build for this repository (default first, then extras)."""
    formats = repo.metadata.erofs_formats
    wanted = [repo.metadata.erofs_version(), *formats.extra]
    out: list[int] = []
    for version in wanted:
        version = 1 if version == 2 else version
        if version not in out:
            out.append(version)
    return out


def store_oci_images(
    repo: Repository, layers: Sequence[tuple[str, Digest]], *, tree: PartialTree | None = None
) -> list[tuple[str, Digest]]:
    """Build and store (not name) the images of a container image's layers.

    ``tree`` holds the first layers already applied (a pull's, from the entries it
    imported); only the rest are read back from their streams.

    Returns:
        ``(named-ref name, image digest)`` for each format, default first.
    """
    fs = layers_filesystem(repo, layers, tree=tree)
    return [(image_ref_name(v), store_image(repo, fs, version=v)) for v in image_versions(repo)]


def image_refs(named_refs: dict[str, Digest]) -> list[tuple[str, Digest]]:
    """The ``composefs.image…`` entries of a config stream's named refs."""
    return [(k, v) for k, v in named_refs.items() if k.startswith("composefs.image")]


def read_external(
    repo: Repository, content_id: str, content_type: int
) -> tuple[bytes, dict[str, Digest]]:
    """The one external object of a config/manifest/blob stream, and the stream's named refs."""
    with open_splitstream(repo, content_id, content_type=content_type) as (info, data):
        chunks = list(iter_chunks(data, info, repo.object_size))
        refs = dict(info.named_refs)
    if len(chunks) != 1 or not isinstance(chunks[0], ExternalChunk):
        raise FormatError(f"stream {content_id} does not hold exactly one external object")
    return repo.read_object(chunks[0].digest), refs


def _store_external(
    repo: Repository, content_type: int, data: bytes, named_refs: Sequence[tuple[str, Digest]]
) -> Digest:
    obj = repo.store_object(data)
    splitstream = encode_splitstream(
        [ExternalChunk(obj, len(data))],
        algorithm=repo.algorithm,
        content_type=content_type,
        named_refs=dict(named_refs),
    )
    return repo.store_object(splitstream)


def _no_check() -> None:
    pass


def commit_image_streams(
    repo: Repository,
    *,
    config_digest: str,
    config_bytes: bytes | None,
    config_stream: Digest | None,
    manifest_digest: str,
    manifest_bytes: bytes,
    layer_refs: Sequence[tuple[str, Digest]],
    ref: str | None,
    container: bool,
    check_cancelled: Callable[[], None] = _no_check,
    tree: PartialTree | None = None,
) -> tuple[Digest, Digest, list[tuple[str, Digest]]]:
    """Store images, config and manifest streams; sync once; then name them all.

    ``config_stream`` (an already stored config stream) is reused when it already
    names its images, or when the image is not a container image; otherwise the
    config stream is rewritten from its raw bytes with the images added.
    ``check_cancelled`` runs after the sync and before the first name (a trio
    worker thread passes ``trio.from_thread.check_cancelled``). ``tree`` (a pull's
    tree of the layers it imported) spares reading those layers back, if an image
    is built.

    Returns:
        ``(config stream, manifest stream, [(image ref name, image digest)])``.
    """
    images: list[tuple[str, Digest]] = []
    if config_stream is not None:
        raw, named = read_external(repo, config_content_id(config_digest), ContentType.OCI_CONFIG)
        images = image_refs(named)
        if container and (not images or not all(repo.has_object(d) for _, d in images)):
            config_bytes, config_stream = raw, None
    new_config = config_stream is None
    if config_stream is None:
        if config_bytes is None:  # pragma: no cover - callers pass one of the two
            raise ValueError("commit_image_streams needs the config's bytes or its stream")
        images = store_oci_images(repo, layer_refs, tree=tree) if container else []
        config_stream = _store_external(
            repo, ContentType.OCI_CONFIG, config_bytes, [*layer_refs, *images]
        )
    manifest_refs = [(f"config:{config_digest}", config_stream), *layer_refs]
    manifest_stream = _store_external(repo, ContentType.OCI_MANIFEST, manifest_bytes, manifest_refs)
    names: list[StreamName | ImageName] = []
    if new_config:
        names.append(StreamName(config_content_id(config_digest), config_stream))
    names.append(StreamName(manifest_content_id(manifest_digest), manifest_stream, ref))
    names += [ImageName(image) for _name, image in images]
    publish_after_sync(repo, names, check_cancelled=check_cancelled)
    return config_stream, manifest_stream, images


def ensure_oci_image(repo: Repository, stored: StoredImage, *, version: int = 1) -> Digest:
    """The image of a stored container image, building and committing it when absent.

    Images pulled before this project built images (or by a tool that did not) get
    their image now, exactly as a pull would have made it: config and manifest
    streams are rewritten and renamed (tags follow the manifest's name).

    Raises:
        FormatError: an artifact (no filesystem), or damaged streams.
        TreeError: the layers do not make a tree.
    """
    wanted = image_ref_name(version)
    found = dict(stored.images).get(wanted)
    if found is not None and repo.has_object(found):
        repo.publish_image(found)
        return found
    if not stored.is_container:
        raise FormatError(
            f"image {stored.manifest_digest} is an artifact ({stored.config_media_type}),"
            " not a container image: it has no filesystem"
        )
    _config, _manifest, images = commit_image_streams(
        repo,
        config_digest=stored.config_digest,
        config_bytes=stored.config,
        config_stream=None,
        manifest_digest=stored.manifest_digest,
        manifest_bytes=stored.manifest,
        layer_refs=stored.layers,
        ref=None,
        container=True,
    )
    found = dict(images).get(wanted)
    if found is None:
        fs = layers_filesystem(repo, stored.layers)
        found = store_image(repo, fs, version=version)
        publish_after_sync(repo, [ImageName(found)])
    return found
