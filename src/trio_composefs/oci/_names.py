"""OCI image names in the repository: tags and their encoding, digest syntax.

A tag is stored as ``streams/refs/oci/<encoded name>`` -> the manifest stream,
where the name is encoded ``%`` -> ``%25`` then ``/`` -> ``%2F`` (as composefs-rs).
"""

from __future__ import annotations

from typing import Final

from .._errors import ComposefsError, InvalidNameError

__all__ = ["OCI_REF_PREFIX", "decode_tag", "encode_tag"]

OCI_REF_PREFIX: Final = "oci/"


def encode_tag(name: str) -> str:
    """A tag as a file name under ``streams/refs/oci/``: ``%`` -> ``%25``, then ``/`` -> ``%2F``."""
    return name.replace("%", "%25").replace("/", "%2F")


def decode_tag(encoded: str) -> str:
    """Undo :func:`encode_tag` in one pass (so ``%252F`` is ``%2F``, not ``/``)."""
    out: list[str] = []
    i = 0
    while i < len(encoded):
        if encoded.startswith("%2F", i):
            out.append("/")
            i += 3
        elif encoded.startswith("%25", i):
            out.append("%")
            i += 3
        else:
            out.append(encoded[i])
            i += 1
    return "".join(out)


def _check_tag(name: str) -> str:
    """The ref path of a valid tag; a user error for names that cannot be one."""
    if not name:
        raise InvalidNameError("an image tag cannot be empty")
    if name.startswith("@"):
        raise InvalidNameError(
            f"invalid tag {name!r}: a leading '@' is reserved for digest references"
        )
    encoded = encode_tag(name)
    if encoded in (".", "..") or "\0" in name:
        raise InvalidNameError(f"invalid tag {name!r}")
    if encoded.startswith("."):
        raise InvalidNameError(
            f"invalid tag {name!r}: a tag cannot start with '.'"
            " (reserved for the repository's temporary files)"
        )
    if len(encoded.encode("utf-8", "surrogateescape")) > 255:
        raise InvalidNameError(
            f"invalid tag {name!r}: longer than 255 bytes once encoded; give a shorter TAG"
        )
    return OCI_REF_PREFIX + encoded


def _check_digest(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or hexd.strip("0123456789abcdef"):
        raise ComposefsError(f"not a sha256 digest: {digest!r} (expected sha256:<64 hex digits>)")
    return digest
