"""trio-composefs: import OCI images into a composefs repository, with trio.

The public API is re-exported here. The root is lazy (PEP 562): a name is imported from its
sub-package on first use, so ``import trio_composefs.formats`` (pure, sans-IO) does not
import trio. The sub-packages, one layer each (a module imports only from layers below):

- L0 ``formats`` (byte formats) and ``fs`` (filesystem trees): pure, never trio or ``os``;
- L1 ``hashing`` (the fs-verity process pool) and ``repository``: blocking I/O, never trio;
- L2 ``importer``, ``oci`` (with ``oci.sources``), ``maintenance`` (fsck, gc), ``mount``: the
  trio shell;
- L3 ``cli``; and ``testing``, public test support.

Modules whose names start with ``_`` are private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _lazy
from ._errors import ComposefsError as ComposefsError
from ._errors import DataAfterEndError as DataAfterEndError
from ._errors import DigestError as DigestError
from ._errors import DigestMismatchError as DigestMismatchError
from ._errors import DumpfileError as DumpfileError
from ._errors import ErofsError as ErofsError
from ._errors import ErofsWriteError as ErofsWriteError
from ._errors import FormatError as FormatError
from ._errors import ImageSourceError as ImageSourceError
from ._errors import InternalError as InternalError
from ._errors import InvalidNameError as InvalidNameError
from ._errors import LockTimeoutError as LockTimeoutError
from ._errors import MountError as MountError
from ._errors import ObjectNotFoundError as ObjectNotFoundError
from ._errors import RepositoryError as RepositoryError
from ._errors import ScanError as ScanError
from ._errors import SplitStreamError as SplitStreamError
from ._errors import TarError as TarError
from ._errors import TreeError as TreeError
from ._errors import UnsafeLayoutError as UnsafeLayoutError
from ._errors import VerityUnsupportedError as VerityUnsupportedError
from ._version import __version__ as __version__

if TYPE_CHECKING:
    from .formats import Algorithm as Algorithm
    from .formats import Chunk as Chunk
    from .formats import ContentType as ContentType
    from .formats import Digest as Digest
    from .formats import EntryType as EntryType
    from .formats import ExternalChunk as ExternalChunk
    from .formats import FsVerityHasher as FsVerityHasher
    from .formats import InlineChunk as InlineChunk
    from .formats import SplitStreamEncoder as SplitStreamEncoder
    from .formats import SplitStreamInfo as SplitStreamInfo
    from .formats import TarEntry as TarEntry
    from .formats import TarSplitter as TarSplitter
    from .formats import fsverity_digest as fsverity_digest
    from .formats import iter_entries as iter_entries
    from .formats import parse_splitstream as parse_splitstream
    from .hashing import HashPool as HashPool
    from .hashing import digest_fd as digest_fd
    from .images import compute_image_id as compute_image_id
    from .images import create_image as create_image
    from .images import read_image as read_image
    from .images import write_dumpfile as write_dumpfile
    from .importer import ByteSource as ByteSource
    from .importer import Importer as Importer
    from .importer import LayerProgress as LayerProgress
    from .importer import LayerStats as LayerStats
    from .importer import PendingObject as PendingObject
    from .importer import SplitStreamBuilder as SplitStreamBuilder
    from .importer import default_jobs as default_jobs
    from .importer import import_layer as import_layer
    from .importer import layer_content_id as layer_content_id
    from .importer import open_importer as open_importer
    from .maintenance import FsckKind as FsckKind
    from .maintenance import FsckReport as FsckReport
    from .maintenance import GcResult as GcResult
    from .maintenance import fsck as fsck
    from .maintenance import gc as gc
    from .mount import MountResult as MountResult
    from .mount import mount_image as mount_image
    from .mount import mounted_image as mounted_image
    from .oci import Descriptor as Descriptor
    from .oci import ImageProgress as ImageProgress
    from .oci import ImageSource as ImageSource
    from .oci import ImageStats as ImageStats
    from .oci import Platform as Platform
    from .oci import list_images as list_images
    from .oci import open_image as open_image
    from .oci import open_source as open_source
    from .oci import parse_source as parse_source
    from .oci import pull_image as pull_image
    from .oci.sources import OciLayoutSource as OciLayoutSource
    from .repository import ObjectTmpfile as ObjectTmpfile
    from .repository import Repository as Repository
    from .repository import copy_stream as copy_stream
    from .repository import iter_layer_entries as iter_layer_entries

#: Where each lazily imported public name lives (relative to this package).
_LAZY: dict[str, str] = {
    "Algorithm": ".formats",
    "Chunk": ".formats",
    "ContentType": ".formats",
    "Digest": ".formats",
    "EntryType": ".formats",
    "ExternalChunk": ".formats",
    "FsVerityHasher": ".formats",
    "InlineChunk": ".formats",
    "SplitStreamEncoder": ".formats",
    "SplitStreamInfo": ".formats",
    "TarEntry": ".formats",
    "TarSplitter": ".formats",
    "fsverity_digest": ".formats",
    "iter_entries": ".formats",
    "parse_splitstream": ".formats",
    "HashPool": ".hashing",
    "digest_fd": ".hashing",
    "compute_image_id": ".images",
    "create_image": ".images",
    "read_image": ".images",
    "write_dumpfile": ".images",
    "ByteSource": ".importer",
    "Importer": ".importer",
    "LayerProgress": ".importer",
    "LayerStats": ".importer",
    "PendingObject": ".importer",
    "SplitStreamBuilder": ".importer",
    "default_jobs": ".importer",
    "import_layer": ".importer",
    "layer_content_id": ".importer",
    "open_importer": ".importer",
    "FsckKind": ".maintenance",
    "FsckReport": ".maintenance",
    "GcResult": ".maintenance",
    "fsck": ".maintenance",
    "gc": ".maintenance",
    "MountResult": ".mount",
    "mount_image": ".mount",
    "mounted_image": ".mount",
    "Descriptor": ".oci",
    "ImageProgress": ".oci",
    "ImageSource": ".oci",
    "ImageStats": ".oci",
    "Platform": ".oci",
    "list_images": ".oci",
    "open_image": ".oci",
    "open_source": ".oci",
    "parse_source": ".oci",
    "pull_image": ".oci",
    "OciLayoutSource": ".oci.sources",
    "ObjectTmpfile": ".repository",
    "Repository": ".repository",
    "copy_stream": ".repository",
    "iter_layer_entries": ".repository",
}

__all__ = [
    "Algorithm",
    "ByteSource",
    "Chunk",
    "ComposefsError",
    "ContentType",
    "Descriptor",
    "Digest",
    "DataAfterEndError",
    "DigestError",
    "DigestMismatchError",
    "DumpfileError",
    "EntryType",
    "ErofsError",
    "ErofsWriteError",
    "ExternalChunk",
    "FormatError",
    "FsVerityHasher",
    "FsckKind",
    "FsckReport",
    "GcResult",
    "HashPool",
    "ImageProgress",
    "ImageSource",
    "ImageSourceError",
    "ImageStats",
    "Importer",
    "InlineChunk",
    "InternalError",
    "InvalidNameError",
    "LockTimeoutError",
    "LayerProgress",
    "LayerStats",
    "MountError",
    "MountResult",
    "ObjectNotFoundError",
    "ObjectTmpfile",
    "OciLayoutSource",
    "PendingObject",
    "Platform",
    "Repository",
    "RepositoryError",
    "UnsafeLayoutError",
    "ScanError",
    "SplitStreamBuilder",
    "SplitStreamEncoder",
    "SplitStreamError",
    "SplitStreamInfo",
    "TarEntry",
    "TarError",
    "TarSplitter",
    "TreeError",
    "VerityUnsupportedError",
    "__version__",
    "compute_image_id",
    "copy_stream",
    "create_image",
    "default_jobs",
    "digest_fd",
    "fsck",
    "fsverity_digest",
    "gc",
    "import_layer",
    "iter_entries",
    "iter_layer_entries",
    "layer_content_id",
    "list_images",
    "mount_image",
    "mounted_image",
    "open_image",
    "open_importer",
    "open_source",
    "parse_source",
    "parse_splitstream",
    "pull_image",
    "read_image",
    "write_dumpfile",
]


def __getattr__(name: str) -> object:
    return _lazy.load(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return _lazy.names(__name__, __all__)
