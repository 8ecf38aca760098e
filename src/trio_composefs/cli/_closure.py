"""Which tagged images a repository problem affects (for ``fsck``'s advice and ``oci fsck``).

An image's closure is every repository path it needs, each with the part of the
image that needs it: its tag ``streams/refs/oci/<encoded tag>`` (``tag``), the
manifest stream ``streams/oci-manifest-<d>`` and its object (``manifest``), the
config stream (``config``), each layer stream and the file objects it references
(``layer <diff_id>``), and each composefs image with the objects its metacopy
xattrs name (``composefs image <hex>``). The walk follows the splitstreams'
named refs, reads what it can and stops quietly at whatever is damaged or
missing: fsck reports that; here it only has to be attributed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from .._errors import ComposefsError
from ..formats import Digest
from ..formats._splitstream import SplitStreamInfo
from ..importer import layer_content_id
from ..maintenance import FsckProblem
from ..oci import (
    OCI_REF_PREFIX,
    config_content_id,
    encode_tag,
    list_tags,
    manifest_content_id,
)
from ..repository import (
    Repository,
    image_path,
    object_entry_path,
    object_path,
    read_stream_info,
    referenced_objects,
    stream_path,
    stream_ref_path,
)

__all__ = ["ImageClosure", "affected_tags", "image_closure", "tag_closures"]


@attrs.frozen
class ImageClosure:
    """The repository paths one tagged image needs, each mapped to the part that needs it."""

    tag: str
    manifest_digest: str
    parts: Mapping[str, str]


def image_closure(
    repo: Repository, tag: str, manifest_digest: str, streams: Mapping[str, Digest]
) -> ImageClosure:
    """Walk one tagged image (``streams`` is :meth:`Repository.list_streams`)."""
    parts: dict[str, str] = {stream_ref_path(OCI_REF_PREFIX + encode_tag(tag)): "tag"}

    def stream(name: str, part: str, digest: Digest | None) -> SplitStreamInfo | None:
        parts.setdefault(stream_path(name), part)
        digest = digest or streams.get(name)
        if digest is None:
            return None
        parts.setdefault(object_path(digest), part)
        info = read_stream_info(repo, digest)
        if info is not None:
            for obj in info.object_refs:
                parts.setdefault(object_path(obj), part)
        return info

    def image(digest: Digest) -> None:
        part = f"composefs image {digest.hex()}"
        parts.setdefault(image_path(digest.hex()), part)
        parts.setdefault(object_path(digest), part)
        try:
            objects = referenced_objects(repo, digest)
        except (ComposefsError, OSError, ValueError):
            return
        for obj in objects:
            parts.setdefault(object_path(obj), part)

    # Layers first, then the images built from them: an object both use is named by its layer.
    images: list[Digest] = []
    manifest = stream(manifest_content_id(manifest_digest), "manifest", None)
    for name, target in (manifest.named_refs if manifest else {}).items():
        if name.startswith("config:"):
            config_digest = name.removeprefix("config:")
            config = stream(config_content_id(config_digest), "config", target)
            for sub, sub_target in (config.named_refs if config else {}).items():
                if sub.startswith("composefs.image"):
                    images.append(sub_target)
                else:
                    stream(layer_content_id(sub), f"layer {sub}", sub_target)
        else:
            stream(layer_content_id(name), f"layer {name}", target)
    for digest in images:
        image(digest)
    return ImageClosure(tag, manifest_digest, parts)


def tag_closures(repo: Repository, only: str | None = None) -> list[ImageClosure]:
    """The closure of every tagged image (or of the tag ``only``), sorted by tag.

    Empty when the tags or stream names cannot be listed (e.g. ``streams/refs``
    is a symlink, which is never followed): fsck reports that itself.
    """
    try:
        streams = repo.list_streams()
        tags = list_tags(repo)
    except (ComposefsError, OSError):
        return []
    return [
        image_closure(repo, tag, digest, streams)
        for tag, digest in tags
        if only is None or tag == only
    ]


def problem_keys(problem: FsckProblem) -> list[str]:
    """The repository paths a problem is about: its path, and the object it names."""
    keys = [problem.path.rstrip("/")]
    if problem.object_id:
        keys.append(object_entry_path(f"{problem.object_id[:2]}/{problem.object_id[2:]}"))
    return keys


def affected_tags(problem: FsckProblem, closures: Sequence[ImageClosure]) -> list[tuple[str, str]]:
    """``(tag, part)`` for every image whose closure contains what ``problem`` is about."""
    out = []
    keys = problem_keys(problem)
    for closure in closures:
        for key in keys:
            part = closure.parts.get(key)
            if part is not None:
                out.append((closure.tag, part))
                break
    return out
