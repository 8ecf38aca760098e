"""Garbage collection: delete what no ref reaches, as composefs-rs's ``Repository::gc``.

Roots are every symlink under ``streams/refs/`` and ``images/refs/``
(recursively) plus the names the caller adds (first-level stream or image
names); ``images/`` itself is not a root. Live objects:

* an image root: the image object and every object it references, read from
  its metacopy xattrs by the EROFS reader (``fs.erofs.image_objects``, as
  composefs-rs's ``collect_objects``);
* a root stream: its own object, every entry of its ``object_refs`` and of its
  ``stream_refs`` (the targets of its named refs). A stream ref whose object is
  a splitstream (magic ``SplitStream`` at byte 0, or 18 in the header of
  bootc <= 1.15) is walked in turn *whether or not it has a* ``streams/`` *name*;
  one that is a composefs EROFS (or is named ``composefs.image*``, as a config's
  ``composefs.image.v1``) is walked as an image.

Then:

1. every file of the real ``objects/XX/`` directories that is not live is
   deleted (sizes summed); an ``objects/XX`` that is a symlink is never entered;
2. temporary files of interrupted writers are deleted (``objects/.tmp-object-*``,
   ``.tmp-spool-*``, ``.symlink-*``), which composefs-rs leaves alone;
3. dangling symlinks are pruned: first-level ``streams/`` and ``images/``,
   then recursively under their ``refs/``.

gc stops *before deleting anything*, saying what to repair, when: ``objects``,
``streams``, ``images`` or their ``refs`` is not a real directory (a symlink is
never followed); a root is damaged (a regular file, a loop, an absolute target
or one leaving the repository, a target that is not an object); or a reachable
stream or image cannot be parsed. A dangling root (its name or object missing)
is no root: it is pruned, as composefs-rs does.

Differences from composefs-rs, each keeping more, never less: every stream ref
is kept alive, not only the named ones, and unnamed streams are walked.

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

from .._errors import (
    ComposefsError,
    DigestError,
    ErofsError,
    ObjectNotFoundError,
    RepositoryError,
    SplitStreamError,
    UnsafeLayoutError,
)
from ..formats._fsverity import Digest
from ..formats._splitstream import parse_splitstream
from ..fs.erofs import read_erofs_header
from ..repository._images import referenced_objects
from ..repository._repository import TMP_SYMLINK_PREFIX, Repository
from ._fsck import stray_tmpfiles

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
    lock_timeout: float | None = None,
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
        on_wait: called once if the exclusive lock is busy, before waiting.
        lock_timeout: give up waiting for the exclusive lock after this many
            seconds (default: wait as long as it takes).

    Raises:
        LockTimeoutError: the exclusive lock stayed busy for ``lock_timeout`` seconds.
        RepositoryError: a root names no stream or image, or a root stream
            cannot be parsed (nothing is deleted then: run ``fsck``).
    """
    roots = list(roots)
    if dry_run:
        return _collect(repo, roots, dry_run=True)
    repo.ensure_writable()
    with repo.exclusive_lock(on_wait=on_wait, timeout=lock_timeout):
        return _collect(repo, roots, dry_run=False)


def _first_level(repo: Repository, top: str) -> dict[str, Digest]:
    """``{name: object}`` for the first-level symlinks of ``top`` that name an object."""
    out: dict[str, Digest] = {}
    fd = repo.open_owned_dir(top)
    if fd is None:
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


def _check_layout(repo: Repository) -> list[str]:
    """Owned top directories that are symlinks or files: gc cannot know its roots then."""
    damaged = []
    for rel in ("objects", "streams", "images", "streams/refs", "images/refs"):
        try:
            fd = repo.open_owned_dir(rel)
        except UnsafeLayoutError as e:
            damaged.append(str(e))
            continue
        if fd is not None:
            os.close(fd)
    return damaged


def _roots(repo: Repository, top: str, damaged: list[str]) -> list[Digest]:
    """Objects the refs under ``top/refs`` lead to; damaged refs are added to ``damaged``.

    A dangling ref (its stream or image name, or the object, is missing) is no
    root: it is pruned afterwards, as composefs-rs does.
    """
    out: list[Digest] = []
    for entry in repo.walk_refs(top):
        if entry.is_tmp:
            continue
        try:
            out.append(repo.resolve_path(entry.path))
        except ObjectNotFoundError:
            continue
        except RepositoryError as e:
            damaged.append(f"{entry.path}: {e}")
    return out


_SPLITSTREAM_MAGIC = b"SplitStream"


def _read_head(repo: Repository, digest: Digest, size: int) -> bytes:
    fd = repo.open_object(digest)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _kind(repo: Repository, digest: Digest) -> str:
    """``"stream"``, ``"image"`` or ``"object"``: what the stored object looks like.

    A splitstream has its magic at byte 0 (or 18, in the header of bootc <= 1.15);
    an image has a composefs header and an EROFS superblock.
    """
    head = _read_head(repo, digest, _HEAD)
    if head[:11] == _SPLITSTREAM_MAGIC or head[18:29] == _SPLITSTREAM_MAGIC:
        return "stream"
    try:
        read_erofs_header(head)
    except ErofsError:
        return "object"
    return "image"


_HEAD = 1024 + 128


def _collect(repo: Repository, extra: list[str], *, dry_run: bool) -> GcResult:
    notes: list[str] = []
    damaged = _check_layout(repo)
    if damaged:
        raise RepositoryError("gc stopped, nothing was deleted: " + "; ".join(damaged))
    streams = _first_level(repo, "streams")
    images = _first_level(repo, "images")

    root_streams = _roots(repo, "streams", damaged)
    root_images = _roots(repo, "images", damaged)
    if damaged:
        raise RepositoryError(
            "gc stopped, nothing was deleted: damaged "
            + ("root " if len(damaged) == 1 else "roots ")
            + "; ".join(damaged)
            + " (repair the ref or remove it, then run gc again)"
        )
    for name in extra:
        if name in streams:
            root_streams.append(streams[name])
        elif name in images:
            root_images.append(images[name])
        else:
            raise RepositoryError(
                f"gc root {name!r} is neither a stream nor an image in {repo.path}"
            )
    stream_names = {digest: name for name, digest in streams.items()}
    image_names = {digest: name for name, digest in images.items()}

    live: set[Digest] = set()
    walked: set[Digest] = set()
    broken: list[str] = []

    def where(digest: Digest, top: str, names: dict[Digest, str]) -> str:
        name = names.get(digest)
        return f"{top}/{name}" if name else f"objects/{digest.object_path()}"

    def walk_image(digest: Digest, via: str) -> None:
        live.add(digest)
        if digest in walked or not repo.has_object(digest):
            return
        walked.add(digest)
        try:
            live.update(referenced_objects(repo, digest))
        except (ComposefsError, OSError, ValueError) as e:
            broken.append(f"image {where(digest, 'images', image_names)}{via}: {e}")

    pending: list[tuple[Digest, str]] = [(d, "") for d in root_streams]
    while pending:
        digest, via = pending.pop()
        live.add(digest)
        if digest in walked:
            continue
        walked.add(digest)
        if not repo.has_object(digest):
            continue  # a dangling stream: pruned below
        label = where(digest, "streams", stream_names)
        try:
            fd = repo.open_object(digest)
            try:
                if os.fstat(fd).st_size == 0:
                    raise SplitStreamError("the splitstream file is empty")
                with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
                    info = parse_splitstream(data, algorithm=repo.algorithm)
            finally:
                os.close(fd)
        except (ComposefsError, OSError, ValueError) as e:
            broken.append(f"stream {label}{via}: {e}")
            continue
        live.update(info.object_refs)
        ref_names = {target: name for name, target in info.named_refs.items()}
        for ref in info.stream_refs:
            live.add(ref)
            if ref in walked or not repo.has_object(ref):
                continue
            ref_name = ref_names.get(ref)
            sub_via = f" (reached from {label}" + (f" as {ref_name!r})" if ref_name else ")")
            try:
                kind = _kind(repo, ref)
            except (ComposefsError, OSError) as e:
                broken.append(f"object {ref.object_path()}{sub_via}: {e}")
                continue
            if kind == "stream":
                pending.append((ref, sub_via))
            elif kind == "image" or (ref_name or "").startswith("composefs.image"):
                walk_image(ref, sub_via)
    for digest in root_images:
        walk_image(digest, "")
    if broken:
        raise RepositoryError(
            "gc stopped, nothing was deleted: cannot read "
            + "; ".join(broken)
            + " (run fsck; repair or remove the ref that reaches it)"
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
    _prefixes, unsafe = repo.object_dirs()
    notes += [f"skipped {path}: not a real directory (never followed; run fsck)" for path in unsafe]
    for entry in repo.iter_objects():
        if entry.digest is None:
            notes.append(f"kept objects/{entry.path}: not an object name")
            continue
        if entry.digest in live:
            continue
        if not dry_run:
            try:
                repo.remove_object(entry.digest)
            except ObjectNotFoundError:
                continue
        removed.append(entry.path)
        total += entry.size
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
        for name, mode in repo.scan_owned_dir(top) or []:
            path = f"{top}/{name}"
            if name.startswith(TMP_SYMLINK_PREFIX):
                continue  # removed as a temporary file
            if stat.S_ISLNK(mode) and not _alive(repo, path, gone):
                pruned.append(path)
        first = set(pruned)
        for entry in repo.walk_refs(top):
            if entry.is_tmp or entry.target is None:
                continue
            if not _alive(repo, entry.path, gone | first):
                pruned.append(entry.path)
    if not dry_run:
        for path in pruned:
            parent, _, base = path.rpartition("/")
            fd = repo.open_owned_dir(parent)
            if fd is None:
                continue
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(base, dir_fd=fd)
            finally:
                os.close(fd)
    return pruned
