"""The composefs repository on disk (layer L1: blocking I/O, never trio).

``Repository`` owns the layout (``objects/XX/…``, ``streams/``, ``streams/refs/``,
``images/``, spelled only in ``_layout``); ``open_splitstream``/``copy_stream``/
``iter_layer_entries`` read stored streams back;
``VerityOps`` wraps the fs-verity ioctls.
"""

from ._images import read_image as read_image
from ._images import referenced_objects as referenced_objects
from ._images import store_image as store_image
from ._layout import IMAGES as IMAGES
from ._layout import LAYOUT as LAYOUT
from ._layout import META_JSON as META_JSON
from ._layout import OBJECTS as OBJECTS
from ._layout import REFS as REFS
from ._layout import STREAMS as STREAMS
from ._layout import TMP_OBJECT_PREFIX as TMP_OBJECT_PREFIX
from ._layout import TMP_SPOOL_PREFIX as TMP_SPOOL_PREFIX
from ._layout import TMP_SYMLINK_PREFIX as TMP_SYMLINK_PREFIX
from ._layout import image_path as image_path
from ._layout import image_ref_path as image_ref_path
from ._layout import object_entry_path as object_entry_path
from ._layout import object_path as object_path
from ._layout import stream_path as stream_path
from ._layout import stream_ref_path as stream_ref_path
from ._meta import RepoMetadata as RepoMetadata
from ._reading import copy_stream as copy_stream
from ._reading import iter_layer_entries as iter_layer_entries
from ._reading import open_splitstream as open_splitstream
from ._reading import read_stream_info as read_stream_info
from ._reading import stream_chunks as stream_chunks
from ._reading import stream_is_complete as stream_is_complete
from ._reading import usable_stream as usable_stream
from ._repository import ObjectEntry as ObjectEntry
from ._repository import ObjectTmpfile as ObjectTmpfile
from ._repository import RefEntry as RefEntry
from ._repository import Repository as Repository
from ._repository import check_ref_name as check_ref_name
from ._verity import EnableResult as EnableResult
from ._verity import VerityOps as VerityOps
