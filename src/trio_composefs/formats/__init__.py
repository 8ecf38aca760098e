"""Byte formats, sans-IO (layer L0): fs-verity digests, tar headers, the tar splitter and
its entries, chunks, splitstreams.

Nothing here imports trio, ``os``, threads, sockets or subprocesses; a test enforces it.
Each codec is fed input and returns events (h11's ``receive_data``/``next_event`` shape):
:class:`TarSplitter` (events :data:`TarEvent`), :class:`EntryReader` (entries) and
:class:`ChunkDecoder` (events :data:`ChunkEvent`) share one vocabulary, the
:class:`Sentinel` values :data:`NEED_DATA` and :data:`END`; input after the end raises
:class:`~trio_composefs.DataAfterEndError` in each.

This ``__init__`` is lazy (PEP 562), like the root's: a hash worker imports ``_fsverity``
alone, not zstandard and the codecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _lazy

if TYPE_CHECKING:
    from ._chunks import Chunk as Chunk
    from ._chunks import ExternalChunk as ExternalChunk
    from ._chunks import InlineChunk as InlineChunk
    from ._fsverity import BLOCK_SIZE as BLOCK_SIZE
    from ._fsverity import Algorithm as Algorithm
    from ._fsverity import Digest as Digest
    from ._fsverity import FsVerityHasher as FsVerityHasher
    from ._fsverity import descriptor_digest as descriptor_digest
    from ._fsverity import digest_from_level1 as digest_from_level1
    from ._fsverity import fsverity_digest as fsverity_digest
    from ._fsverity import level1_digests as level1_digests
    from ._fsverity import level1_group_size as level1_group_size
    from ._sentinels import END as END
    from ._sentinels import NEED_DATA as NEED_DATA
    from ._sentinels import Sentinel as Sentinel
    from ._sha256id import Sha256Id as Sha256Id
    from ._splitstream import ChunkDecoder as ChunkDecoder
    from ._splitstream import ChunkEvent as ChunkEvent
    from ._splitstream import ContentType as ContentType
    from ._splitstream import ExternalRef as ExternalRef
    from ._splitstream import InlineData as InlineData
    from ._splitstream import SplitStreamEncoder as SplitStreamEncoder
    from ._splitstream import SplitStreamInfo as SplitStreamInfo
    from ._splitstream import describe_content_type as describe_content_type
    from ._splitstream import encode_splitstream as encode_splitstream
    from ._splitstream import iter_chunks as iter_chunks
    from ._splitstream import parse_splitstream as parse_splitstream
    from ._tarentries import EntryReader as EntryReader
    from ._tarentries import EntryType as EntryType
    from ._tarentries import SplitterEntries as SplitterEntries
    from ._tarentries import TarEntry as TarEntry
    from ._tarentries import entry_from_header as entry_from_header
    from ._tarentries import iter_entries as iter_entries
    from ._tarentries import normalize_path as normalize_path
    from ._tarheader import TarHeader as TarHeader
    from ._tarsplit import INLINE_MAX as INLINE_MAX
    from ._tarsplit import FileData as FileData
    from ._tarsplit import FileEnd as FileEnd
    from ._tarsplit import FileStart as FileStart
    from ._tarsplit import Inline as Inline
    from ._tarsplit import TarEvent as TarEvent
    from ._tarsplit import TarSplitter as TarSplitter

_LAZY: dict[str, str] = {
    "Chunk": "._chunks",
    "ExternalChunk": "._chunks",
    "InlineChunk": "._chunks",
    "BLOCK_SIZE": "._fsverity",
    "Algorithm": "._fsverity",
    "Digest": "._fsverity",
    "FsVerityHasher": "._fsverity",
    "descriptor_digest": "._fsverity",
    "digest_from_level1": "._fsverity",
    "fsverity_digest": "._fsverity",
    "level1_digests": "._fsverity",
    "level1_group_size": "._fsverity",
    "END": "._sentinels",
    "NEED_DATA": "._sentinels",
    "Sentinel": "._sentinels",
    "Sha256Id": "._sha256id",
    "ChunkDecoder": "._splitstream",
    "ChunkEvent": "._splitstream",
    "ContentType": "._splitstream",
    "ExternalRef": "._splitstream",
    "InlineData": "._splitstream",
    "SplitStreamEncoder": "._splitstream",
    "SplitStreamInfo": "._splitstream",
    "describe_content_type": "._splitstream",
    "encode_splitstream": "._splitstream",
    "iter_chunks": "._splitstream",
    "parse_splitstream": "._splitstream",
    "EntryReader": "._tarentries",
    "EntryType": "._tarentries",
    "SplitterEntries": "._tarentries",
    "entry_from_header": "._tarentries",
    "TarEntry": "._tarentries",
    "iter_entries": "._tarentries",
    "normalize_path": "._tarentries",
    "TarHeader": "._tarheader",
    "INLINE_MAX": "._tarsplit",
    "FileData": "._tarsplit",
    "FileEnd": "._tarsplit",
    "FileStart": "._tarsplit",
    "Inline": "._tarsplit",
    "TarEvent": "._tarsplit",
    "TarSplitter": "._tarsplit",
}

__all__ = [
    "Algorithm",
    "BLOCK_SIZE",
    "Chunk",
    "ChunkDecoder",
    "ChunkEvent",
    "ContentType",
    "Digest",
    "END",
    "EntryReader",
    "EntryType",
    "ExternalChunk",
    "ExternalRef",
    "FileData",
    "FileEnd",
    "FileStart",
    "FsVerityHasher",
    "Sha256Id",
    "INLINE_MAX",
    "Inline",
    "InlineChunk",
    "InlineData",
    "NEED_DATA",
    "Sentinel",
    "SplitStreamEncoder",
    "SplitStreamInfo",
    "SplitterEntries",
    "TarEntry",
    "TarEvent",
    "TarHeader",
    "TarSplitter",
    "describe_content_type",
    "descriptor_digest",
    "digest_from_level1",
    "encode_splitstream",
    "entry_from_header",
    "fsverity_digest",
    "iter_chunks",
    "iter_entries",
    "level1_digests",
    "level1_group_size",
    "normalize_path",
    "parse_splitstream",
]


def __getattr__(name: str) -> object:
    return _lazy.load(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return _lazy.names(__name__, __all__)
