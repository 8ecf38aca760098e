"""The repository's on-disk layout: the one place its names are spelled (pure).

composefs-rs 0.9's layout, relative to the repository directory::

    meta.json                      format metadata (fs-verity on it = secure repository)
    objects/XX/<rest>              content named by its fs-verity digest
    objects/.tmp-object-*          a named temporary object (no O_TMPFILE), after a crash
    streams/<content-id>           -> ../objects/XX/<rest>
    streams/refs/<name...>         -> ../<content-id> (one ``..`` per directory level)
    images/<hex>                   -> ../objects/XX/<rest> (composefs EROFS images)
    images/refs/<name...>          -> ../<hex> (one ``..`` per directory level)
    .tmp-spool-*                   an importer's splitstream spool file, after a crash
    <dir>/.symlink-*               a symlink about to replace a name, after a crash

Every other module asks :class:`~trio_composefs.repository.Repository`, or builds the
repository-relative paths it reports to users with the functions here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ..formats._fsverity import Digest

__all__ = [
    "IMAGES",
    "LAYOUT",
    "META_JSON",
    "OBJECTS",
    "REFS",
    "STREAMS",
    "TMP_OBJECT_PREFIX",
    "TMP_SPOOL_PREFIX",
    "TMP_SYMLINK_PREFIX",
    "image_path",
    "image_ref_path",
    "object_entry_path",
    "object_path",
    "stream_path",
    "stream_ref_path",
]

META_JSON: Final = "meta.json"
OBJECTS: Final = "objects"
STREAMS: Final = "streams"
IMAGES: Final = "images"
REFS: Final = "refs"
#: Every directory the repository owns (never followed when a symlink), parents first.
LAYOUT: Final = (OBJECTS, STREAMS, f"{STREAMS}/{REFS}", IMAGES, f"{IMAGES}/{REFS}")
TMP_OBJECT_PREFIX: Final = ".tmp-object-"
TMP_SYMLINK_PREFIX: Final = ".symlink-"
TMP_SPOOL_PREFIX: Final = ".tmp-spool-"


def object_path(digest: Digest) -> str:
    """``objects/XX/<rest>``: where the object ``digest`` is stored."""
    return f"{OBJECTS}/{digest.object_path()}"


def object_entry_path(rel: str) -> str:
    """``objects/<rel>`` for a name relative to ``objects/`` (``XX/<rest>``, a temporary file)."""
    return f"{OBJECTS}/{rel}"


def stream_path(content_id: str) -> str:
    """``streams/<content-id>``."""
    return f"{STREAMS}/{content_id}"


def stream_ref_path(ref: str) -> str:
    """``streams/refs/<ref>``."""
    return f"{STREAMS}/{REFS}/{ref}"


def image_path(name: str) -> str:
    """``images/<hex>``."""
    return f"{IMAGES}/{name}"


def image_ref_path(ref: str) -> str:
    """``images/refs/<ref>``."""
    return f"{IMAGES}/{REFS}/{ref}"
