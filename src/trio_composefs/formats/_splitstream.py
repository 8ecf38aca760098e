"""The splitstream file format of composefs-rs 0.9: a sans-IO encoder and decoder.

A splitstream stores a byte stream (usually a tar layer) as a zstd-compressed
sequence of *chunks*: inline bytes, or references to external objects of the
repository named by their fs-verity digest. Nothing here touches a file: the
encoder returns bytes to write, and the decoder reads a buffer (``bytes`` or
an ``mmap`` of the whole file) or is fed the decompressed stream in pieces.

File layout (all integers little-endian; a *range* is two u64, ``[start, end)``
as absolute file offsets)::

    0   11  magic "SplitStream"
    11  1   version 0
    12  2   flags (0, ignored)
    14  1   fs-verity algorithm kernel id (1 sha256, 2 sha512)
    15  1   lg_blocksize 12
    16  16  info range, written as [32, 112)
    32  80  info: stream_refs, object_refs, stream, named_refs ranges,
            content_type u64, stream_size u64
    112     stream_refs array, object_refs array (raw digests),
            named_refs (one zstd frame of "<idx>:<name>\\0" records, sorted by name),
            stream (one zstd frame of chunks)

A chunk starts with an i64: ``-n`` (n > 0) is an inline chunk of the ``n``
bytes that follow; ``n >= 0`` refers to ``object_refs[n]``. The stream ends
with a clean end of data at a chunk boundary.

Byte-identical output with composefs-rs needs: inline runs coalesced (one
inline chunk between two references), ``object_refs`` unique in order of first
appearance, and zstd level 3 streaming with an unknown size and no checksum
(libzstd 1.5.7, as bundled by zstandard 0.25). A zstd stream's bytes depend on
how its input was fed only through flushes: ``ZSTD_e_continue`` copies input
into the compressor's own buffer and compresses whole blocks, so the encoder may
gather small pieces and hand them to zstd together (fewer calls, fewer releases
of the GIL), as long as it never flushes before the end.
"""

from __future__ import annotations

import enum
import mmap
import struct
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final, TypeAlias

import attrs
import zstandard

from .._errors import DataAfterEndError, InternalError, SplitStreamError
from ._chunks import Chunk, ExternalChunk, InlineChunk
from ._fsverity import LOG_BLOCK_SIZE, Algorithm, Digest
from ._sentinels import END, NEED_DATA, Sentinel

__all__ = [
    "END",
    "Event",
    "NEED_DATA",
    "Sentinel",
    "ChunkDecoder",
    "ChunkEvent",
    "ContentType",
    "ExternalRef",
    "InlineData",
    "SplitStreamEncoder",
    "SplitStreamInfo",
    "describe_content_type",
    "encode_splitstream",
    "iter_chunks",
    "has_splitstream_magic",
    "parse_splitstream",
]

MAGIC: Final = b"SplitStream"
HEADER_SIZE: Final = 32
INFO_SIZE: Final = 80
ZSTD_LEVEL: Final = 3

# New (repr(C)) header: magic, version, flags, algorithm, lg_blocksize, info range.
_HEADER = struct.Struct("<11sBHBBQQ")
# Old header written by bootc <= 1.15 (compiler-reordered): info range, flags,
# magic, version, algorithm, lg_blocksize.
_OLD_HEADER = struct.Struct("<QQH11sBBB")
# Info: stream_refs, object_refs, stream, named_refs ranges, content_type, stream_size.
_INFO = struct.Struct("<QQQQQQQQQQ")
_I64 = struct.Struct("<q")

# Decompressed pieces handed out by iter_chunks, and the cap on named refs.
_PIECE_SIZE: Final = 64 * 1024
_NAMED_REFS_LIMIT: Final = 64 * 1024 * 1024

_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"

MAGIC_PROBE_BYTES: Final = _OLD_HEADER.size
"""Leading bytes of a file that :func:`has_splitstream_magic` looks at (29)."""
_ZSTD_BLOCK_MAX: Final = 128 * 1024
#: The encoder gathers pieces smaller than this and feeds zstd once this much is
#: pending (zstd compresses 128 KiB blocks; how the input is cut does not change its output).
_FEED_SIZE: Final = 128 * 1024

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap


def _tag(text: bytes) -> int:
    return int.from_bytes(text, "little")


class ContentType(enum.IntEnum):
    """The content types composefs-oci gives its splitstreams.

    Each is 8 ASCII bytes read as a little-endian u64, so a file holds the
    literal text (``ocilayer`` ...). Any other u64 is a valid content type too.
    """

    OCI_LAYER = _tag(b"ocilayer")
    OCI_CONFIG = _tag(b"ociconfg")
    OCI_MANIFEST = _tag(b"ocimanif")
    OCI_BLOB = _tag(b"oci_blob")

    @property
    def label(self) -> str:
        """The 8-character tag, e.g. ``"ocilayer"``."""
        return describe_content_type(self.value)


def describe_content_type(value: int) -> str:
    """A readable form of any content type: its ASCII tag, or hex if not printable."""
    raw = value.to_bytes(8, "little")
    if all(0x20 < b < 0x7F for b in raw):
        return raw.decode("ascii")
    return f"0x{value:016x}"


# --------------------------------------------------------------------------- encoder


class _EncoderState(enum.Enum):
    IDLE = "at a chunk boundary"  # nothing written yet, or just after an external reference
    IN_RUN = "in an inline run"
    AFTER_RUN = "right after an inline run (inline runs must be coalesced)"
    FINISHED = "after finish()"


class SplitStreamEncoder:
    """Streaming writer of one splitstream (sans-IO).

    Feed the chunk sequence with :meth:`begin_inline` / :meth:`inline_data`
    and :meth:`external`, then call :meth:`finish`; each returns the next
    compressed bytes of the ``stream`` section (usually ``b""``: small pieces
    are gathered up to 128 KiB before zstd sees them, and zstd buffers up to a
    block). Write them to a temporary place, then put :meth:`header` in front:
    the file is ``header(len(stream)) + stream``. Memory stays bounded by the
    zstd window (plus the 128 KiB gathered) whatever the stream size.

    Inline runs must be coalesced by the caller: two inline runs with no
    external reference between them raise :class:`InternalError`, because
    composefs-rs writes one chunk per run and its tar reader relies on that.

    Attributes:
        stream_size: the length of the reassembled stream so far (inline bytes
            plus the sizes given to :meth:`external`).
    """

    def __init__(self, algorithm: Algorithm, content_type: int) -> None:
        if not 0 <= content_type < 1 << 64:
            raise InternalError(f"splitstream content type {content_type} is not a u64")
        self._algorithm = algorithm
        self._content_type = content_type
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        self._pending = bytearray()  # bytes for zstd not handed to it yet (< _FEED_SIZE)
        self._state = _EncoderState.IDLE
        self._run_left = 0
        self._compressed = 0
        self._stream_refs: dict[Digest, int] = {}
        # Keyed by the raw digest bytes: a layer may reference millions of objects.
        self._object_refs: dict[bytes, int] = {}
        self._named_refs: dict[str, int] = {}
        self.stream_size = 0

    @property
    def algorithm(self) -> Algorithm:
        return self._algorithm

    @property
    def content_type(self) -> int:
        return self._content_type

    @property
    def object_refs(self) -> list[Digest]:
        """The external objects referenced so far, in order of first appearance."""
        return [Digest(self._algorithm, raw) for raw in self._object_refs]

    @property
    def stream_refs(self) -> list[Digest]:
        """The referenced splitstreams, in insertion order."""
        return list(self._stream_refs)

    def _check_digest(self, digest: Digest, what: str) -> None:
        if digest.algorithm is not self._algorithm:
            raise InternalError(
                f"{what} {digest} is a {digest.algorithm.hash_name} digest in a"
                f" {self._algorithm.hash_name} splitstream"
            )

    def add_stream_ref(self, digest: Digest) -> int:
        """Reference another splitstream (kept alive by GC); returns its index.

        Adding the same digest again returns the existing index.
        """
        self._check_digest(digest, "stream ref")
        return self._stream_refs.setdefault(digest, len(self._stream_refs))

    def add_named_ref(self, name: str, digest: Digest) -> None:
        """Reference another splitstream under ``name`` (e.g. a layer's diff_id).

        A name given twice keeps the last digest (the stream refs of both stay).
        """
        if "\0" in name:
            raise InternalError(f"splitstream ref name {name!r} contains a NUL byte")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InternalError(f"splitstream ref name {name!r} is not valid UTF-8") from None
        self._named_refs[name] = self.add_stream_ref(digest)

    def _compress(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed ``data`` to zstd, gathering small pieces into one call (same output bytes)."""
        pending = self._pending
        if len(data) < _FEED_SIZE:
            pending += data
            if len(pending) < _FEED_SIZE:
                return b""
            out: bytes = self._compressor.compress(pending)
        else:
            out = self._compressor.compress(pending) if pending else b""
            out += self._compressor.compress(data)
        pending.clear()
        self._compressed += len(out)
        return out

    def _require(self, *states: _EncoderState, action: str) -> None:
        if self._state not in states:
            detail = f" ({self._run_left} bytes of the run missing)" if self._run_left else ""
            raise InternalError(f"splitstream encoder: {action} {self._state.value}{detail}")

    def begin_inline(self, length: int) -> bytes:
        """Start an inline chunk of exactly ``length`` bytes (a whole coalesced run)."""
        if self._state is not _EncoderState.IDLE:
            self._require(_EncoderState.IDLE, action="begin_inline() called")
        if length <= 0:
            raise InternalError(f"splitstream inline chunk of {length} bytes (must be > 0)")
        if length > 1 << 63:
            raise InternalError(f"splitstream inline chunk of {length} bytes is too long")
        self._state = _EncoderState.IN_RUN
        self._run_left = length
        return self._compress(_I64.pack(-length))

    def inline_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Add bytes of the current inline run; the pieces must add up to its length."""
        if self._state is not _EncoderState.IN_RUN:
            self._require(_EncoderState.IN_RUN, action="inline_data() called")
        n = len(data)
        if n > self._run_left:
            raise InternalError(
                f"splitstream encoder: {n} inline bytes given but only {self._run_left}"
                " remain in the run"
            )
        self._run_left -= n
        self.stream_size += n
        if self._run_left == 0:
            self._state = _EncoderState.AFTER_RUN
        return self._compress(data) if n else b""

    def external(self, digest: Digest, size: int) -> bytes:
        """Add a reference to the object ``digest`` of ``size`` bytes."""
        state = self._state
        if state is not _EncoderState.AFTER_RUN and state is not _EncoderState.IDLE:
            self._require(_EncoderState.IDLE, _EncoderState.AFTER_RUN, action="external() called")
        if digest.algorithm is not self._algorithm:
            self._check_digest(digest, "object")
        if size < 0:
            raise InternalError(f"splitstream external object of negative size {size}")
        index = self._object_refs.setdefault(digest.raw, len(self._object_refs))
        self.stream_size += size
        self._state = _EncoderState.IDLE
        return self._compress(_I64.pack(index))

    def finish(self) -> bytes:
        """End the stream; returns the last bytes of the ``stream`` section."""
        self._require(_EncoderState.IDLE, _EncoderState.AFTER_RUN, action="finish() called")
        self._state = _EncoderState.FINISHED
        pending = self._pending
        out: bytes = self._compressor.compress(pending) if pending else b""
        pending.clear()
        out += self._compressor.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        self._compressed += len(out)
        return out

    def _named_refs_frame(self) -> bytes:
        records = b"".join(
            f"{index}:{name}\0".encode()
            for name, index in sorted(self._named_refs.items(), key=lambda kv: kv[0].encode())
        )
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        frame: bytes = compressor.compress(records) + compressor.flush(
            zstandard.COMPRESSOBJ_FLUSH_FINISH
        )
        return frame

    def header(self, stream_length: int) -> bytes:
        """Everything that precedes the ``stream`` section in the file.

        Args:
            stream_length: the total length of the bytes returned so far; it is
                checked against the encoder's own count.
        """
        self._require(_EncoderState.FINISHED, action="header() called")
        if stream_length != self._compressed:
            raise InternalError(
                f"splitstream header for a {stream_length}-byte stream section, but the"
                f" encoder produced {self._compressed} bytes"
            )
        stream_refs = b"".join(d.raw for d in self._stream_refs)
        object_refs = b"".join(self._object_refs)
        named = self._named_refs_frame()
        info_start = HEADER_SIZE
        stream_refs_start = info_start + INFO_SIZE
        object_refs_start = stream_refs_start + len(stream_refs)
        named_start = object_refs_start + len(object_refs)
        stream_start = named_start + len(named)
        head = _HEADER.pack(
            MAGIC,
            0,
            0,
            self._algorithm.kernel_id,
            LOG_BLOCK_SIZE,
            info_start,
            stream_refs_start,
        )
        info = _INFO.pack(
            stream_refs_start,
            object_refs_start,
            object_refs_start,
            named_start,
            stream_start,
            stream_start + stream_length,
            named_start,
            stream_start,
            self._content_type,
            self.stream_size,
        )
        return head + info + stream_refs + object_refs + named


_NO_NAMES: Mapping[str, Digest] = MappingProxyType({})


def encode_splitstream(
    chunks: Iterable[Chunk],
    *,
    algorithm: Algorithm,
    content_type: int,
    named_refs: Mapping[str, Digest] = _NO_NAMES,
    stream_refs: Sequence[Digest] = (),
) -> bytes:
    """Encode a whole splitstream in memory (for small streams: configs, tests).

    Consecutive inline chunks are coalesced and empty ones dropped, as
    composefs-rs does. ``stream_refs`` are added first, then ``named_refs`` in
    the mapping's order (which decides their indexes).
    """
    encoder = SplitStreamEncoder(algorithm, content_type)
    for digest in stream_refs:
        encoder.add_stream_ref(digest)
    for name, digest in named_refs.items():
        encoder.add_named_ref(name, digest)
    parts: list[bytes] = []
    pending: list[bytes] = []

    def flush_pending() -> None:
        if pending:
            parts.append(encoder.begin_inline(sum(map(len, pending))))
            parts.extend(encoder.inline_data(piece) for piece in pending)
            pending.clear()

    for chunk in chunks:
        if isinstance(chunk, InlineChunk):
            if chunk.data:
                pending.append(chunk.data)
        else:
            flush_pending()
            parts.append(encoder.external(chunk.digest, chunk.size))
    flush_pending()
    parts.append(encoder.finish())
    stream = b"".join(parts)
    return encoder.header(len(stream)) + stream


# --------------------------------------------------------------------------- file parser


def _error(message: str) -> SplitStreamError:
    return SplitStreamError(f"splitstream: {message}")


@attrs.frozen
class SplitStreamInfo:
    """What :func:`parse_splitstream` found in a splitstream's header and sections.

    Attributes:
        algorithm: the fs-verity algorithm of every digest in the file.
        content_type: the u64 content tag (see :class:`ContentType`).
        stream_size: the length of the reassembled stream.
        stream_refs: referenced splitstreams.
        object_refs: referenced objects; external chunks index this.
        named_refs: name -> splitstream digest (read-only mapping).
        stream_range: ``(start, end)`` of the compressed ``stream`` section.
        old_header: the file has the header layout of bootc <= 1.15.
    """

    algorithm: Algorithm
    content_type: int
    stream_size: int
    stream_refs: tuple[Digest, ...]
    object_refs: tuple[Digest, ...]
    named_refs: Mapping[str, Digest] = attrs.field(hash=False)
    stream_range: tuple[int, int]
    old_header: bool = False


def _range(mv: memoryview, start: int, end: int, what: str) -> tuple[int, int]:
    if start > end:
        raise _error(f"{what} range [{start}, {end}) ends before it starts")
    if end > len(mv):
        raise _error(
            f"{what} range [{start}, {end}) runs past the end of the file ({len(mv)} bytes)"
        )
    return start, end


def _digests(
    mv: memoryview, start: int, end: int, what: str, algorithm: Algorithm
) -> tuple[Digest, ...]:
    size = algorithm.digest_size
    if (end - start) % size:
        raise _error(
            f"{what} section [{start}, {end}) is {end - start} bytes, not a multiple of the"
            f" {size}-byte {algorithm.hash_name} digest size"
        )
    raw = bytes(mv[start:end])
    return tuple(Digest(algorithm, raw[i : i + size]) for i in range(0, len(raw), size))


def _zstd_frame_end(mv: memoryview, start: int, end: int, what: str) -> int:
    """Walk the block headers of the zstd frame at ``start``; return where it ends.

    This is how we find trailing bytes after the frame without decompressing,
    and refuse a truncated frame before any output is produced.
    """

    def need(pos: int, n: int, item: str) -> None:
        if pos + n > end:
            raise _error(
                f"{what} zstd frame truncated: {item} at byte {pos} needs {n} bytes, the"
                f" section [{start}, {end}) ends at {end}"
            )

    need(start, 5, "frame header")
    if bytes(mv[start : start + 4]) != _ZSTD_MAGIC:
        raise _error(f"{what} section at byte {start} is not a zstd frame (bad magic)")
    descriptor = mv[start + 4]
    if descriptor & 0x08:
        raise _error(f"{what} zstd frame at byte {start} sets a reserved header bit")
    single_segment = bool(descriptor & 0x20)
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    dict_size = (0, 1, 2, 4)[descriptor & 0x03]
    pos = start + 5 + (0 if single_segment else 1) + dict_size + fcs_size
    need(start, pos - start, "frame header")
    while True:
        need(pos, 3, "block header")
        block = mv[pos] | mv[pos + 1] << 8 | mv[pos + 2] << 16
        kind, size = (block >> 1) & 0x03, block >> 3
        if kind == 3:
            raise _error(f"{what} zstd block at byte {pos} has the reserved block type")
        if size > _ZSTD_BLOCK_MAX:
            raise _error(f"{what} zstd block at byte {pos} claims {size} bytes (max 128 KiB)")
        pos += 3
        body = 1 if kind == 1 else size
        need(pos, body, "block")
        pos += body
        if block & 1:
            break
    if descriptor & 0x04:
        need(pos, 4, "frame checksum")
        pos += 4
    return pos


def _zstd_reader(
    mv: memoryview, start: int, end: int, what: str
) -> zstandard.ZstdDecompressionReader:
    frame_end = _zstd_frame_end(mv, start, end, what)
    if frame_end != end:
        raise _error(
            f"{what} section [{start}, {end}) has {end - frame_end} bytes of trailing data after"
            f" its zstd frame (which ends at byte {frame_end})"
        )
    return zstandard.ZstdDecompressor().stream_reader(mv[start:end], read_across_frames=False)


def _read_named_refs(
    mv: memoryview, start: int, end: int, stream_refs: tuple[Digest, ...]
) -> dict[str, Digest]:
    where = f"named_refs section [{start}, {end})"
    if start == end:  # not written by composefs-rs, but harmless
        return {}
    pieces: list[bytes] = []
    total = 0
    try:
        with _zstd_reader(mv, start, end, "named_refs") as reader:
            while piece := reader.read(_PIECE_SIZE):
                total += len(piece)
                if total > _NAMED_REFS_LIMIT:
                    raise _error(f"{where} decompresses to more than {_NAMED_REFS_LIMIT} bytes")
                pieces.append(piece)
    except zstandard.ZstdError as e:
        raise _error(f"{where}: bad zstd data: {e}") from None
    text = b"".join(pieces)
    refs: dict[str, Digest] = {}
    pos = 0
    while pos < len(text):
        nul = text.find(b"\0", pos)
        if nul < 0:
            raise _error(
                f"{where}: {len(text) - pos} bytes of trailing junk without a NUL at byte"
                f" {pos} of the decompressed section"
            )
        record = text[pos:nul]
        here = f"{where}: record at byte {pos} of the decompressed section"
        try:
            item = record.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _error(f"{here} is not UTF-8 ({e.reason} at byte {pos + e.start})") from None
        index_text, colon, name = item.partition(":")
        if not colon:
            raise _error(f"{here} has no ':' ({item[:80]!r})")
        if not (index_text.isascii() and index_text.isdigit()):
            raise _error(f"{here} has a non-integer index {index_text[:40]!r}")
        index = int(index_text)
        if index >= len(stream_refs):
            raise _error(
                f"{here} ({name[:80]!r}) has index {index}, but there are"
                f" {len(stream_refs)} stream refs"
            )
        refs[name] = stream_refs[index]
        pos = nul + 1
    return refs


def has_splitstream_magic(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first :data:`MAGIC_PROBE_BYTES` bytes or
    more) says it is a splitstream: ``SplitStream`` at byte 0, or at byte 18 in the header
    layout of bootc <= 1.15. A quick probe; :func:`parse_splitstream` checks the rest."""
    return head[:11] == MAGIC or head[18:29] == MAGIC


def parse_splitstream(
    data: Buffer, *, algorithm: Algorithm, content_type: int | None = None
) -> SplitStreamInfo:
    """Parse and check the header and reference sections of a whole splitstream file.

    The ``stream`` section is not decompressed here (see :func:`iter_chunks`).
    Both header layouts are read: the current one and the one of bootc <= 1.15.

    Args:
        data: the whole file, e.g. ``bytes`` or an ``mmap``; no view of it is kept.
        algorithm: the repository's algorithm; the file must use the same.
        content_type: if given, the file's content type must equal it.

    Raises:
        SplitStreamError: saying what is wrong and at which byte offsets.
    """
    with memoryview(data) as whole, whole.cast("B") as mv:
        if len(mv) < HEADER_SIZE:
            raise _error(f"file of {len(mv)} bytes is shorter than the {HEADER_SIZE}-byte header")
        magic, version, _flags, alg_id, lg_blocksize, info_start, info_end = _HEADER.unpack_from(mv)
        old = False
        if magic != MAGIC:
            info_start, info_end, _flags, magic, version, alg_id, lg_blocksize = (
                _OLD_HEADER.unpack_from(mv)
            )
            old = True
            if magic != MAGIC:
                raise _error("bad magic: 'SplitStream' is neither at byte 0 nor at byte 18")
        if version != 0:
            raise _error(f"unsupported version {version} (only 0 is known)")
        if alg_id != algorithm.kernel_id:
            raise _error(
                f"fs-verity algorithm id {alg_id} in the header, but the repository uses"
                f" {algorithm.hash_name} (id {algorithm.kernel_id})"
            )
        if lg_blocksize != LOG_BLOCK_SIZE:
            raise _error(f"fs-verity block size 2**{lg_blocksize}, only 2**12 is supported")
        _range(mv, info_start, info_end, "info")
        if info_end - info_start < INFO_SIZE:
            raise _error(
                f"info section [{info_start}, {info_end}) is {info_end - info_start} bytes,"
                f" at least {INFO_SIZE} expected"
            )
        (sr_start, sr_end, or_start, or_end, st_start, st_end, nr_start, nr_end, ctype, size) = (
            _INFO.unpack_from(mv, info_start)
        )
        if content_type is not None and ctype != content_type:
            raise _error(
                f"content type {describe_content_type(ctype)!r}, expected"
                f" {describe_content_type(content_type)!r}"
            )
        _range(mv, sr_start, sr_end, "stream_refs")
        _range(mv, or_start, or_end, "object_refs")
        _range(mv, nr_start, nr_end, "named_refs")
        _range(mv, st_start, st_end, "stream")
        stream_refs = _digests(mv, sr_start, sr_end, "stream_refs", algorithm)
        object_refs = _digests(mv, or_start, or_end, "object_refs", algorithm)
        named = _read_named_refs(mv, nr_start, nr_end, stream_refs)
    return SplitStreamInfo(
        algorithm=algorithm,
        content_type=ctype,
        stream_size=size,
        stream_refs=stream_refs,
        object_refs=object_refs,
        named_refs=MappingProxyType(named),
        stream_range=(st_start, st_end),
        old_header=old,
    )


# --------------------------------------------------------------------------- chunk decoder


@attrs.frozen
class InlineData:
    """Bytes of an inline chunk; a long chunk arrives as several of these."""

    data: bytes


@attrs.frozen
class ExternalRef:
    """An external chunk: ``object_refs[index]``."""

    index: int


#: The events of :meth:`ChunkDecoder.next_event` (events only; the sentinels
#: :data:`NEED_DATA` and :data:`END` are the shared ones of ``formats._sentinels``).
Event: TypeAlias = InlineData | ExternalRef
#: :data:`Event` under the name :mod:`trio_composefs.formats` exports it by.
ChunkEvent: TypeAlias = Event


class ChunkDecoder:
    """Sans-IO parser of the *decompressed* ``stream`` section (h11 style).

    Feed bytes with :meth:`receive_data` (``b""`` marks the end), then call
    :meth:`next_event` until it returns :data:`NEED_DATA` or :data:`END`.
    Memory is bounded by what you feed: inline data is handed out as it
    arrives, never gathered into a whole chunk.

    Args:
        object_count: ``len(object_refs)``; larger external indexes are errors.
    """

    def __init__(self, object_count: int) -> None:
        self._object_count = object_count
        self._buffer = bytearray()
        self._eof = False
        self._inline_left = 0
        self._inline_start = 0
        self._offset = 0  # stream offset of self._buffer[0]
        self._error: SplitStreamError | None = None
        self._ended = False

    @property
    def offset(self) -> int:
        """Bytes of the decompressed stream consumed so far."""
        return self._offset

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add decompressed stream bytes; ``b""`` means there are no more.

        Raises:
            DataAfterEndError: data after the end of input was signalled (an
                :class:`~trio_composefs.InternalError` and a :class:`RuntimeError`).
        """
        if self._eof:
            raise DataAfterEndError("ChunkDecoder.receive_data() after the end of input")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def _fail(self, message: str) -> SplitStreamError:
        self._error = _error(f"stream: {message}")
        return self._error

    def _take(self, n: int) -> bytes:
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._offset += n
        return out

    def next_event(self) -> Event | Sentinel:
        """The next chunk event, :data:`NEED_DATA`, or :data:`END` (repeated once reached).

        Raises:
            SplitStreamError: a chunk runs past the end of the data, an external
                index is out of range, or the data ends inside an instruction.
        """
        if self._error is not None:
            raise self._error
        if self._ended:
            return END
        if self._inline_left == 0:
            have = len(self._buffer)
            if have < 8:
                if not self._eof:
                    return NEED_DATA
                if have == 0:
                    self._ended = True
                    return END
                raise self._fail(
                    f"data ends {have} bytes into the 8-byte chunk instruction"
                    f" at byte {self._offset}"
                )
            (value,) = _I64.unpack_from(self._buffer)
            at = self._offset
            del self._buffer[:8]
            self._offset += 8
            if value >= 0:
                if value >= self._object_count:
                    raise self._fail(
                        f"external chunk at byte {at} refers to object {value}, but there are"
                        f" {self._object_count} object refs"
                    )
                return ExternalRef(value)
            # -value cannot be 0 here: zero is an external reference, so a
            # zero-length inline chunk is unrepresentable.
            self._inline_left = -value
            self._inline_start = at
        if self._buffer:
            piece = self._take(min(self._inline_left, len(self._buffer)))
            self._inline_left -= len(piece)
            return InlineData(piece)
        if self._eof:
            raise self._fail(
                f"inline chunk at byte {self._inline_start} runs past the end of the stream"
                f" ({self._inline_left} of its bytes missing)"
            )
        return NEED_DATA


# --------------------------------------------------------------------------- reading chunks


def iter_chunks(
    data: Buffer, info: SplitStreamInfo, object_size: Callable[[Digest], int]
) -> Generator[Chunk, None, None]:
    """Decompress and decode the ``stream`` section of a parsed splitstream.

    Yields :class:`InlineChunk` pieces (a long inline chunk comes as several
    pieces of at most about 64 KiB) and :class:`ExternalChunk` values whose
    size comes from ``object_size(digest)``. Memory stays bounded.

    After the last chunk, the total length is checked against
    ``info.stream_size``; a mismatch raises only then, so consumers that write
    the output somewhere must not commit it before the iterator is exhausted.

    Raises:
        SplitStreamError: bad zstd data, trailing bytes after the frame, a bad
            chunk, or a length that differs from ``stream_size``.
    """
    start, end = info.stream_range
    decoder = ChunkDecoder(len(info.object_refs))
    total = 0
    with memoryview(data) as whole, whole.cast("B") as mv:
        if end > len(mv) or start > end:
            raise _error(f"stream range [{start}, {end}) is not inside the {len(mv)}-byte file")
        with _zstd_reader(mv, start, end, "stream") as reader:
            event: Event | Sentinel = NEED_DATA
            while event is not END:
                try:
                    piece = reader.read(_PIECE_SIZE)
                except zstandard.ZstdError as e:
                    raise _error(
                        f"stream section [{start}, {end}): bad zstd data after"
                        f" {decoder.offset} decompressed bytes: {e}"
                    ) from None
                decoder.receive_data(piece)
                while (event := decoder.next_event()) is not NEED_DATA and event is not END:
                    if isinstance(event, InlineData):
                        total += len(event.data)
                        yield InlineChunk(event.data)
                    else:
                        digest = info.object_refs[event.index]
                        size = object_size(digest)
                        total += size
                        yield ExternalChunk(digest, size)
    if total != info.stream_size:
        raise _error(
            f"stream reassembles to {total} bytes, but the info section says {info.stream_size}"
        )
