"""composefs EROFS images (pure, sans-IO): the V1/V0 writer.

:func:`write_erofs` / :func:`iter_erofs` give the image of a :class:`~trio_composefs.fs.FileSystem`
byte-identical to C ``mkcomposefs`` 1.0.8; :func:`compute_image_id` its fs-verity
digest. The byte layout is documented in ``_format``.
"""

from ._reader import ErofsHeader as ErofsHeader
from ._reader import image_objects as image_objects
from ._reader import read_erofs as read_erofs
from ._reader import read_erofs_header as read_erofs_header
from ._writer import compute_image_id as compute_image_id
from ._writer import iter_erofs as iter_erofs
from ._writer import metacopy_xattr as metacopy_xattr
from ._writer import write_erofs as write_erofs
