"""Storing and reading composefs EROFS images as repository objects (blocking, no trio).

An image is an ordinary object (named by the fs-verity digest of its bytes: the
*image ID*) plus the link ``images/<hex>`` made by :meth:`Repository.publish_image`.
The image is streamed into the object as the writer produces it and hashed on the
way, so a million-entry tree never needs the image in memory.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

from ..formats._fsverity import Digest, FsVerityHasher
from ..fs import FileSystem
from ..fs.erofs import image_objects, iter_erofs
from ._repository import Repository
from ._writing import write_object

__all__ = ["read_image", "referenced_objects", "store_image"]


def store_image(repo: Repository, fs: FileSystem, *, version: int = 1) -> Digest:
    """Write ``fs`` as a composefs EROFS (``version`` 1 or 0) into an object; its image ID.

    Nothing is named: publish it with :meth:`Repository.publish_image` (after a sync).
    """
    hasher = FsVerityHasher(repo.algorithm)

    def pieces() -> Iterator[bytes]:
        for piece in iter_erofs(fs, version=version):
            hasher.update(piece)
            yield piece

    digest, _present = write_object(repo, pieces(), digester=lambda _fd, _size: hasher.digest())
    return digest


def read_image(repo: Repository, name: str) -> bytes:
    """The bytes of the image ``name`` (digest, ``refs/...`` or ref name)."""
    _digest, fd = repo.open_image(name)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return b""
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            return bytes(data)
    finally:
        os.close(fd)


def referenced_objects(repo: Repository, image: Digest) -> set[Digest]:
    """The objects the stored image ``image`` references (its external files)."""
    fd = repo.open_object(image)
    try:
        if os.fstat(fd).st_size == 0:
            return set()
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data, memoryview(data) as view:
            return image_objects(view)
    finally:
        os.close(fd)
