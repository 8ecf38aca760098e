"""Garbage collection: delete what no ref reaches, as composefs-rs's ``Repository::gc``.

Roots are every symlink under ``streams/refs/`` and ``images/refs/``
(recursively) plus the names the caller adds (first-level stream or image
names). From each root stream, its own object, every entry of its
``object_refs`` and every stream ref are live; a stream ref that is a
first-level stream (found through the map object → name built from
``streams/*``) is walked in turn. Then:

1. every file of ``objects/XX/`` that is not live is deleted (sizes summed);
2. temporary files of interrupted writers are deleted (``objects/.tmp-object-*``,
   ``.tmp-spool-*``, ``.symlink-*``), which composefs-rs leaves alone;
3. dangling symlinks are pruned: first-level ``streams/`` and ``images/``,
   then recursively under their ``refs/``.

Differences from composefs-rs, each keeping more, never less: all stream refs
are kept alive, not only the named ones; and EROFS images are not parsed (this
project does not build them yet). An image root keeps its own object and every
object whose path ``/XX/<rest>`` appears in the image's bytes, which is where
composefs images store their ``trusted.overlay.redirect`` xattrs: a superset of
what composefs-rs's ``collect_objects`` returns.

The whole collection runs under the repository's *exclusive* lock, which waits
for every other open repository (running imports hold the shared lock), so an
object that an import in flight is about to name is never deleted. A dry run
keeps the shared lock and deletes nothing.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable

import attrs

from .._errors import ComposefsError, DigestError, RepositoryError
from ..formats._fsverity import Digest
from ..formats._splitstream import parse_splitstream
from ..repository._repository import TMP_SYMLINK_PREFIX, Repository
from ._fsck import _scan, _walk_refs, stray_tmpfiles

__all__ = ["GcResult", "gc"]

_HEX2 = re.compile(r"[0-9a-f]{2}")


@attrs.frozen
class GcResult:
    """What :func:`gc` removed (or, in a dry run, would remove).

    Attributes:
        dry_run: nothing was deleted.
        objects_removed: unreachable objects, as ``objects/XX/<rest>`` paths.
        objects_bytes: their total size.
        tmpfiles_removed: temporary files left by interrupted writers.
        tmpfiles_bytes: their total size.
        links_pruned: dangling symlinks (``streams/...``, ``images/...``).
        live_objects: objects kept because a root reaches them.
        notes: things worth saying (ignored entries, image handling).
    """

    dry_run: bool
    objects_removed: tuple[str, ...]
    objects_bytes: int
    tmpfiles_removed: tuple[str, ...]
    tmpfiles_bytes: int
    links_pruned: tuple[str, ...]
    live_objects: int
    notes: tuple[str, ...] = ()

    @property
    def bytes_freed(self) -> int:
        return self.objects_bytes + self.tmpfiles_bytes

    @property
    def streams_pruned(self) -> int:
        """Pruned links under ``streams/`` (composefs-rs's counter)."""
        return sum(1 for p in self.links_pruned if p.startswith("streams/"))

    @property
    def images_pruned(self) -> int:
        """Pruned links under ``images/`` (composefs-rs's counter)."""
        return sum(1 for p in self.links_pruned if p.startswith("images/"))

    def to_json(self) -> dict[str, object]:
        return {
            "dryRun": self.dry_run,
            "objectsRemoved": len(self.objects_removed),
            "objectsBytes": self.objects_bytes,
            "tmpfilesRemoved": list(self.tmpfiles_removed),
            "tmpfilesBytes": self.tmpfiles_bytes,
            "streamsPruned": self.streams_pruned,
            "imagesPruned": self.images_pruned,
            "linksPruned": list(self.links_pruned),
            "liveObjects": self.live_objects,
            "removedObjects": list(self.objects_removed),
            "notes": list(self.notes),
        }


def gc(
    repo: Repository,
    roots: Iterable[str] = (),
    *,
    dry_run: bool = False,
    on_wait: Callable[[], object] | None = None,
) -> GcResult:
    """Remove every object, temporary file and link that no root reaches.

    Blocking (call it from a thread under trio). Unless ``dry_run``, it first
    takes the repository's exclusive lock, waiting for every other open
    repository to close (``on_wait`` is called once if it has to wait), and
    goes back to the shared lock when done.

    The lock is per open repository: it excludes every *other* open
    :class:`Repository` (in any process), not concurrent writers that share
    ``repo`` itself, so do not import through ``repo`` while this runs.

    Args:
        repo: an open, writable repository.
        roots: extra roots: first-level stream or image names.
        dry_run: only report what would be removed.

    Raises:
        RepositoryError: a root names no stream or image, or a root stream
            cannot be parsed (nothing is deleted then: run ``fsck``).
    """
    roots = list(roots)
    if dry_run:
        return _collect(repo, roots, dry_run=True)
    repo.ensure_writable()
    with repo.exclusive_lock(on_wait=on_wait):
        return _collect(repo, roots, dry_run=False)


def _first_level(repo: Repository, top: str) -> dict[str, Digest]:
    """``{name: object}`` for the first-level symlinks of ``top`` that name an object."""
    out: dict[str, Digest] = {}
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=repo.dirfd)
    except FileNotFoundError:
        return out
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it if e.is_symlink()]
        n = 2 * repo.algorithm.digest_size + 1
        for name in names:
            if name.startswith(TMP_SYMLINK_PREFIX):
                continue
            target = os.readlink(name, dir_fd=fd)
            with contextlib.suppress(DigestError):
                out[name] = Digest.from_object_path(target[-n:], repo.algorithm)
    finally:
        os.close(fd)
    return out


def _ref_roots(repo: Repository, top: str) -> list[str]:
    """First-level names that the refs under ``top/refs`` point at (by target basename)."""
    out = []
    for rel, mode in _walk_refs(repo.dirfd, f"{top}/refs"):
        if stat.S_ISLNK(mode):
            target = os.readlink(f"{top}/refs/{rel}", dir_fd=repo.dirfd)
            base = posixpath.basename(target)
            if base not in ("", ".", ".."):
                out.append(base)
    return out


def _image_objects(repo: Repository, digest: Digest) -> set[Digest]:
    """Objects an EROFS image may reference: every ``/XX/<rest>`` path in its bytes."""
    rest = 2 * repo.algorithm.digest_size - 2
    pattern = re.compile(rb"/([0-9a-f]{2})/([0-9a-f]{%d})(?![0-9a-f])" % rest)
    found: set[Digest] = set()
    fd = repo.open_object(digest)
    try:
        if os.fstat(fd).st_size == 0:
            return found
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            for m in pattern.finditer(data):
                found.add(Digest.from_hex((m.group(1) + m.group(2)).decode(), repo.algorithm))
    finally:
        os.close(fd)
    return found


def _collect(repo: Repository, extra: list[str], *, dry_run: bool) -> GcResult:
    notes: list[str] = []
    streams = _first_level(repo, "streams")
    images = _first_level(repo, "images")
    stream_names = {digest: name for name, digest in streams.items()}
    image_digests = set(images.values())

    root_streams = [n for n in _ref_roots(repo, "streams") if n in streams]
    root_images = [n for n in _ref_roots(repo, "images") if n in images]
    for name in extra:
        if name in streams:
            root_streams.append(name)
        elif name in images:
            root_images.append(name)
        else:
            raise RepositoryError(
                f"gc root {name!r} is neither a stream nor an image in {repo.path}"
            )

    live: set[Digest] = set()
    walked: set[Digest] = set()
    broken: list[str] = []

    def walk_image(digest: Digest) -> None:
        live.add(digest)
        if digest in walked or not repo.has_object(digest):
            return
        walked.add(digest)
        live.update(_image_objects(repo, digest))

    pending = [streams[n] for n in root_streams]
    while pending:
        digest = pending.pop()
        live.add(digest)
        if digest in walked:
            continue
        walked.add(digest)
        if not repo.has_object(digest):
            continue  # a dangling stream: pruned below
        name = stream_names.get(digest, digest.hex())
        try:
            fd = repo.open_object(digest)
            try:
                with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
                    info = parse_splitstream(data, algorithm=repo.algorithm)
            finally:
                os.close(fd)
        except (ComposefsError, OSError, ValueError) as e:
            broken.append(f"streams/{name}: {e}")
            continue
        live.update(info.object_refs)
        for ref in info.stream_refs:
            live.add(ref)
            if ref in stream_names:
                pending.append(ref)
            elif ref in image_digests:
                walk_image(ref)
    if broken:
        raise RepositoryError(
            "gc stopped, nothing was deleted: cannot read root stream(s) "
            + "; ".join(broken)
            + " (run fsck)"
        )
    for name in root_images:
        walk_image(images[name])
    if images:
        notes.append(
            "EROFS images are not parsed: an image root keeps its object and every object"
            " path that appears in its bytes"
        )

    removed, removed_bytes, objects_notes = _sweep_objects(repo, live, dry_run=dry_run)
    notes += objects_notes
    tmp_removed, tmp_bytes = _remove_tmpfiles(repo, dry_run=dry_run)
    gone = {f"objects/{p}" for p in removed}
    pruned = _prune_links(repo, gone, dry_run=dry_run)
    return GcResult(
        dry_run=dry_run,
        objects_removed=tuple(f"objects/{p}" for p in removed),
        objects_bytes=removed_bytes,
        tmpfiles_removed=tuple(tmp_removed),
        tmpfiles_bytes=tmp_bytes,
        links_pruned=tuple(pruned),
        live_objects=len(live),
        notes=tuple(notes),
    )


def _sweep_objects(
    repo: Repository, live: set[Digest], *, dry_run: bool
) -> tuple[list[str], int, list[str]]:
    removed: list[str] = []
    total = 0
    notes: list[str] = []
    try:
        objects = os.open("objects", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=repo.dirfd)
    except FileNotFoundError:
        return removed, total, notes
    try:
        with os.scandir(objects) as it:
            prefixes = sorted(e.name for e in it if _HEX2.fullmatch(e.name) and e.is_dir())
        for prefix in prefixes:
            fd = os.open(prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=objects)
            try:
                with os.scandir(fd) as it:
                    entries = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
                for name, st in entries:
                    try:
                        digest = Digest.from_object_path(f"{prefix}/{name}", repo.algorithm)
                    except DigestError:
                        notes.append(f"kept objects/{prefix}/{name}: not an object name")
                        continue
                    if digest in live:
                        continue
                    if not dry_run:
                        try:
                            os.unlink(name, dir_fd=fd)
                        except FileNotFoundError:
                            continue
                    removed.append(f"{prefix}/{name}")
                    total += st.st_size
            finally:
                os.close(fd)
    finally:
        os.close(objects)
    return removed, total, notes


def _remove_tmpfiles(repo: Repository, *, dry_run: bool) -> tuple[list[str], int]:
    removed: list[str] = []
    total = 0
    for path in stray_tmpfiles(repo):
        try:
            st = os.stat(path, dir_fd=repo.dirfd, follow_symlinks=False)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue
            if not dry_run:
                os.unlink(path, dir_fd=repo.dirfd)
        except FileNotFoundError:
            continue
        removed.append(path)
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return removed, total


def _alive(repo: Repository, path: str, gone: set[str]) -> bool:
    """Whether the symlink ``path`` leads to an existing file that is not in ``gone``."""
    current = path
    for _ in range(40):
        try:
            st = os.stat(current, dir_fd=repo.dirfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not stat.S_ISLNK(st.st_mode):
            return current not in gone
        target = os.readlink(current, dir_fd=repo.dirfd)
        if target.startswith("/"):
            return os.path.exists(target)
        current = posixpath.normpath(posixpath.join(posixpath.dirname(current), target))
        if current == ".." or current.startswith("../"):
            return os.path.exists(os.path.join(repo.path, current))
    return False  # a loop


def _prune_links(repo: Repository, gone: set[str], *, dry_run: bool) -> list[str]:
    """Prune dangling first-level links, then refs (which may point at those)."""
    pruned: list[str] = []
    for top in ("images", "streams"):
        for name, mode in _scan(repo.dirfd, top) or []:
            path = f"{top}/{name}"
            if name.startswith(TMP_SYMLINK_PREFIX):
                continue  # removed as a temporary file
            if stat.S_ISLNK(mode) and not _alive(repo, path, gone):
                pruned.append(path)
        first = set(pruned)
        for rel, mode in _walk_refs(repo.dirfd, f"{top}/refs"):
            path = f"{top}/refs/{rel}"
            if stat.S_ISLNK(mode) and not _alive(repo, path, gone | first):
                pruned.append(path)
    if not dry_run:
        for path in pruned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path, dir_fd=repo.dirfd)
    return pruned
