"""``sha256:<hex>``: the OCI content identifier of diff_ids, descriptors and references.

An OCI digest is ``<algorithm>:<encoded>``; this package supports ``sha256`` only (as
composefs-rs's OCI code), encoded as exactly 64 lowercase hex digits. Every place that
takes one from outside (a manifest, a config, a reference, a command line) parses it
here, so a malformed one always raises :class:`~trio_composefs.InvalidDigestError`.
"""

from __future__ import annotations

import hashlib
from typing import Final

from .._errors import InvalidDigestError

__all__ = ["SHA256_PREFIX", "Sha256Id"]

SHA256_PREFIX: Final = "sha256:"
_HEX: Final = frozenset("0123456789abcdef")


class Sha256Id(str):
    """A validated ``sha256:<64 lowercase hex>`` string (a ``str``: compares, hashes,
    formats and serialises as the text itself).

    Build one with :meth:`parse` (text from outside) or :meth:`of` (hash bytes).
    """

    __slots__ = ()

    @classmethod
    def parse(cls, text: str, *, error: str | None = None) -> Sha256Id:
        """Check ``text`` and return it typed.

        Args:
            text: the candidate, e.g. ``sha256:e3b0c442...``.
            error: the message to raise instead of the default (to name the place).

        Raises:
            InvalidDigestError: another algorithm, not 64 digits, upper case or not hex.
        """
        if isinstance(text, cls):
            return text
        hexd = text[len(SHA256_PREFIX) :]
        if not text.startswith(SHA256_PREFIX) or len(hexd) != 64 or not _HEX.issuperset(hexd):
            raise InvalidDigestError(
                error or f"not a sha256 digest: {text!r} (expected sha256:<64 hex digits>)"
            )
        return cls(text)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Sha256Id:
        """The identifier of ``data``: ``sha256:`` and its SHA-256 in hex."""
        return cls(SHA256_PREFIX + hashlib.sha256(data).hexdigest())

    @classmethod
    def from_hex(cls, hexdigest: str) -> Sha256Id:
        """``sha256:<hexdigest>``, checked like :meth:`parse`."""
        return cls.parse(SHA256_PREFIX + hexdigest)

    @property
    def hex(self) -> str:
        """The 64 hex digits."""
        return self[len(SHA256_PREFIX) :]

    def digest_bytes(self) -> bytes:
        """The 32 bytes of the SHA-256."""
        return bytes.fromhex(self.hex)
