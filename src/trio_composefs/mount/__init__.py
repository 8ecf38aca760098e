"""Mounting composefs images with the kernel (EROFS + overlayfs with a data-only layer).

* :func:`mount_image_file` / :func:`unmount`: blocking (``_kernel``, no trio).
* :func:`mounted`: an async context manager that mounts in a thread and
  unmounts on exit, also when cancelled (``_async``).

Both take paths or open fds for the image and the objects directory, so a
repository layer can hand over ``images/<hex>`` and ``objects/`` opened
relative to its own directory fd.
"""

from .._errors import MountError as MountError
from ._async import mounted as mounted
from ._kernel import MountMethod as MountMethod
from ._kernel import MountResult as MountResult
from ._kernel import kernel_filesystems as kernel_filesystems
from ._kernel import mount_image_file as mount_image_file
from ._kernel import unmount as unmount
