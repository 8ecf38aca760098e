"""``meta.json``: the repository metadata file, as composefs-rs writes and reads it.

Sans-IO. The encoding matches serde_json's pretty printer (2-space indent,
``": "`` separators, ``[]`` for an empty list) plus a trailing newline, so a
repository we create is byte-identical to one made by ``cfsctl init``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from .._errors import FormatError, RepositoryError
from ..formats._fsverity import Algorithm
from ..formats._json import load_json

__all__ = [
    "FORMAT_VERSION",
    "MAX_META_BYTES",
    "KNOWN_COMPAT",
    "KNOWN_INCOMPAT",
    "KNOWN_RO_COMPAT",
    "ErofsFormats",
    "FeatureFlags",
    "RepoMetadata",
]

FORMAT_VERSION = 1
V1_EROFS = "v1_erofs"
KNOWN_COMPAT: frozenset[str] = frozenset()
KNOWN_RO_COMPAT: frozenset[str] = frozenset({V1_EROFS})
KNOWN_INCOMPAT: frozenset[str] = frozenset()
EROFS_VERSIONS = (0, 1, 2)
#: The largest ``meta.json`` read (ours is about 200 bytes).
MAX_META_BYTES = 16 * 1024


@attrs.frozen
class FeatureFlags:
    """The three tiers of feature flags (ext4 style)."""

    compatible: tuple[str, ...] = ()
    read_only_compatible: tuple[str, ...] = ()
    incompatible: tuple[str, ...] = ()

    def unknown_incompatible(self) -> list[str]:
        """Flags that forbid opening the repository at all."""
        return [f for f in self.incompatible if f not in KNOWN_INCOMPAT]

    def unknown_read_only_compatible(self) -> list[str]:
        """Flags that allow reading but forbid writing."""
        return [f for f in self.read_only_compatible if f not in KNOWN_RO_COMPAT]


@attrs.frozen
class ErofsFormats:
    """``erofs_formats``: the default EROFS format version and any extra ones."""

    default: int = 1
    extra: tuple[int, ...] = ()  # sorted, unique, as a Rust BTreeSet


LEGACY_EROFS = ErofsFormats(2)  # what an absent ``erofs_formats`` means


@attrs.frozen
class RepoMetadata:
    """The parsed contents of ``meta.json``.

    Build the metadata of a new repository with :meth:`new`, parse with
    :meth:`from_json`, encode with :meth:`to_json`.
    """

    version: int
    algorithm: Algorithm
    features: FeatureFlags = FeatureFlags()
    erofs_formats: ErofsFormats = LEGACY_EROFS

    @classmethod
    def new(cls, algorithm: Algorithm, erofs: ErofsFormats = ErofsFormats(1)) -> RepoMetadata:
        """Metadata for a new repository, exactly as ``cfsctl init`` makes it."""
        ro = (V1_EROFS,) if erofs.default == 1 else ()
        return cls(FORMAT_VERSION, algorithm, FeatureFlags(read_only_compatible=ro), erofs)

    def erofs_version(self) -> int:
        """The effective default EROFS format version (legacy ``v1_erofs`` flag honoured)."""
        if self.erofs_formats != LEGACY_EROFS:
            return self.erofs_formats.default
        return 1 if V1_EROFS in self.features.read_only_compatible else 2

    def to_json(self) -> bytes:
        """The exact bytes composefs-rs writes."""
        formats: dict[str, Any] = {"default": self.erofs_formats.default}
        if self.erofs_formats.extra:
            formats["extra"] = list(self.erofs_formats.extra)
        doc = {
            "version": self.version,
            "algorithm": self.algorithm.value,
            "features": {
                "compatible": list(self.features.compatible),
                "read-only-compatible": list(self.features.read_only_compatible),
                "incompatible": list(self.features.incompatible),
            },
            "erofs_formats": formats,
        }
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "meta.json") -> RepoMetadata:
        """Parse ``meta.json``; unknown keys are ignored, as serde does.

        Raises:
            FormatError: not a composefs ``meta.json`` (``source`` names the file).
            RepositoryError: a format version newer than we understand.
        """

        def bad(why: str) -> FormatError:
            return FormatError(f"{source} is not a composefs repository metadata file: {why}")

        if len(data) > MAX_META_BYTES:
            raise bad(f"{len(data)} bytes, more than the {MAX_META_BYTES} allowed")
        try:
            doc = load_json(data, where=source, max_depth=8)
        except FormatError as e:
            raise bad(f"invalid JSON ({str(e).removeprefix(source + ': ')})") from None
        if not isinstance(doc, dict):
            raise bad("expected a JSON object")
        version = doc.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise bad("missing or invalid 'version'")
        algorithm_name = doc.get("algorithm")
        algorithm = next((a for a in Algorithm if a.value == algorithm_name), None)
        if algorithm is None:
            raise bad(f"missing or unknown 'algorithm' {algorithm_name!r}")

        features = _features(doc["features"], bad) if "features" in doc else FeatureFlags()
        erofs = (
            _erofs_formats(doc["erofs_formats"], bad) if "erofs_formats" in doc else LEGACY_EROFS
        )
        if version > FORMAT_VERSION:
            raise RepositoryError(
                f"{source}: unsupported repository format version {version}"
                f" (this tool supports up to {FORMAT_VERSION})"
            )
        return cls(version, algorithm, features, erofs)


def _features(raw: Any, bad: Callable[[str], FormatError]) -> FeatureFlags:
    """``features``: three lists of strings, each optional."""
    if not isinstance(raw, dict):
        raise bad("'features' must be an object")
    lists = []
    for key in ("compatible", "read-only-compatible", "incompatible"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"'features.{key}' must be a list of strings")
        lists.append(tuple(value))
    return FeatureFlags(*lists)


def _erofs_formats(raw: Any, bad: Callable[[str], FormatError]) -> ErofsFormats:
    """``erofs_formats``: a ``default`` version and an optional ``extra`` list."""
    if not isinstance(raw, dict) or "default" not in raw:
        raise bad("'erofs_formats' must be an object with a 'default'")
    default = raw["default"]
    extra = raw.get("extra", [])
    if not isinstance(extra, list):
        raise bad("'erofs_formats.extra' must be a list")
    for v in [default, *extra]:
        if isinstance(v, bool) or v not in EROFS_VERSIONS:
            raise bad(f"unknown EROFS format version {v!r}")
    return ErofsFormats(default, tuple(sorted(set(extra))))
