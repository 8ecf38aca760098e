"""The bodies of the image commands: ``images``, ``image-objects``, ``dump-files``,
``create-image``, ``compute-id``, ``create-dumpfile``, ``oci compute-id``, ``oci dump``,
and the C-compatible ``mkcomposefs`` and ``composefs-info``.

Each takes the parsed arguments and the output stream and returns the exit status;
errors are :class:`~trio_composefs._errors.ComposefsError` (one line, exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

import trio

from .._errors import ComposefsError, DigestMismatchError, VerityUnsupportedError
from ..formats import Algorithm, Digest, FsVerityHasher
from ..fs import CharDevice, Directory, ExternalFile, FileSystem, Leaf, parse_dumpfile
from ..fs import write_dumpfile as dumpfile_lines
from ..fs._dumpfile import _leaf_line, _line, escape_optional
from ..fs.erofs import iter_erofs, read_erofs
from ..fs.erofs._info import info_dump, info_ls, info_objects
from ..hashing import digest_fd
from ..repository import META_JSON, Repository, VerityOps
from ..repository import read_image as read_image_bytes
from ._commands import UsageError, _open_repo, _repo_path, _stdout_writer

__all__ = [
    "cmd_composefs_info",
    "cmd_compute_id",
    "cmd_create_dumpfile",
    "cmd_create_image",
    "cmd_dump_files",
    "cmd_image_objects",
    "cmd_images",
    "cmd_mkcomposefs",
    "cmd_oci_compute_id",
    "cmd_oci_dump",
]


def _version(repo: Repository) -> int:
    """The EROFS version to write: the repository's default when we can write it, else 1."""
    version = repo.metadata.erofs_version()
    return version if version in (0, 1) else 1


def _write_out(out: TextIO) -> Callable[[bytes], object]:
    """Bytes to ``out``: its binary buffer when it has one (stdout), else decoded."""
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        out.flush()
        return buffer.write  # type: ignore[no-any-return]
    return lambda data: out.write(data.decode("utf-8", "surrogateescape"))


def _finish(out: TextIO) -> None:
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        buffer.flush()
    out.flush()


def _read_file(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ComposefsError(f"failed to open '{path}': {e.strerror}") from None
    try:
        if os.fstat(fd).st_size == 0:
            return b""
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            return bytes(data)
    except OSError as e:
        raise ComposefsError(f"failed to read '{path}': {e.strerror}") from None
    finally:
        os.close(fd)


# --- repository images ---------------------------------------------------------------


def cmd_images(args: argparse.Namespace, out: TextIO) -> int:
    with _open_repo(args) as repo:
        images = repo.list_images()
        refs = repo.list_image_refs()
    by_image: dict[str, list[str]] = {hex_: [] for hex_ in images}
    for ref, target in sorted(refs.items()):
        by_image.setdefault(target, []).append(ref)
    rows = sorted(by_image.items(), key=lambda item: (not item[1], item[1], item[0]))
    if args.json:
        doc = {
            "images": [
                {"id": hex_, "refs": names, "present": hex_ in images} for hex_, names in rows
            ]
        }
        print(json.dumps(doc, indent=2), file=out)
        return 0
    if not rows:
        print("No images found", file=out)
        return 0
    for hex_, names in rows:
        missing = "" if hex_ in images else "  (missing)"
        print(f"{hex_}  {', '.join(names) or '-'}{missing}", file=out)
    return 0


def cmd_image_objects(args: argparse.Namespace, out: TextIO) -> int:
    from ..fs.erofs import image_objects

    with _open_repo(args) as repo:
        image = read_image_bytes(repo, args.name)
    for digest in sorted(image_objects(image), key=Digest.hex):
        print(digest.hex(), file=out)
    return 0


def _subtree_lines(
    fs: FileSystem, start: Directory, path: bytes, nlinks: dict[int, int]
) -> Iterator[bytes]:
    """Dumpfile lines of ``start`` and everything below it, named from ``path``; the
    link counts are those of the whole tree (cfsctl ``dump_single_dir``)."""
    canonical: dict[int, bytes] = {}
    stack: list[tuple[bytes, Directory | Leaf]] = [(path, start)]
    while stack:
        where, inode = stack.pop()
        if isinstance(inode, Directory):
            subdirs = sum(1 for c in inode.entries.values() if isinstance(c, Directory))
            yield _line(where, 0, inode.st_mode, 2 + subdirs, inode.stat, 0, None, None, None)
            prefix = where if where == b"/" else where + b"/"
            stack.extend((prefix + n, c) for n, c in reversed(inode.sorted_entries()))
            continue
        yield _leaf_entry(where, inode, nlinks, canonical)


def _leaf_entry(
    path: bytes, leaf: Leaf, nlinks: dict[int, int], canonical: dict[int, bytes]
) -> bytes:
    nlink = nlinks.get(id(leaf), 1)
    if nlink > 1:
        target = canonical.get(id(leaf))
        if target is not None:
            return b"%s 0 @120000 - - - - 0.0 %s - -\n" % (
                escape_optional(path),
                escape_optional(target),
            )
        canonical[id(leaf)] = path
    return _leaf_line(path, leaf, nlink)


def cmd_dump_files(args: argparse.Namespace, out: TextIO) -> int:
    with _open_repo(args) as repo:
        fs = read_erofs(read_image_bytes(repo, args.image))
    nlinks = fs.nlinks()
    write = _write_out(out)
    for name in args.files:
        raw = os.fsencode(name)
        parts = [p for p in raw.split(b"/") if p and p != b"."]
        inode: Directory | Leaf = fs.root
        for part in parts:
            child = inode.entries.get(part) if isinstance(inode, Directory) else None
            if child is None:
                raise ComposefsError(f"{name} not found in image {args.image}")
            inode = child
        path = b"/" + b"/".join(parts)
        if args.backing_path_only:
            if isinstance(inode, Directory):
                raise ComposefsError(f"{name} is a directory")
            content = inode.content
            backing = (
                content.payload or "inline"
                if isinstance(content, ExternalFile) and content.payload
                else "inline"
            )
            write(path + b" " + backing.encode() + b"\n")
            continue
        if isinstance(inode, Directory):
            for line in _subtree_lines(fs, inode, path, nlinks):
                write(line)
        else:
            write(_leaf_entry(path, inode, nlinks, {}))
    _finish(out)
    return 0


def _path_algorithm(args: argparse.Namespace) -> Algorithm:
    """cfsctl: the repository's algorithm when there is one, else SHA-512."""
    path = _repo_path(args)
    if os.path.exists(os.path.join(path, META_JSON)):
        with Repository.open(path, insecure=True if args.insecure else None) as repo:
            return repo.algorithm
    return Algorithm.SHA512


def cmd_create_image(args: argparse.Namespace, out: TextIO) -> int:
    from ..images import create_image

    with _open_repo(args) as repo:
        digest = trio.run(
            lambda: create_image(
                repo,
                args.path,
                args.name,
                version=_version(repo),
                transform=not args.no_propagate_usr_to_root,
            )
        )
    print(digest.hex(), file=out)
    return 0


def cmd_compute_id(args: argparse.Namespace, out: TextIO) -> int:
    from ..images import compute_image_id

    algorithm = _path_algorithm(args)
    digest = trio.run(
        lambda: compute_image_id(args.path, algorithm, transform=not args.no_propagate_usr_to_root)
    )
    print(digest.hex(), file=out)
    return 0


def cmd_create_dumpfile(args: argparse.Namespace, out: TextIO) -> int:
    from ..images import write_dumpfile

    algorithm = _path_algorithm(args)
    write = _write_out(out)
    trio.run(
        lambda: write_dumpfile(
            args.path, write, algorithm=algorithm, transform=not args.no_propagate_usr_to_root
        )
    )
    _finish(out)
    return 0


# --- OCI images ------------------------------------------------------------------------


def _oci_tree(repo: Repository, image: str) -> FileSystem:
    from ..oci import open_image
    from ..oci._image_tree import image_filesystem

    return image_filesystem(repo, open_image(repo, image))


def cmd_oci_compute_id(args: argparse.Namespace, out: TextIO) -> int:
    with _open_repo(args) as repo:
        fs = _oci_tree(repo, args.image)
        hasher = FsVerityHasher(repo.algorithm)
        for piece in iter_erofs(fs, version=_version(repo)):
            hasher.update(piece)
    print(hasher.digest().hex(), file=out)
    return 0


def cmd_oci_dump(args: argparse.Namespace, out: TextIO) -> int:
    with _open_repo(args) as repo:
        fs = _oci_tree(repo, args.image)
    write = _write_out(out)
    for piece in dumpfile_lines(fs):
        write(piece)
    _finish(out)
    return 0


# --- C-compatible tools -----------------------------------------------------------------


def _copy_to_store(store: str, fd: int, size: int, digest: Digest) -> None:
    """C mkcomposefs ``--digest-store``: ``STORE/XX/REST``, mode 0644, fsync'd, fs-verity
    enabled when the filesystem allows; an existing file is kept."""
    dest = os.path.join(store, digest.object_path())
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    if os.path.lexists(dest):
        return
    tmp = os.path.join(store, f".tmp{os.getpid()}-{digest.hex()[:12]}")
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        offset = 0
        while offset < size:
            n = os.copy_file_range(fd, out, size - offset, offset, offset)
            if n == 0:
                raise ComposefsError(f"a file shrank while being copied to {dest}")
            offset += n
        os.fchmod(out, 0o644)
        os.fsync(out)
    except BaseException:
        os.close(out)
        os.unlink(tmp)
        raise
    os.close(out)
    ro = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        VerityOps().enable(ro, Algorithm.SHA256)
    except ComposefsError:
        pass  # only tried, as C does
    finally:
        os.close(ro)
    os.rename(tmp, dest)


def _scan_for_mkcomposefs(args: argparse.Namespace) -> FileSystem:
    from ..images._scan import scan_directory

    store: str | None = args.digest_store

    def digest_file(fd: int, size: int) -> Digest:
        digest = digest_fd(fd, size, Algorithm.SHA256)
        if store is not None:
            _copy_to_store(store, fd, size, digest)
        return digest

    if not os.path.isdir(args.source) or os.path.islink(args.source):
        raise ComposefsError(f"error accessing {args.source}: not a directory")
    return scan_directory(args.source, digest_file=digest_file, hardlinks=False)


def _apply_build_flags(fs: FileSystem, args: argparse.Namespace) -> None:
    """C's ``--use-epoch``, ``--skip-devices``, ``--skip-xattrs``, ``--user-xattrs``."""
    from ..fs import BlockDevice

    for _path, inode in list(fs.walk()):
        if args.use_epoch:
            inode.stat.mtime = inode.stat.mtime_nsec = 0
        if args.skip_xattrs:
            inode.stat.xattrs = {}
        elif args.user_xattrs:
            xattrs = inode.stat.xattrs
            inode.stat.xattrs = {k: v for k, v in xattrs.items() if k.startswith(b"user.")}
        if args.skip_devices and isinstance(inode, Directory):
            for name, child in list(inode.entries.items()):
                if isinstance(child, Leaf) and isinstance(child.content, CharDevice | BlockDevice):
                    del inode.entries[name]


def _c_digests(fs: FileSystem) -> None:
    """C mkcomposefs knows SHA-256 only: a longer DIGEST field gives its first 32 bytes."""
    for _path, inode in fs.walk():
        if isinstance(inode, Leaf) and isinstance(inode.content, ExternalFile):
            digest = inode.content.digest
            if digest is not None and digest.algorithm is not Algorithm.SHA256:
                inode.content = ExternalFile(
                    inode.content.size,
                    Digest(Algorithm.SHA256, digest.raw[:32]),
                    inode.content.payload,
                )


def _mkcomposefs_version(args: argparse.Namespace, fs: FileSystem) -> int:
    """C ``lcfs_write_to``: start at the minimum; rise to 1 for a whiteout (a character
    device 0/0) when the maximum allows; without either option the range is 0..1, with
    one of them the other is 0."""
    if args.min_version is None and args.max_version is None:
        low, high = 0, 1
    else:
        low, high = args.min_version or 0, args.max_version or 0
    for version in (low, high):
        if not 0 <= version <= 1:
            raise ComposefsError(
                f"cannot write file: format version {version} is not supported (0 or 1)"
            )
    high = max(high, low)
    if low < 1 <= high and any(
        isinstance(inode, Leaf) and inode.content == CharDevice(0) for _p, inode in fs.walk()
    ):
        return 1
    return low


def cmd_mkcomposefs(args: argparse.Namespace, out: TextIO) -> int:
    if not args.source:
        raise UsageError("empty source path specified")
    if args.print_digest_only and args.image is not None:
        raise UsageError("cannot specify destination path with --print-digest-only")
    if not args.print_digest_only and args.image is None:
        raise UsageError("no destination path specified")
    if args.skip_xattrs and args.user_xattrs:
        raise UsageError("--skip-xattrs and --user-xattrs conflict")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"invalid threads count {args.threads}")
    to_stdout = args.image == "-"
    if to_stdout and sys.stdout is not None and sys.stdout.isatty():
        raise UsageError("stdout is a tty.  Refusing to use it")
    if args.from_file:
        if args.source == "-":
            if sys.stdin is None:
                raise UsageError("standard input is closed")
            text = sys.stdin.buffer.read()
        else:
            text = _read_file(args.source)
        if not text.strip(b"\n"):
            raise ComposefsError("No files in dump file")
        fs = parse_dumpfile(text)
        _c_digests(fs)
    else:
        fs = _scan_for_mkcomposefs(args)
    _apply_build_flags(fs, args)
    version = _mkcomposefs_version(args, fs)
    pieces = iter_erofs(fs, version=version)
    hasher = FsVerityHasher(Algorithm.SHA256)
    if args.print_digest_only:
        for piece in pieces:
            hasher.update(piece)
    elif to_stdout:
        write = _stdout_writer()
        for piece in pieces:
            hasher.update(piece)
            write(piece)
    else:
        try:
            fd = os.open(args.image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise ComposefsError(f"failed to open output file {args.image}: {e.strerror}") from None
        try:
            for piece in pieces:
                hasher.update(piece)
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    if args.print_digest or args.print_digest_only:
        print(hasher.digest().hex(), file=out)
    return 0


def _c_empty_digest() -> Digest:
    """What C 1.0.8's userspace hasher gives an empty file: a root hash over one zero
    block (fs-verity proper, and the ``fsverity`` tool, use an all-zero root hash)."""
    root = hashlib.sha256(bytes(4096)).digest()
    descriptor = struct.pack("<BBBBIQ", 1, 1, 12, 0, 0, 0) + root.ljust(64, b"\0") + bytes(176)
    return Digest(Algorithm.SHA256, hashlib.sha256(descriptor).digest())


_C_EMPTY_DIGEST = _c_empty_digest()


def _measure(path: str) -> Digest:
    """C ``lcfs_fd_get_fsverity``: the kernel's SHA-256 fs-verity digest, or computed here
    when the file has no fs-verity."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ComposefsError(f"Failed to open '{path}': {e.strerror}") from None
    try:
        try:
            measured = VerityOps().measure(fd, Algorithm.SHA256)
        except VerityUnsupportedError:
            measured = None
        except DigestMismatchError as e:
            raise ComposefsError(f"failed to measure '{path}': {e}") from None
        if measured is not None:
            return measured
        size = os.fstat(fd).st_size
        if size == 0:
            return _C_EMPTY_DIGEST
        return digest_fd(fd, size, Algorithm.SHA256)
    except OSError as e:
        raise ComposefsError(f"failed to measure '{path}': {e.strerror}") from None
    finally:
        os.close(fd)


def cmd_composefs_info(args: argparse.Namespace, out: TextIO) -> int:
    write = _write_out(out)
    if args.info_command == "measure-file":
        for path in args.files:
            write(_measure(path).hex().encode() + b"\n")
        _finish(out)
        return 0
    images: Iterable[bytes] = (_read_file(path) for path in args.files)
    if args.info_command in ("objects", "missing-objects"):
        found = info_objects(images)
        if args.info_command == "missing-objects":
            found = [p for p in found if not _present(args.basedir, p[:-1])]
        for line in found:
            write(line)
    else:
        render = info_dump if args.info_command == "dump" else info_ls
        for image in images:
            for line in render(image):
                write(line)
    _finish(out)
    return 0


def _present(basedir: str | None, payload: bytes) -> bool:
    """C ``missing-objects``: an object is present when ``fstatat(basedir, payload)``
    (leading ``/`` dropped, symlinks followed) succeeds."""
    if basedir is None:
        return False
    try:
        os.stat(os.path.join(os.fsencode(basedir), payload.lstrip(b"/")))
    except OSError:
        return False
    return True
