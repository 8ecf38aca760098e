"""Tar header parsing shared by the splitter and the entry reader.

Sans-IO and allocation-light: a header is one 512-byte block, parsed with slicing.
The dialects understood are ustar (with ``prefix``), GNU and old GNU (``L``/``K`` long
names and links, base-256 numbers), POSIX PAX (``x`` and ``g`` headers) and V7. The
strictness rules follow composefs-rs (tar-core defaults); see
``composefs-rs-notes.md`` §4.2-4.3.
"""

from __future__ import annotations

import enum
import re
import zlib

import attrs

from .._errors import TarError

__all__ = [
    "BLOCK",
    "MAX_EXTENSION_BYTES",
    "MAX_SIZE",
    "ZERO_BLOCK",
    "Dialect",
    "TarHeader",
    "decode_name",
    "dialect_of",
    "header_sum",
    "is_extension",
    "parse_number",
    "parse_pax_records",
    "roundup",
    "verify_checksum",
]

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
#: Combined size of the L, K and x extension data that may precede one entry.
MAX_EXTENSION_BYTES = 1024 * 1024
#: Largest entry size we accept; anything above is treated as a corrupt header.
MAX_SIZE = (1 << 63) - 1

REGULAR_TYPES = frozenset(b"0\x007")
#: Types whose size field must be zero.
SIZELESS_TYPES = frozenset(b"123456")

_LOW_BYTES = bytes(range(128))
_OCTAL_DIGITS = b"01234567"
_DECIMAL_DIGITS = b"0123456789"
USTAR_MAGIC = b"ustar\x00"
GNU_MAGIC = b"ustar "
#: Type flags of extension headers (meaningful only in ustar and GNU headers).
EXTENSION_TYPES = b"LKxg"

# The common form of a numeric field: optional spaces, octal digits, optional spaces,
# then a NUL or the end of the field (what follows a NUL is ignored).
#: ``PLAIN_OCTAL(block, start, stop)``: that form, or ``None`` (then see :func:`parse_number`).
PLAIN_OCTAL = re.compile(rb" *([0-7]*) *(?:\x00|\Z)").match
# The start of a PAX record: its decimal length (at most 20 digits), a space, a
# non-empty key and "=" (the key is what precedes the first "=").
_PAX_RECORD = re.compile(rb"([0-9]{1,20}) ([^=]+)=").match
# A valid PAX time: decimal seconds, optionally a dot and decimal digits.
_PLAIN_PAX_TIME = re.compile(rb"[0-9]+(?:\.[0-9]*)?\Z").match
_adler32 = zlib.adler32


def roundup(size: int) -> int:
    """Round ``size`` up to a multiple of the 512-byte block."""
    return (size + BLOCK - 1) & ~(BLOCK - 1)


class Dialect(enum.Enum):
    """The header flavour, told by its magic field."""

    USTAR = "ustar"  # POSIX ustar / pax: magic "ustar\0"
    GNU = "gnu"  # GNU and old GNU: magic "ustar " (version " \0")
    V7 = "v7"  # no magic


def dialect_of(block: bytes) -> Dialect:
    """The dialect of a header block, from its magic field."""
    magic = block[257:263]
    if magic == USTAR_MAGIC:
        return Dialect.USTAR
    if magic == GNU_MAGIC:
        return Dialect.GNU
    return Dialect.V7


def is_extension(typeflag: int, dialect: Dialect) -> bool:
    """Whether a header is an extension (L, K, x, g) rather than an entry of its own.

    In V7 headers these type letters mean nothing special: they are ordinary entries.
    """
    return dialect is not Dialect.V7 and typeflag in b"LKxg"


def decode_name(raw: bytes) -> str:
    """Decode a name from the archive (UTF-8, undecodable bytes kept as surrogates)."""
    return raw.decode("utf-8", "surrogateescape")


def _cstring(field: bytes) -> bytes:
    end = field.find(0)
    return field if end < 0 else field[:end]


def parse_number(
    field: bytes, what: str, *, entry: str | None = None, offset: int | None = None
) -> int:
    """Parse a numeric header field: octal text or GNU base-256.

    An all-NUL or all-space field is 0. Negative base-256 values and anything that is
    not octal digits (with optional surrounding spaces, NUL-terminated) raise
    :class:`TarError`.
    """
    plain = PLAIN_OCTAL(field)
    if plain is not None:  # the fast path; what it accepts, the rules below accept alike
        digits = plain[1]
        return int(digits, 8) if digits else 0
    first = field[0] if field else 0
    if first & 0x80:
        if first & 0x40:
            raise TarError(f"negative number in header field {what}", entry=entry, offset=offset)
        return int.from_bytes(bytes([first & 0x3F]) + field[1:], "big")
    text = _cstring(field).strip(b" ")
    if not text:
        return 0
    if text.translate(None, _OCTAL_DIGITS):
        raise TarError(
            f"malformed number in header field {what} (not octal digits)",
            entry=entry,
            offset=offset,
        )
    return int(text, 8)


def header_sum(block: bytes) -> int:
    """The unsigned checksum of a header block: the sum of its bytes, the checksum
    field counted as eight spaces.

    Adler-32's first half is 1 + the byte sum mod 65521, computed in C. An ASCII block
    sums to at most 512 * 127 = 65024, so one Adler-32 gives the exact sum; otherwise
    two halves do (each sums to at most 256 * 255 = 65280).
    """
    if block.isascii():
        total = (_adler32(block) & 0xFFFF) - 1
    else:
        total = (_adler32(block[:256]) & 0xFFFF) + (_adler32(block[256:]) & 0xFFFF) - 2
    return total - sum(block[148:156]) + 8 * 0x20


def verify_checksum(block: bytes, *, offset: int) -> None:
    """Check a header's checksum; unsigned and (historic BSD) signed sums are accepted."""
    stored = parse_number(block[148:156], "chksum", offset=offset)
    unsigned = header_sum(block)
    if stored == unsigned:
        return
    high = len(block[:148].translate(None, _LOW_BYTES)) + len(
        block[156:].translate(None, _LOW_BYTES)
    )
    if stored == unsigned - 256 * high:
        return
    # No name quoted: a block that fails its checksum may not be a tar header at all
    # (a hostile blob could be any file), and its bytes must not reach a message.
    raise TarError("header checksum mismatch (not a tar header?)", offset=offset)


def parse_pax_records(
    data: bytes, *, entry: str | None = None, offset: int | None = None
) -> dict[bytes, bytes]:
    """Parse PAX extended header records (``"<len> <key>=<value>\\n"``).

    Later records override earlier ones with the same key. Trailing NUL bytes after
    the last record are tolerated; anything else malformed raises :class:`TarError`.
    """
    records: dict[bytes, bytes] = {}
    pos = 0
    end = len(data)
    find = data.find
    while pos < end:
        fast = _PAX_RECORD(data, pos)
        if fast is not None:  # a well-formed record whose key ends inside it
            record_end = pos + int(fast[1])
            value_start = fast.end()
            if value_start < record_end <= end and data[record_end - 1] == 0x0A:
                records[fast[2]] = data[value_start : record_end - 1]
                pos = record_end
                continue
        # The general rules (and their errors) for anything else.
        if data[pos] == 0 and not data[pos:].strip(b"\x00"):
            break
        space = find(b" ", pos, pos + 21)
        # bytes.isdigit: only ASCII digits, and not empty
        if space <= pos or not data[pos:space].isdigit():
            raise TarError("malformed PAX record length", entry=entry, offset=offset)
        record_end = pos + int(data[pos:space])
        if record_end <= space + 1 or record_end > end or data[record_end - 1] != 0x0A:
            raise TarError("malformed PAX record", entry=entry, offset=offset)
        equals = find(b"=", space + 1, record_end - 1)
        if equals <= space + 1:
            raise TarError("malformed PAX record (no key)", entry=entry, offset=offset)
        records[data[space + 1 : equals]] = data[equals + 1 : record_end - 1]
        pos = record_end
    return records


def _pax_decimal(value: bytes, key: str, *, entry: str | None, offset: int) -> int:
    if not value or value.translate(None, _DECIMAL_DIGITS):
        raise TarError(
            f"malformed PAX {key} ({len(value)} bytes, not decimal digits)",
            entry=entry,
            offset=offset,
        )
    return int(value)


def _pax_time(value: bytes, *, entry: str | None, offset: int) -> tuple[int, int]:
    seconds, dot, fraction = value.partition(b".")
    if (
        not seconds
        or seconds.translate(None, _DECIMAL_DIGITS)
        or (dot and fraction.translate(None, _DECIMAL_DIGITS))
    ):
        raise TarError(
            f"malformed PAX mtime ({len(value)} bytes, not a decimal time)",
            entry=entry,
            offset=offset,
        )
    nsec = int(fraction[:9].ljust(9, b"0")) if fraction else 0
    return int(seconds), nsec


@attrs.frozen
class TarHeader:
    """One entry's header with its L/K/x extensions applied.

    Created by the splitter once the main header block has been read. ``path``,
    ``size`` and the type are resolved eagerly (the splitter needs them); the other
    fields are parsed on demand by the methods, which raise :class:`TarError`.

    Attributes:
        offset: byte offset of the main header block in the stream.
        block: the raw 512-byte main header.
        pax: the entry's PAX ``x`` records (raw keys and values).
        long_name: the GNU ``L`` name, NULs stripped, if there was one.
        long_link: the GNU ``K`` link target, NULs stripped, if there was one.
        path: the resolved path as stored (PAX ``path`` > GNU long name > ustar prefix/name).
        size: the resolved content size (PAX ``size`` over the header field).
    """

    offset: int
    block: bytes
    pax: dict[bytes, bytes] = attrs.field(hash=False)
    long_name: bytes | None
    long_link: bytes | None
    path: str
    size: int

    @property
    def typeflag(self) -> bytes:
        """The one-byte type flag (``b"0"``, ``b"5"``, ...)."""
        return self.block[156:157]

    @property
    def dialect(self) -> Dialect:
        """The header's dialect."""
        return dialect_of(self.block)

    @property
    def is_regular(self) -> bool:
        """Whether the entry is a regular file (types ``0``, NUL and ``7``)."""
        return self.block[156] in REGULAR_TYPES

    def _number(self, start: int, stop: int, what: str) -> int:
        return parse_number(self.block[start:stop], what, entry=self.path, offset=self.offset)

    def _pax_int(self, key: bytes) -> int | None:
        value = self.pax.get(key)
        if value is None:
            return None
        return _pax_decimal(value, key.decode(), entry=self.path, offset=self.offset)

    def mode(self) -> int:
        """The raw header mode field (not masked)."""
        return self._number(100, 108, "mode")

    def uid(self) -> int:
        """The owner's uid; a PAX ``uid`` overrides it and is cast to 32 bits."""
        value = self._pax_int(b"uid")
        return self._number(108, 116, "uid") if value is None else value & 0xFFFFFFFF

    def gid(self) -> int:
        """The group's gid; a PAX ``gid`` overrides it and is cast to 32 bits."""
        value = self._pax_int(b"gid")
        return self._number(116, 124, "gid") if value is None else value & 0xFFFFFFFF

    def mtime(self) -> tuple[int, int]:
        """``(seconds, nanoseconds)``; nanoseconds only come from a PAX ``mtime``."""
        value = self.pax.get(b"mtime")
        if value is None:
            return self._number(136, 148, "mtime"), 0
        return _pax_time(value, entry=self.path, offset=self.offset)

    def linkname(self) -> str:
        """The link target (PAX ``linkpath`` > GNU long link > header); ``""`` if none."""
        value = self.pax.get(b"linkpath")
        if value is None:
            value = self.long_link if self.long_link is not None else _cstring(self.block[157:257])
        return decode_name(value)

    def device(self) -> tuple[int, int]:
        """``(major, minor)`` from the header's device fields."""
        return self._number(329, 337, "devmajor"), self._number(337, 345, "devminor")

    def xattrs(self) -> dict[str, bytes]:
        """Extended attributes from PAX ``SCHILY.xattr.*`` records."""
        prefix = b"SCHILY.xattr."
        return {
            decode_name(key[len(prefix) :]): value
            for key, value in self.pax.items()
            if key.startswith(prefix)
        }

    @classmethod
    def from_block(
        cls,
        block: bytes,
        *,
        offset: int,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarHeader:
        """Resolve a main header block (checksum already verified) and its extensions.

        Raises:
            TarError: empty path, bad or absurd size, sparse entry, non-zero size on a
                link, device, directory or fifo.
        """
        raw_path = (pax.get(b"path") if pax else None) or long_name
        if not raw_path:
            end = block.find(0, 0, 100)
            raw_path = block[: end if end >= 0 else 100]
            if block[257:263] == USTAR_MAGIC:
                end = block.find(0, 345, 500)
                if end != 345:
                    raw_path = block[345 : end if end >= 0 else 500] + b"/" + raw_path
        if not raw_path:
            raise TarError("entry with an empty path", offset=offset)
        path = raw_path.decode("utf-8", "surrogateescape")
        typeflag = block[156]
        if typeflag == 0x53:  # "S"
            raise TarError("sparse entries are not supported", entry=path, offset=offset)
        pax_size = pax.get(b"size") if pax else None
        if pax_size is not None:
            size = _pax_decimal(pax_size, "size", entry=path, offset=offset)
        else:
            plain = PLAIN_OCTAL(block, 124, 136)
            if plain is not None:
                size = int(plain[1] or b"0", 8)
            else:
                size = parse_number(block[124:136], "size", entry=path, offset=offset)
        if pax:
            for key in (b"uid", b"gid"):
                if key in pax:
                    _pax_decimal(pax[key], key.decode(), entry=path, offset=offset)
            mtime = pax.get(b"mtime")
            if mtime is not None and not _PLAIN_PAX_TIME(mtime):
                _pax_time(mtime, entry=path, offset=offset)  # raises
        if size > MAX_SIZE:
            raise TarError(f"absurd entry size {size}", entry=path, offset=offset)
        if size and typeflag in SIZELESS_TYPES:
            raise TarError(
                f"non-zero size {size} on an entry of type {chr(typeflag)!r}",
                entry=path,
                offset=offset,
            )
        return cls(offset, block, pax, long_name, long_link, path, size)
