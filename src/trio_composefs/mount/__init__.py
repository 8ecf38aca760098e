"""Mounting composefs images with the kernel (EROFS + overlayfs with a data-only layer).

* :func:`mount_image_file` / :func:`unmount`: blocking (``_kernel``, no trio).
* :func:`mounted`: an async context manager that mounts in a thread and
  unmounts on exit, also when cancelled (``_async``).

Both take paths or open fds for the image and the objects directory, so a
repository layer can hand over ``images/<hex>`` and ``objects/`` opened
relative to its own directory fd.
* :func:`mount_image` / :func:`mounted_image`: a repository's image by digest or
  ref name, ``verity=require`` when the repository is secure; the context manager
  holds the repository's shared lock while mounted, so gc waits (``_repo``).
* :func:`hold_shared_lock`: that lock alone (``trio-cfsctl transaction``).
"""

from .._errors import MountError as MountError
from ._async import mounted as mounted
from ._kernel import MountMethod as MountMethod
from ._kernel import MountResult as MountResult
from ._kernel import kernel_filesystems as kernel_filesystems
from ._kernel import mount_image_file as mount_image_file
from ._kernel import unmount as unmount
from ._repo import hold_shared_lock as hold_shared_lock
from ._repo import mount_image as mount_image
from ._repo import mounted_image as mounted_image
