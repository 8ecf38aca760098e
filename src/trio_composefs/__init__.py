"""trio-composefs: import OCI images into a composefs repository, with trio.

The public API is re-exported here; submodules whose names start with ``_`` are
private.
"""

from ._chunks import Chunk as Chunk
from ._chunks import ExternalChunk as ExternalChunk
from ._chunks import InlineChunk as InlineChunk
from ._errors import ComposefsError as ComposefsError
from ._errors import DigestError as DigestError
from ._errors import DigestMismatchError as DigestMismatchError
from ._errors import FormatError as FormatError
from ._errors import InternalError as InternalError
from ._errors import MountError as MountError
from ._errors import ObjectNotFoundError as ObjectNotFoundError
from ._errors import RepositoryError as RepositoryError
from ._errors import SplitStreamError as SplitStreamError
from ._errors import TarError as TarError
from ._errors import VerityUnsupportedError as VerityUnsupportedError
from ._sources import ByteSource as ByteSource
from ._version import __version__ as __version__
from .builder import PendingObject as PendingObject
from .builder import SplitStreamBuilder as SplitStreamBuilder
from .fsck import FsckReport as FsckReport
from .fsck import fsck as fsck
from .fsverity import Algorithm as Algorithm
from .fsverity import Digest as Digest
from .fsverity import FsVerityHasher as FsVerityHasher
from .fsverity import fsverity_digest as fsverity_digest
from .gc import GcResult as GcResult
from .gc import gc as gc
from .hashpool import HashPool as HashPool
from .hashpool import digest_fd as digest_fd
from .layer import Importer as Importer
from .layer import LayerProgress as LayerProgress
from .layer import LayerStats as LayerStats
from .layer import default_jobs as default_jobs
from .layer import import_layer as import_layer
from .layer import layer_content_id as layer_content_id
from .layer import open_importer as open_importer
from .oci import ImageProgress as ImageProgress
from .oci import ImageStats as ImageStats
from .oci import list_images as list_images
from .oci import open_image as open_image
from .oci import open_source as open_source
from .oci import pull_image as pull_image
from .oci_layout import OciLayoutSource as OciLayoutSource
from .oci_source import Descriptor as Descriptor
from .oci_source import ImageSource as ImageSource
from .oci_source import Platform as Platform
from .oci_source import parse_source as parse_source
from .reassemble import copy_stream as copy_stream
from .reassemble import iter_layer_entries as iter_layer_entries
from .repository import ObjectTmpfile as ObjectTmpfile
from .repository import Repository as Repository
from .splitstream import ContentType as ContentType
from .splitstream import SplitStreamEncoder as SplitStreamEncoder
from .splitstream import SplitStreamInfo as SplitStreamInfo
from .splitstream import parse_splitstream as parse_splitstream
from .tarentry import EntryType as EntryType
from .tarentry import TarEntry as TarEntry
from .tarentry import iter_entries as iter_entries
from .tarsplit import TarSplitter as TarSplitter
