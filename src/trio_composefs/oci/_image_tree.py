"""The filesystem tree of a stored OCI image (composefs-rs ``create_filesystem``).

Blocking I/O (layer L1: no trio; async callers run it in a worker thread). The layers
are read in config order from the layer splitstreams the config splitstream names (by
their fs-verity digest, as upstream does when it has the config's verity, so no
stream name is trusted), their entries applied by
:class:`~trio_composefs.fs.TreeBuilder`, then the OCI transform.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import attrs

from .._errors import FormatError
from ..formats._fsverity import Digest
from ..formats._splitstream import ContentType, iter_chunks, parse_splitstream
from ..formats._tarentries import TarEntry, iter_entries
from ..fs import FileSystem, TreeBuilder, transform_for_oci
from ..repository._repository import Repository

if TYPE_CHECKING:
    from ._stored import StoredImage

__all__ = ["PartialTree", "image_filesystem", "layer_entries", "layers_filesystem"]


@attrs.define(eq=False)
class PartialTree:
    """A :class:`TreeBuilder` with the first ``layers`` layers of an image applied.

    A pull makes one from the entries it imported (``oci/_tree_tap.py``), so that
    :func:`layers_filesystem` reads back only the layers after those. It is consumed
    by the build that takes it (the OCI transform changes its tree in place).
    """

    builder: TreeBuilder
    layers: int


def layer_entries(repo: Repository, stream: Digest, *, name: str = "layer") -> Iterator[TarEntry]:
    """The tar entries of the layer splitstream object ``stream`` (an ``ocilayer``)."""
    fd = repo.open_object(stream)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            try:
                info = parse_splitstream(
                    data, algorithm=repo.algorithm, content_type=ContentType.OCI_LAYER
                )
            except FormatError as e:
                raise type(e)(f"{name} (object {stream.object_path()}): {e}") from None
            yield from iter_entries(iter_chunks(data, info, repo.object_size))
    finally:
        os.close(fd)


def image_filesystem(
    repo: Repository,
    image: StoredImage,
    *,
    keep_user_xattrs: bool = False,
    transform: bool = True,
) -> FileSystem:
    """The merged tree of ``image`` (from :func:`~trio_composefs.oci.open_image`).

    Args:
        keep_user_xattrs: keep ``user.*`` xattrs too (upstream ``KeepUserXattrs``).
        transform: apply :func:`~trio_composefs.fs.transform_for_oci` (upstream always
            does; ``False`` gives the raw merge, for tests and debugging).

    Raises:
        TreeError: a layer does not apply, or the image has no ``/usr`` directory.
        FormatError: the image is an artifact, or a layer stream is damaged.
    """
    if not image.is_container:
        raise FormatError(
            f"image {image.manifest_digest} is an artifact ({image.config_media_type}),"
            " not a container image: it has no filesystem"
        )
    diff_ids = image.config_json().get("rootfs", {}).get("diff_ids", [])
    named = [diff_id for diff_id, _stream in image.layers]
    if named != diff_ids:
        missing = [d for d in diff_ids if d not in named]
        raise FormatError(
            f"image {image.manifest_digest}: the config stream names no layer stream for"
            f" {', '.join(missing) or 'some diff_ids'}"
        )
    return layers_filesystem(
        repo, image.layers, keep_user_xattrs=keep_user_xattrs, transform=transform
    )


def layers_filesystem(
    repo: Repository,
    layers: Sequence[tuple[str, Digest]],
    *,
    keep_user_xattrs: bool = False,
    transform: bool = True,
    tree: PartialTree | None = None,
) -> FileSystem:
    """The merged tree of ``(diff_id, layer stream)`` pairs, applied in the given order.

    With ``tree``, its first ``tree.layers`` layers are already applied there: only
    the others are read back from the repository, onto ``tree.builder``.
    """
    if tree is not None and not 0 <= tree.layers <= len(layers):
        raise ValueError(f"a tree of {tree.layers} layers for an image of {len(layers)}")
    builder = tree.builder if tree is not None else TreeBuilder()
    for diff_id, stream in layers[tree.layers if tree is not None else 0 :]:
        builder.add_layer(layer_entries(repo, stream, name=f"layer {diff_id}"), name=diff_id)
    if transform:
        transform_for_oci(builder.filesystem, keep_user_xattrs=keep_user_xattrs)
    return builder.filesystem
