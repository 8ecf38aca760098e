"""Splitstream encoder and decoder: upstream golden files, round trips, malformed input."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import random
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_composefs import InternalError, SplitStreamError
from trio_composefs.formats import (
    Algorithm,
    Chunk,
    Digest,
    ExternalChunk,
    InlineChunk,
    fsverity_digest,
)
from trio_composefs.formats._splitstream import (
    END,
    MAGIC_PROBE_BYTES,
    NEED_DATA,
    ChunkDecoder,
    ContentType,
    Event,
    ExternalRef,
    InlineData,
    Sentinel,
    SplitStreamEncoder,
    SplitStreamInfo,
    describe_content_type,
    encode_splitstream,
    has_splitstream_magic,
    iter_chunks,
    parse_splitstream,
)

SHA256 = Algorithm.SHA256
SHA512 = Algorithm.SHA512
LAYER = ContentType.OCI_LAYER


# --------------------------------------------------------------------------- helpers


def zstd_frame(data: bytes) -> bytes:
    """The oracle of notes §3.4: streaming zstd level 3, unknown size, no checksum."""
    c = zstandard.ZstdCompressor(level=3).compressobj()
    return bytes(c.compress(data) + c.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))


def unzstd(frame: bytes) -> bytes:
    return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(frame))


def i64(n: int) -> bytes:
    return struct.pack("<q", n)


def ustar(name: bytes, size: int) -> bytes:
    """A tar-rs ``Header::new_ustar()`` entry header as described in notes §9."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000700\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    h[148:156] = b"%07o\0" % sum(h)
    return bytes(h)


def layer_tar(name: bytes, size: int) -> tuple[bytes, list[Chunk]]:
    """The tar of one zero-filled entry and its chunks (header, object, padding + end)."""
    header = ustar(name, size)
    data = bytes(size)
    tail = bytes(-size % 512) + bytes(1024)
    chunks: list[Chunk] = [
        InlineChunk(header),
        ExternalChunk(fsverity_digest(data), size),
        InlineChunk(tail),
    ]
    return header + data + tail, chunks


def digest(n: int, algorithm: Algorithm = SHA256) -> Digest:
    """A distinct fake object id."""
    return Digest(algorithm, hashlib.new(algorithm.hash_name, b"%d" % n).digest())


def coalesce(chunks: Iterable[Chunk]) -> list[Chunk]:
    out: list[Chunk] = []
    for c in chunks:
        if isinstance(c, InlineChunk):
            if not c.data:
                continue
            if out and isinstance(out[-1], InlineChunk):
                out[-1] = InlineChunk(out[-1].data + c.data)
                continue
        out.append(c)
    return out


def decode(data: bytes, algorithm: Algorithm = SHA256) -> tuple[SplitStreamInfo, list[Chunk]]:
    info = parse_splitstream(data, algorithm=algorithm)
    return info, coalesce(iter_chunks(data, info, SIZES.__getitem__))


# sizes of the fake objects made by ext()
SIZES: dict[Digest, int] = {}


def ext(n: int, size: int, algorithm: Algorithm = SHA256) -> ExternalChunk:
    d = digest(n, algorithm)
    SIZES[d] = size
    return ExternalChunk(d, size)


def assemble(
    *,
    stream_refs: bytes = b"",
    object_refs: bytes = b"",
    named: bytes | None = None,
    stream: bytes | None = None,
    content_type: int = LAYER,
    stream_size: int = 0,
    old: bool = False,
    info_extra: bytes = b"",
    version: int = 0,
    algorithm_id: int = 1,
    lg: int = 12,
    override: dict[str, tuple[int, int]] | None = None,
) -> bytes:
    """Build a splitstream file by hand, independently of the encoder."""
    named = zstd_frame(b"") if named is None else named
    stream = zstd_frame(b"") if stream is None else stream
    info_len = 80 + len(info_extra)
    pos = 32 + info_len
    ranges = {}
    for key, blob in (
        ("stream_refs", stream_refs),
        ("object_refs", object_refs),
        ("named_refs", named),
        ("stream", stream),
    ):
        ranges[key] = (pos, pos + len(blob))
        pos += len(blob)
    ranges["info"] = (32, 32 + info_len)
    ranges.update(override or {})
    if old:
        header = struct.pack(
            "<QQH11sBBB", *ranges["info"], 0, b"SplitStream", version, algorithm_id, lg
        )
    else:
        header = struct.pack(
            "<11sBHBBQQ", b"SplitStream", version, 0, algorithm_id, lg, *ranges["info"]
        )
    info = struct.pack(
        "<10Q",
        *ranges["stream_refs"],
        *ranges["object_refs"],
        *ranges["stream"],
        *ranges["named_refs"],
        content_type,
        stream_size,
    )
    return header + info + info_extra + stream_refs + object_refs + named + stream


# --------------------------------------------------------------------------- golden oracles

LAYERS = [
    (
        b"alpha",
        1000,
        "757d6903198804b6ed96421a93a9973f5facc0e445a2a6c61cb0129eb67026e2",
        "61c07629b8a41273f190744a8545c132e6b784dcb2235bb31ade307a83e092ff",
    ),
    (
        b"beta",
        2000,
        "77dd145166ef191089dabd4d2c52d32143850a3c81a074fedf48dca360e2dcb9",
        "ce472620ab69da46e385b0936865ef22f940e6bf55a083d3be37b1003795e221",
    ),
    (
        b"gamma",
        3000,
        "9b57f0e91c403b650e9391fd5e4154cac5dc1469acc0f3312e6149aa34f160ef",
        "99ce11df4bb808a1e80ce69425dae527b64aa7a270bf99c4a6e24d66be270f3f",
    ),
]


def layer_splitstream(name: bytes, size: int) -> bytes:
    _, chunks = layer_tar(name, size)
    return encode_splitstream(chunks, algorithm=SHA256, content_type=ContentType.OCI_LAYER)


@pytest.mark.parametrize(("name", "size", "diff_id", "verity"), LAYERS)
def test_golden_layer_splitstreams(name: bytes, size: int, diff_id: str, verity: str) -> None:
    tar, chunks = layer_tar(name, size)
    assert hashlib.sha256(tar).hexdigest() == diff_id
    # the tar is a real tar archive (Python's tarfile as a second reader)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        (member,) = tf.getmembers()
        assert (member.name, member.size, member.mode) == (name.decode(), size, 0o700)
    ss = layer_splitstream(name, size)
    assert fsverity_digest(ss).hex() == verity
    info, back = decode_with(ss, {c.digest: c.size for c in chunks if isinstance(c, ExternalChunk)})
    assert back == chunks
    assert info.stream_size == len(tar)


def decode_with(data: bytes, sizes: dict[Digest, int]) -> tuple[SplitStreamInfo, list[Chunk]]:
    info = parse_splitstream(data, algorithm=SHA256)
    return info, coalesce(iter_chunks(data, info, sizes.__getitem__))


def test_alpha_layout() -> None:
    """The hexdump of notes §3.9, field by field."""
    ss = layer_splitstream(b"alpha", 1000)
    assert len(ss) == 237
    assert ss[0:16] == b"SplitStream\x00\x00\x00\x01\x0c"
    assert struct.unpack_from("<2Q", ss, 16) == (32, 112)
    assert struct.unpack_from("<10Q", ss, 32) == (
        0x70, 0x70,  # stream_refs
        0x70, 0x90,  # object_refs
        0x99, 0xED,  # stream
        0x90, 0x99,  # named_refs
        int.from_bytes(b"ocilayer", "little"),
        2560,
    )  # fmt: skip
    assert ss[0x60:0x68] == b"ocilayer"
    assert ss[0x70:0x90] == fsverity_digest(bytes(1000)).raw
    assert ss[0x70:0x74].hex() == "f6fa43bb"
    assert ss[0x90:0x99].hex() == "28b52ffd2000010000"
    assert ss[0x99:0x9F].hex() == "28b52ffd0058"
    header = ustar(b"alpha", 1000)
    assert header[148:156] == b"0006751\0"
    stream = i64(-512) + header + i64(0) + i64(-1048) + bytes(1048)
    assert unzstd(ss[0x99:]) == stream
    assert ss[0x99:] == zstd_frame(stream)


@pytest.mark.skipif(shutil.which("fsverity") is None, reason="needs the fsverity tool")
def test_alpha_digest_with_fsverity_tool(tmp_path: Path) -> None:
    path = tmp_path / "alpha.splitstream"
    path.write_bytes(layer_splitstream(b"alpha", 1000))
    out = subprocess.run(
        ["fsverity", "digest", "--compact", str(path)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == [LAYERS[0][3]]


CONFIG_JSON_VERITY = "1dc5a7ea2c7a2d322c8ab613e8427bfe3fec9e6775b3c85896421a588d7c0e17"
CONFIG_SPLITSTREAM_VERITY = "4839518dea22749f8ff233e7f7baec65f23dd5336462f46ad6884769af84bf95"


def test_golden_config_splitstream() -> None:
    diff_ids = [f"sha256:{d}" for _, _, d, _ in LAYERS]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        separators=(",", ":"),
    ).encode()
    assert len(config) == 299
    config_id = fsverity_digest(config)
    assert config_id.hex() == CONFIG_JSON_VERITY
    layer_ids = [fsverity_digest(layer_splitstream(n, s)) for n, s, _, _ in LAYERS]
    assert [d.hex() for d in layer_ids] == [v for _, _, _, v in LAYERS]

    ss = encode_splitstream(
        [ExternalChunk(config_id, len(config))],
        algorithm=SHA256,
        content_type=ContentType.OCI_CONFIG,
        named_refs=dict(zip(diff_ids, layer_ids, strict=True)),
    )
    assert len(ss) == 405
    assert fsverity_digest(ss).hex() == CONFIG_SPLITSTREAM_VERITY
    assert struct.unpack_from("<8Q", ss, 32) == (112, 208, 208, 240, 388, 405, 240, 388)
    assert unzstd(ss[240:388]) == b"".join(f"{i}:{d}\0".encode() for i, d in enumerate(diff_ids))
    assert unzstd(ss[388:]) == i64(0)

    info = parse_splitstream(ss, algorithm=SHA256, content_type=ContentType.OCI_CONFIG)
    assert info.content_type == ContentType.OCI_CONFIG
    assert info.stream_size == 299
    assert info.stream_refs == tuple(layer_ids)
    assert info.object_refs == (config_id,)
    assert dict(info.named_refs) == dict(zip(diff_ids, layer_ids, strict=True))
    assert info.stream_range == (388, 405)
    assert list(iter_chunks(ss, info, lambda d: 299)) == [ExternalChunk(config_id, 299)]

    # the streaming API with add_named_ref in a different order gives the same file
    # as long as the stream ref indexes are the same
    enc = SplitStreamEncoder(SHA256, ContentType.OCI_CONFIG)
    for d in layer_ids:
        enc.add_stream_ref(d)
    for name, d in reversed(list(zip(diff_ids, layer_ids, strict=True))):
        enc.add_named_ref(name, d)
    stream = enc.external(config_id, 299) + enc.finish()
    assert enc.header(len(stream)) + stream == ss


def test_content_types() -> None:
    for ct, text in [
        (ContentType.OCI_LAYER, b"ocilayer"),
        (ContentType.OCI_CONFIG, b"ociconfg"),
        (ContentType.OCI_MANIFEST, b"ocimanif"),
        (ContentType.OCI_BLOB, b"oci_blob"),
    ]:
        assert ct.to_bytes(8, "little") == text
        assert ct.label == text.decode()
    assert describe_content_type(0) == "0x0000000000000000"
    assert describe_content_type(int.from_bytes(b"whatever", "little")) == "whatever"


# --------------------------------------------------------------------------- round trips


def roundtrip(chunks: Sequence[Chunk], algorithm: Algorithm = SHA256) -> bytes:
    ss = encode_splitstream(chunks, algorithm=algorithm, content_type=LAYER)
    info, back = decode(ss, algorithm)
    assert back == coalesce(chunks)
    assert info.stream_size == sum(
        len(c.data) if isinstance(c, InlineChunk) else c.size for c in chunks
    )
    # independent oracle for the stream section: chunk bytes built by hand, then zstd
    expected = bytearray()
    order: dict[Digest, int] = {}
    for c in coalesce(chunks):
        if isinstance(c, InlineChunk):
            expected += i64(-len(c.data)) + c.data
        else:
            expected += i64(order.setdefault(c.digest, len(order)))
    start, end = info.stream_range
    assert end == len(ss)
    assert ss[start:] == zstd_frame(bytes(expected))
    assert info.object_refs == tuple(order)
    return ss


def test_roundtrip_empty() -> None:
    ss = roundtrip([])
    assert len(ss) == 112 + 9 + 9


def test_roundtrip_inline_only() -> None:
    roundtrip([InlineChunk(b"hello "), InlineChunk(b""), InlineChunk(b"world")])


def test_roundtrip_external_only() -> None:
    roundtrip([ext(1, 10), ext(2, 0), ext(3, 1 << 40)])


def test_roundtrip_mixed_and_dedup() -> None:
    chunks: list[Chunk] = [
        ext(5, 100),
        InlineChunk(b"a" * 512),
        ext(7, 200),
        InlineChunk(b"b"),
        InlineChunk(b"c"),
        ext(5, 100),
        ext(7, 200),
        ext(6, 300),
        InlineChunk(b"d" * 1024),
    ]
    ss = roundtrip(chunks)
    info = parse_splitstream(ss, algorithm=SHA256)
    assert info.object_refs == (digest(5), digest(7), digest(6))
    decoded = unzstd(ss[info.stream_range[0] :])
    assert decoded.count(i64(0)) >= 2  # the second use of object 5 re-emits index 0


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 65535, 65536, 65537, 300_000])
def test_roundtrip_sizes(size: int) -> None:
    rnd = random.Random(size)
    data = rnd.randbytes(size)
    roundtrip([InlineChunk(data), ext(1, size), InlineChunk(data[::-1])])


def test_roundtrip_sha512() -> None:
    ss = roundtrip([InlineChunk(b"x" * 700), ext(1, 5, SHA512), ext(2, 6, SHA512)], SHA512)
    assert ss[14] == 2
    info = parse_splitstream(ss, algorithm=SHA512)
    assert info.stream_range[0] - 112 == 2 * 64 + 9
    with pytest.raises(SplitStreamError, match="algorithm id 2"):
        parse_splitstream(ss, algorithm=SHA256)


def test_named_refs_sorted_by_utf8_and_last_wins() -> None:
    enc = SplitStreamEncoder(SHA256, ContentType.OCI_MANIFEST)
    enc.add_named_ref("zeta", digest(1))
    enc.add_named_ref("\u00e9", digest(2))
    enc.add_named_ref("Alpha", digest(3))
    enc.add_named_ref("zeta", digest(4))  # replaces; digest(1) stays a stream ref
    assert enc.add_stream_ref(digest(2)) == 1
    stream = enc.finish()
    ss = enc.header(len(stream)) + stream
    info = parse_splitstream(ss, algorithm=SHA256)
    assert info.stream_refs == (digest(1), digest(2), digest(3), digest(4))
    start, end = struct.unpack_from("<2Q", ss, 32 + 48)
    assert unzstd(ss[start:end]) == "2:Alpha\x003:zeta\x001:\u00e9\x00".encode()
    assert dict(info.named_refs) == {"Alpha": digest(3), "zeta": digest(4), "\u00e9": digest(2)}


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32))
def test_streaming_api_in_random_pieces_matches_one_shot(seed: int) -> None:
    rnd = random.Random(seed)
    chunks: list[Chunk] = []
    for _ in range(rnd.randrange(12)):
        if rnd.random() < 0.5:
            chunks.append(InlineChunk(rnd.randbytes(rnd.choice([1, 7, 512, 5000, 70000]))))
        else:
            chunks.append(ext(rnd.randrange(4), rnd.randrange(10_000)))
    one_shot = encode_splitstream(chunks, algorithm=SHA256, content_type=LAYER)

    enc = SplitStreamEncoder(SHA256, LAYER)
    parts = []
    for c in coalesce(chunks):
        if isinstance(c, InlineChunk):
            parts.append(enc.begin_inline(len(c.data)))
            pos = 0
            while pos < len(c.data):
                n = rnd.choice([0, 1, 3, 511, 4096, 100_000])
                parts.append(enc.inline_data(memoryview(c.data)[pos : pos + n]))
                pos += n
        else:
            parts.append(enc.external(c.digest, c.size))
    parts.append(enc.finish())
    stream = b"".join(parts)
    assert enc.header(len(stream)) + stream == one_shot
    assert enc.stream_size == sum(
        len(c.data) if isinstance(c, InlineChunk) else c.size for c in chunks
    )
    assert enc.object_refs == list(parse_splitstream(one_shot, algorithm=SHA256).object_refs)


def reference_stream(chunks: Sequence[Chunk], pieces: Sequence[int]) -> bytes:
    """The ``stream`` section as the encoder wrote it before it gathered small pieces:
    one zstd ``compress`` call per chunk instruction and per piece of inline data (cut in
    the sizes of ``pieces``, cycled), then one flush."""
    c = zstandard.ZstdCompressor(level=3).compressobj()
    out = []
    indexes: dict[bytes, int] = {}
    cut = 0
    for chunk in coalesce(chunks):
        if isinstance(chunk, InlineChunk):
            out.append(c.compress(i64(-len(chunk.data))))
            pos = 0
            while pos < len(chunk.data):
                n = max(1, pieces[cut % len(pieces)])
                cut += 1
                out.append(c.compress(chunk.data[pos : pos + n]))
                pos += n
        else:
            index = indexes.setdefault(chunk.digest.raw, len(indexes))
            out.append(c.compress(i64(index)))
    out.append(c.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
    return b"".join(out)


def plain_stream(chunks: Sequence[Chunk]) -> bytes:
    """The decompressed ``stream`` section, written out by hand."""
    out = []
    indexes: dict[bytes, int] = {}
    for chunk in coalesce(chunks):
        if isinstance(chunk, InlineChunk):
            out.append(i64(-len(chunk.data)) + chunk.data)
        else:
            out.append(i64(indexes.setdefault(chunk.digest.raw, len(indexes))))
    return b"".join(out)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=600).map(InlineChunk),
            st.integers(1, 300_000).map(lambda n: InlineChunk(bytes(range(256)) * (n // 256))),
            st.builds(lambda n, size: ext(n, size), st.integers(0, 5), st.integers(0, 10**6)),
        ),
        max_size=40,
    ),
    st.lists(st.sampled_from([1, 7, 512, 4096, 131071, 131072, 200_000]), min_size=1, max_size=5),
)
def test_gathered_feeding_gives_the_bytes_of_one_call_per_piece(
    chunks: list[Chunk], pieces: list[int]
) -> None:
    """The encoder gathers small pieces before zstd sees them: its stream section must be
    byte for byte what feeding zstd each instruction and piece separately gives, and what
    one call over the whole decompressed stream gives (zstd cuts blocks by itself)."""
    chunks = [c for c in chunks if not isinstance(c, InlineChunk) or c.data]
    enc = SplitStreamEncoder(SHA256, LAYER)
    parts = []
    cut = 0
    for c in coalesce(chunks):
        if isinstance(c, InlineChunk):
            parts.append(enc.begin_inline(len(c.data)))
            pos = 0
            while pos < len(c.data):
                n = pieces[cut % len(pieces)]
                cut += 1
                parts.append(enc.inline_data(c.data[pos : pos + n]))
                pos += n
        else:
            parts.append(enc.external(c.digest, c.size))
    parts.append(enc.finish())
    stream = b"".join(parts)
    assert stream == reference_stream(chunks, pieces)
    assert stream == zstd_frame(plain_stream(chunks))
    assert enc.header(len(stream))  # the encoder counted what it returned


def test_encoder_misuse() -> None:
    enc = SplitStreamEncoder(SHA256, LAYER)
    with pytest.raises(InternalError, match="0 bytes"):
        enc.begin_inline(0)
    with pytest.raises(InternalError, match="inline_data"):
        enc.inline_data(b"x")
    enc.begin_inline(3)
    with pytest.raises(InternalError, match="only 3 remain"):
        enc.inline_data(b"abcd")
    enc.inline_data(b"ab")
    with pytest.raises(InternalError, match="1 bytes of the run missing"):
        enc.external(digest(1), 1)
    with pytest.raises(InternalError, match="finish"):
        enc.finish()
    enc.inline_data(b"c")
    with pytest.raises(InternalError, match="after an inline run"):
        enc.begin_inline(1)  # runs must be coalesced
    with pytest.raises(InternalError, match="sha512 digest in a sha256"):
        enc.external(digest(1, SHA512), 1)
    with pytest.raises(InternalError, match="NUL"):
        enc.add_named_ref("a\0b", digest(1))
    with pytest.raises(InternalError, match="header"):
        enc.header(0)
    out = enc.external(digest(1), 1) + enc.finish()
    with pytest.raises(InternalError, match="produced"):
        enc.header(len(out) + 1)
    with pytest.raises(InternalError, match="after finish"):
        enc.external(digest(1), 1)
    with pytest.raises(InternalError):
        SplitStreamEncoder(SHA256, -1)


# --------------------------------------------------------------------------- ChunkDecoder


def drain(dec: ChunkDecoder) -> list[Event | Sentinel]:
    events: list[Event | Sentinel] = []
    while True:
        e = dec.next_event()
        events.append(e)
        if e is NEED_DATA or e is END:
            return events


def merged(events: Iterable[Event | Sentinel]) -> list[Event | Sentinel]:
    out: list[Event | Sentinel] = []
    for e in events:
        if e is NEED_DATA:
            continue
        if isinstance(e, InlineData) and out and isinstance(out[-1], InlineData):
            out[-1] = InlineData(out[-1].data + e.data)
        else:
            out.append(e)
    return out


STREAM = i64(-5) + b"hello" + i64(0) + i64(2) + i64(-1) + b"!" + i64(1)
STREAM_EVENTS: list[Event | Sentinel] = [
    InlineData(b"hello"),
    ExternalRef(0),
    ExternalRef(2),
    InlineData(b"!"),
    ExternalRef(1),
    END,
]


def test_chunk_decoder_whole() -> None:
    dec = ChunkDecoder(3)
    dec.receive_data(STREAM)
    assert drain(dec) == [*STREAM_EVENTS[:-1], NEED_DATA]
    dec.receive_data(b"")
    assert drain(dec) == [END]
    assert dec.next_event() is END
    assert dec.offset == len(STREAM)
    with pytest.raises(InternalError):
        dec.receive_data(b"more")


def test_chunk_decoder_byte_by_byte() -> None:
    dec = ChunkDecoder(3)
    events: list[Event | Sentinel] = []
    for i in range(len(STREAM)):
        dec.receive_data(STREAM[i : i + 1])
        events += drain(dec)
    dec.receive_data(b"")
    events += drain(dec)
    assert merged(events) == STREAM_EVENTS
    # inline data was handed out as it arrived, one byte at a time
    assert events.count(InlineData(b"h")) == 1


def test_chunk_decoder_trailing_bytes() -> None:
    dec = ChunkDecoder(3)
    dec.receive_data(STREAM + b"\x01\x02\x03")
    assert drain(dec) == [*STREAM_EVENTS[:-1], NEED_DATA]
    dec.receive_data(b"")
    with pytest.raises(SplitStreamError, match=f"3 bytes into .* at byte {len(STREAM)}"):
        dec.next_event()
    with pytest.raises(SplitStreamError):  # the error sticks
        dec.next_event()


@pytest.mark.parametrize(
    ("stream", "count", "message"),
    [
        (i64(-10) + b"abc", 1, "inline chunk at byte 0 runs past the end .*7 of its bytes"),
        (i64(0) + i64(1), 1, "external chunk at byte 8 refers to object 1, but there are 1"),
        (i64(0), 0, "object 0, but there are 0"),
        (i64(-(1 << 63)), 1, "runs past the end"),
        (b"\0\0\0", 1, "data ends 3 bytes into"),
    ],
)
def test_chunk_decoder_errors(stream: bytes, count: int, message: str) -> None:
    dec = ChunkDecoder(count)
    dec.receive_data(stream)
    dec.receive_data(b"")
    with pytest.raises(SplitStreamError, match=message):
        run_to_end(dec)


def run_to_end(dec: ChunkDecoder) -> None:
    while dec.next_event() is not END:
        pass


# --------------------------------------------------------------------------- file parser


def test_parse_old_header_layout() -> None:
    chunks: list[Chunk] = [InlineChunk(b"data"), ext(1, 3)]
    new = encode_splitstream(
        chunks, algorithm=SHA256, content_type=LAYER, named_refs={"n": digest(9)}
    )
    info_new = parse_splitstream(new, algorithm=SHA256)
    # Rewrite the 32-byte header by hand as bootc <= 1.15 laid it out.
    old = struct.pack("<QQ", 32, 112) + b"\0\0" + b"SplitStream" + bytes([0, 1, 12]) + new[32:]
    assert len(old) == len(new)
    assert old[18:29] == b"SplitStream"
    info_old = parse_splitstream(old, algorithm=SHA256, content_type=LAYER)
    assert info_old.old_header
    assert not info_new.old_header
    assert attrs_equal_except_old(info_old, info_new)
    assert coalesce(iter_chunks(old, info_old, SIZES.__getitem__)) == chunks
    # the quick probe gc and copy use knows both layouts, from their first 29 bytes
    for head in (old, new):
        assert has_splitstream_magic(head[:MAGIC_PROBE_BYTES])
    assert not has_splitstream_magic(new[1:])
    assert not has_splitstream_magic(b"\x28\xb5\x2f\xfd" + new[4:])  # zstd data, not a stream
    # the hand assembler agrees
    assert parse_splitstream(assemble(old=True), algorithm=SHA256).old_header
    with pytest.raises(SplitStreamError, match="version 3"):
        parse_splitstream(assemble(old=True, version=3), algorithm=SHA256)


def attrs_equal_except_old(a: SplitStreamInfo, b: SplitStreamInfo) -> bool:
    return (a.content_type, a.stream_size, a.stream_refs, a.object_refs, dict(a.named_refs)) == (
        b.content_type,
        b.stream_size,
        b.stream_refs,
        b.object_refs,
        dict(b.named_refs),
    ) and a.stream_range == b.stream_range


def test_parse_longer_info_section() -> None:
    stream = zstd_frame(i64(-3) + b"abc" + i64(0))
    d = digest(1)
    data = assemble(object_refs=d.raw, stream=stream, stream_size=10, info_extra=b"future!!" * 3)
    info = parse_splitstream(data, algorithm=SHA256)
    assert info.object_refs == (d,)
    assert list(iter_chunks(data, info, lambda _: 7)) == [InlineChunk(b"abc"), ExternalChunk(d, 7)]


def test_parse_from_mmap(tmp_path: Path) -> None:
    ss = layer_splitstream(b"beta", 2000)
    path = tmp_path / "ss"
    path.write_bytes(ss)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        info = parse_splitstream(m, algorithm=SHA256, content_type=LAYER)
        chunks = list(iter_chunks(m, info, lambda _: 2000))
        it = iter_chunks(m, info, lambda _: 2000)
        next(it)
        it.close()
    # the mmap closed cleanly: no view of it was kept
    assert coalesce(chunks)[1] == ExternalChunk(fsverity_digest(bytes(2000)), 2000)


def nr(text: bytes) -> bytes:
    return zstd_frame(text)


D32 = digest(1).raw


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 1}, "unsupported version 1"),
        ({"algorithm_id": 2}, "algorithm id 2 in the header, but the repository uses sha256"),
        ({"lg": 16}, "block size 2\\*\\*16"),
        ({"content_type": 7}, "content type '0x0000000000000007', expected 'ocilayer'"),
        ({"override": {"info": (32, 100)}}, "info section \\[32, 100\\) is 68 bytes"),
        ({"override": {"info": (32, 9999)}}, "info range \\[32, 9999\\) runs past the end"),
        ({"override": {"object_refs": (130, 120)}}, "object_refs range \\[130, 120\\) ends before"),
        ({"override": {"stream": (100, 1 << 63)}}, "stream range .* runs past the end of the file"),
        ({"override": {"stream_refs": (0, (1 << 64) - 1)}}, "stream_refs range"),
        (
            {"object_refs": b"x" * 33},
            "object_refs section \\[112, 145\\) is 33 bytes, not a multiple",
        ),
        ({"stream_refs": b"x" * 31}, "stream_refs section \\[112, 143\\) is 31 bytes"),
        ({"named": nr(b"0:a\0")}, "index 0, but there are 0 stream refs"),
        ({"stream_refs": D32, "named": nr(b"0:a\x001:b\0")}, "record at byte 4 .*index 1"),
        ({"stream_refs": D32, "named": nr(b"0:a\0junk")}, "4 bytes of trailing junk without a NUL"),
        ({"stream_refs": D32, "named": nr(b"0:\xff\0")}, "record at byte 0 .* is not UTF-8"),
        ({"stream_refs": D32, "named": nr(b"a\0")}, "has no ':'"),
        ({"stream_refs": D32, "named": nr(b"-0:a\0")}, "non-integer index '-0'"),
        ({"stream_refs": D32, "named": nr(b"\xd9\xa1:a\0")}, "non-integer index"),
        ({"named": b"notzstd!!"}, "named_refs section at byte 112 is not a zstd frame"),
        ({"named": nr(b"") + b"x"}, "named_refs section \\[112, 122\\) has 1 bytes of trailing"),
        ({"named": nr(b"")[:-1]}, "named_refs zstd frame truncated"),
    ],
)
def test_parse_malformed(kwargs: dict[str, object], message: str) -> None:
    data = assemble(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(SplitStreamError, match=message):
        parse_splitstream(data, algorithm=SHA256, content_type=LAYER)


def test_parse_bad_magic_and_short_file() -> None:
    with pytest.raises(SplitStreamError, match="shorter than the 32-byte header"):
        parse_splitstream(b"SplitStream", algorithm=SHA256)
    with pytest.raises(SplitStreamError, match="bad magic"):
        parse_splitstream(bytes(200), algorithm=SHA256)


@pytest.mark.parametrize(
    ("stream", "stream_size", "message"),
    [
        (zstd_frame(i64(-3) + b"abc") + b"zz", 3, "2 bytes of trailing data"),
        (zstd_frame(i64(-3) + b"abc")[:-2], 3, "stream zstd frame truncated"),
        (zstd_frame(i64(-3) + b"ab"), 3, "runs past the end of the stream"),
        (zstd_frame(i64(-3) + b"abc"), 4, "reassembles to 3 bytes, but the info section says 4"),
        (zstd_frame(i64(0)), 0, "refers to object 0, but there are 0"),
        (zstd_frame(b"abc"), 0, "data ends 3 bytes into"),
        (b"", 0, "frame truncated"),
        (zstd_frame(b"") + zstd_frame(b""), 0, "trailing data"),
    ],
)
def test_stream_malformed(stream: bytes, stream_size: int, message: str) -> None:
    data = assemble(stream=stream, stream_size=stream_size)
    info = parse_splitstream(data, algorithm=SHA256)
    with pytest.raises(SplitStreamError, match=message):
        list(iter_chunks(data, info, lambda _: 0))


def test_stream_corrupt_zstd_block() -> None:
    # a raw-literals block (type 0) with a compressed-block header type (2) is garbage
    frame = bytearray(zstd_frame(i64(-40) + bytes(range(40))))
    frame[6] = (frame[6] & ~0x06) | 0x04
    data = assemble(stream=bytes(frame), stream_size=40)
    info = parse_splitstream(data, algorithm=SHA256)
    with pytest.raises(SplitStreamError, match="bad zstd data"):
        list(iter_chunks(data, info, lambda _: 0))


def test_stream_long_inline_chunk_comes_in_bounded_pieces() -> None:
    data = encode_splitstream([InlineChunk(bytes(5_000_000))], algorithm=SHA256, content_type=LAYER)
    info = parse_splitstream(data, algorithm=SHA256)
    pieces = list(iter_chunks(data, info, lambda _: 0))
    assert len(pieces) > 10
    assert all(isinstance(p, InlineChunk) and len(p.data) <= 64 * 1024 for p in pieces)
    assert sum(len(p.data) for p in pieces if isinstance(p, InlineChunk)) == 5_000_000


# --------------------------------------------------------------------------- fuzzing

SAMPLES = [
    layer_splitstream(b"alpha", 1000),
    encode_splitstream(
        [InlineChunk(bytes(range(256)) * 3), ext(1, 10), ext(2, 20), InlineChunk(b"tail")],
        algorithm=SHA256,
        content_type=LAYER,
        named_refs={"one": digest(8), "two": digest(9)},
    ),
]


def try_everything(data: bytes) -> None:
    try:
        info = parse_splitstream(data, algorithm=SHA256)
        for _ in iter_chunks(data, info, lambda _: 10):
            pass
    except SplitStreamError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 10_000),
)
def test_mutations_only_raise_splitstream_error(
    sample: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(sample)
    for pos, value in edits:
        data[pos % len(data)] = value
    try_everything(bytes(data))
    try_everything(bytes(data[: cut % (len(data) + 1)]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 3))
def test_chunk_decoder_random_input(stream: bytes, count: int) -> None:
    dec = ChunkDecoder(count)
    if stream:
        dec.receive_data(stream)
    dec.receive_data(b"")
    with contextlib.suppress(SplitStreamError):
        run_to_end(dec)


def test_parse_lenient_cases() -> None:
    """What composefs-rs accepts and never writes: an empty named_refs section, a name
    given twice (the last wins), leading zeros in an index; any buffer type."""
    assert parse_splitstream(assemble(named=b""), algorithm=SHA256).named_refs == {}
    data = assemble(stream_refs=D32 + digest(2).raw, named=nr(b"0:a\x00001:a\x000:\0"))
    for buf in (data, bytearray(data), memoryview(data)):
        info = parse_splitstream(buf, algorithm=SHA256)
        assert dict(info.named_refs) == {"a": digest(2), "": digest(1)}
    assert hash(info) == hash(parse_splitstream(data, algorithm=SHA256))


def test_mmap_closes_after_errors(tmp_path: Path) -> None:
    """No view of the buffer survives an error (mmap.close() would raise BufferError)."""
    corrupt = bytearray(zstd_frame(i64(-40) + bytes(range(40))))
    corrupt[6] = (corrupt[6] & ~0x06) | 0x04
    for i, data in enumerate(
        [
            assemble(stream=bytes(corrupt), stream_size=40),
            assemble(named=bytes(corrupt)),
            assemble(stream=zstd_frame(i64(-3) + b"ab"), stream_size=3),
            assemble(stream=zstd_frame(b"") + b"x"),
        ]
    ):
        path = tmp_path / f"bad{i}"
        path.write_bytes(data)
        with path.open("rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            with pytest.raises(SplitStreamError):
                list(iter_chunks(m, parse_splitstream(m, algorithm=SHA256), lambda _: 0))
            m.close()
