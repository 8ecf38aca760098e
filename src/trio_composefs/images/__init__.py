"""composefs images from directory trees, and the image commands of the library.

:func:`create_image` (cfsctl ``create-image``), :func:`compute_image_id`
(``compute-id``), :func:`write_dumpfile` (``create-dumpfile``) and :func:`read_image`
(the tree of a stored image): async, their blocking work in a worker thread.
"""

from ._api import compute_image_id as compute_image_id
from ._api import create_image as create_image
from ._api import read_image as read_image
from ._api import write_dumpfile as write_dumpfile
