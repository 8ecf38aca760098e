"""The composefs repository on disk (layer L1: blocking I/O, never trio).

``Repository`` owns the layout (``objects/XX/…``, ``streams/``, ``streams/refs/``,
``images/``); ``open_splitstream``/``copy_stream``/``iter_layer_entries`` read stored streams back;
``VerityOps`` wraps the fs-verity ioctls.
"""

from ._images import read_image as read_image
from ._images import referenced_objects as referenced_objects
from ._images import store_image as store_image
from ._meta import RepoMetadata as RepoMetadata
from ._reading import copy_stream as copy_stream
from ._reading import iter_layer_entries as iter_layer_entries
from ._reading import open_splitstream as open_splitstream
from ._reading import stream_chunks as stream_chunks
from ._reading import stream_is_complete as stream_is_complete
from ._reading import usable_stream as usable_stream
from ._repository import ObjectTmpfile as ObjectTmpfile
from ._repository import Repository as Repository
from ._repository import check_ref_name as check_ref_name
from ._verity import EnableResult as EnableResult
from ._verity import VerityOps as VerityOps
