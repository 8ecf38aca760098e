"""OCI images: the model, references, pulling, stored images and tags (layer L2).

Image sources (OCI layouts and archives, docker archives, skopeo) are in ``oci.sources``.
"""

from ._build import config_content_id as config_content_id
from ._build import ensure_oci_image as ensure_oci_image
from ._build import manifest_content_id as manifest_content_id
from ._copy import CopyStats as CopyStats
from ._copy import copy_image as copy_image
from ._image_tree import image_filesystem as image_filesystem
from ._model import MEDIA_TYPES as MEDIA_TYPES
from ._model import Descriptor as Descriptor
from ._model import ImageSource as ImageSource
from ._model import ImageSourceError as ImageSourceError
from ._model import Platform as Platform
from ._model import ResolvedImage as ResolvedImage
from ._model import SourceRef as SourceRef
from ._model import parse_source as parse_source
from ._names import OCI_REF_PREFIX as OCI_REF_PREFIX
from ._names import decode_tag as decode_tag
from ._names import encode_tag as encode_tag
from ._pull import ImageProgress as ImageProgress
from ._pull import ImageStats as ImageStats
from ._pull import open_source as open_source
from ._pull import pull_image as pull_image
from ._stored import ImageInfo as ImageInfo
from ._stored import StoredImage as StoredImage
from ._stored import list_images as list_images
from ._stored import list_tags as list_tags
from ._stored import open_image as open_image
from ._stored import resolve_tag as resolve_tag
from ._stored import tag_image as tag_image
from ._stored import untag_image as untag_image
