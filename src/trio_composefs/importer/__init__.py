"""Importing one tar layer into a repository: the trio shell (layer L2).

A ``ByteSource`` is read (and decompressed) by the reader, split by ``formats.TarSplitter``,
hashed by ``hashing.HashPool`` and written by the writers; ``SplitStreamBuilder`` encodes the
layer's splitstream. ``Importer``/``open_importer`` drive it.
"""

from ._builder import PendingObject as PendingObject
from ._builder import SplitStreamBuilder as SplitStreamBuilder
from ._bytesource import ByteSource as ByteSource
from ._decompress import Compression as Compression
from ._decompress import open_verified_stream as open_verified_stream
from ._entries import EntryRun as EntryRun
from ._entries import EntrySink as EntrySink
from ._importer import Importer as Importer
from ._importer import LayerProgress as LayerProgress
from ._importer import LayerStats as LayerStats
from ._importer import default_jobs as default_jobs
from ._importer import import_layer as import_layer
from ._importer import layer_content_id as layer_content_id
from ._importer import open_importer as open_importer
