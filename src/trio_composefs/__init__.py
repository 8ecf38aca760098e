"""trio-composefs: import OCI images into a composefs repository, with trio."""

from ._errors import ComposefsError as ComposefsError
from ._version import __version__ as __version__
from .fsverity import Algorithm as Algorithm
from .fsverity import Digest as Digest
from .fsverity import FsVerityHasher as FsVerityHasher
from .fsverity import fsverity_digest as fsverity_digest
