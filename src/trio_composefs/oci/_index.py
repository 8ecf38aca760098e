"""Finding an image manifest in an OCI layout's ``index.json``: shared by every layout reader.

The rules: a tag names the entries whose ``org.opencontainers.image.ref.name``
annotation equals it; a ``sha256:`` digest names the entry listed with it, or
else any manifest blob of the layout; with neither, every entry is a candidate.
Among several candidates the one for the platform is taken (default: the
current one; arm64 without a variant is v8); a single candidate is taken as
it is, unless the caller asked for a platform it does not declare. When the
choice is an image index (OCI index or Docker manifest list), the same
platform rule picks among its entries.

The pure helpers (:func:`parse_json`, :func:`pick_from_index`,
:func:`pick_platform`, :func:`describe_manifest`, :func:`verify_blob`) do no
I/O; :func:`resolve_from_index` reads nested blobs through callbacks, so that a
directory, a tar archive or anything else can serve them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .._errors import DigestMismatchError, FormatError
from ..formats._json import load_json_object
from ..formats._sha256id import Sha256Id
from ._model import MEDIA_TYPES, Descriptor, ImageSourceError, Platform, ResolvedImage

__all__ = [
    "REF_NAME",
    "describe_manifest",
    "parse_json",
    "pick_from_index",
    "pick_platform",
    "platform_matches",
    "resolve_from_index",
    "verify_blob",
]

#: The annotation that holds a manifest's tag in an OCI layout's ``index.json``.
REF_NAME = "org.opencontainers.image.ref.name"

_INDEX_TYPES = (MEDIA_TYPES.OCI_INDEX, MEDIA_TYPES.DOCKER_LIST)
_MANIFEST_TYPES = (MEDIA_TYPES.OCI_MANIFEST, MEDIA_TYPES.DOCKER_MANIFEST)
_MAX_NESTING = 4


def parse_json(data: bytes, *, where: str) -> dict[str, Any]:
    """Parse a JSON object; ``where`` names it in the :class:`FormatError`."""
    return load_json_object(data, where=where)


def verify_blob(data: bytes, descriptor: Descriptor, *, where: str) -> bytes:
    """Return ``data`` if its size and sha256 are those of ``descriptor``.

    Raises:
        DigestMismatchError: they are not.
    """
    if len(data) != descriptor.size:
        raise DigestMismatchError(
            f"{where}: blob {descriptor.digest} has {len(data)} bytes,"
            f" its descriptor says {descriptor.size}"
        )
    actual = Sha256Id.of(data)
    if actual != descriptor.digest:
        raise DigestMismatchError(
            f"{where}: blob {descriptor.digest} has digest {actual} (corrupted?)"
        )
    return data


def _manifests(index: dict[str, Any], *, where: str) -> list[Descriptor]:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise FormatError(f"{where}: no 'manifests' list")
    return [Descriptor.from_json(e, where=f"{where} manifests[{i}]") for i, e in enumerate(entries)]


def _tags(entries: list[Descriptor]) -> str:
    return ", ".join(
        sorted({d.annotations[REF_NAME] for d in entries if REF_NAME in d.annotations})
    )


def pick_from_index(
    index: dict[str, Any], *, tag: str | None = None, digest: str | None = None, where: str
) -> list[Descriptor]:
    """The entries of a layout's ``index.json`` that ``tag`` or ``digest`` name (all without).

    A digest that the index does not list gives ``[]``: the caller may still
    find the blob by its digest.

    Raises:
        ImageSourceError: no entry has that tag, or the index lists no images.
    """
    entries = _manifests(index, where=where)
    if digest is not None:
        return [d for d in entries if d.digest == digest][:1]
    if tag is not None:
        found = [d for d in entries if d.annotations.get(REF_NAME) == tag]
        if not found:
            raise ImageSourceError(
                f"{where}: no image tagged {tag!r} (tags: {_tags(entries) or 'none'})"
            )
        return found
    if not entries:
        raise ImageSourceError(f"{where}: the index lists no images")
    return entries


def platform_matches(have: Platform | None, want: Platform) -> bool:
    """Same os and architecture; any variant when ``want`` names none (arm64: none = v8)."""
    if have is None or have.os != want.os or have.architecture != want.architecture:
        return False
    if want.variant is None or have.variant == want.variant:
        return True
    return want.architecture == "arm64" and {have.variant, want.variant} <= {None, "v8"}


def pick_platform(
    candidates: list[Descriptor], platform: Platform, *, explicit: bool = True, where: str
) -> Descriptor:
    """The candidate for ``platform``.

    Among several, the first whose platform matches; a single candidate is taken
    as it is unless it declares another platform and ``explicit`` is set (the
    user asked for ``platform``, rather than it being the default).

    Raises:
        ImageSourceError: no candidate fits.
    """
    if len(candidates) == 1:
        (only,) = candidates
        if explicit and only.platform is not None and not platform_matches(only.platform, platform):
            raise ImageSourceError(f"{where}: the image is for {only.platform}, not {platform}")
        return only
    for d in candidates:
        if platform_matches(d.platform, platform):
            return d
    offered = sorted({str(d.platform) for d in candidates if d.platform is not None})
    raise ImageSourceError(
        f"{where}: no image for platform {platform}"
        f" (offered: {', '.join(offered) or 'none declared'}"
        + (f"; tags: {_tags(candidates)})" if _tags(candidates) else ")")
    )


def describe_manifest(digest: str, data: bytes, *, where: str) -> Descriptor:
    """A descriptor for a manifest or index blob known only by its digest (and bytes).

    Raises:
        DigestMismatchError: ``data`` is not what ``digest`` names.
        ImageSourceError: it is not a JSON manifest or index.
    """
    descriptor = Descriptor(MEDIA_TYPES.OCI_MANIFEST, digest, len(data))
    verify_blob(data, descriptor, where=where)
    try:
        obj = parse_json(data, where=where)
    except FormatError:
        raise ImageSourceError(f"{where}: {digest} is not a JSON manifest") from None
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str):  # optional in OCI: tell them apart by their fields
        if "manifests" in obj:
            media_type = MEDIA_TYPES.OCI_INDEX
        elif "config" in obj and "layers" in obj:
            media_type = MEDIA_TYPES.OCI_MANIFEST
        else:
            raise ImageSourceError(f"{where}: {digest} is not a manifest or an index")
    return Descriptor(media_type, digest, len(data))


async def resolve_from_index(
    index_json: bytes,
    read_blob: Callable[[Descriptor], Awaitable[bytes]],
    *,
    tag: str | None = None,
    digest: str | None = None,
    platform: Platform | None = None,
    where: str,
    find_blob: Callable[[str], Awaitable[Descriptor | None]] | None = None,
) -> ResolvedImage:
    """Resolve a layout's ``index.json`` to an image manifest.

    Args:
        index_json: the bytes of the layout's ``index.json``.
        read_blob: returns a blob's bytes, already checked against the descriptor.
        tag: select by ``org.opencontainers.image.ref.name``.
        digest: select by manifest digest (listed in the index, or else found
            by ``find_blob``).
        platform: which entry of an image index; default :meth:`Platform.current`.
        where: names the layout in error messages.
        find_blob: a descriptor for a blob the index does not list
            (see :func:`describe_manifest`), ``None`` if there is no such blob.

    Raises:
        ImageSourceError: no such image or platform.
        FormatError: malformed JSON or descriptors.
    """
    top = parse_json(index_json, where=f"{where}: index.json")
    candidates = pick_from_index(top, tag=tag, digest=digest, where=f"{where}: index.json")
    if digest is not None and not candidates:
        found = await find_blob(digest) if find_blob is not None else None
        if found is None:
            raise ImageSourceError(f"{where}: no manifest {digest}")
        candidates = [found]
    want = platform or Platform.current()
    for _ in range(_MAX_NESTING):
        chosen = pick_platform(candidates, want, explicit=platform is not None, where=where)
        data = await read_blob(chosen)
        if chosen.media_type in _MANIFEST_TYPES:
            return ResolvedImage(data, chosen.digest, chosen.media_type)
        if chosen.media_type not in _INDEX_TYPES:
            raise ImageSourceError(
                f"{where}: {chosen.digest} is a {chosen.media_type!r}, not an image manifest"
            )
        nested = parse_json(data, where=f"{where}: index {chosen.digest}")
        candidates = _manifests(nested, where=f"{where}: index {chosen.digest}")
        if not candidates:
            raise ImageSourceError(f"{where}: index {chosen.digest} is empty")
    raise FormatError(f"{where}: image indexes nested more than {_MAX_NESTING} deep")
