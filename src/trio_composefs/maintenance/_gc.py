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

import mmap
import os
import re
import stat
from collections.abc import Callable, Iterable

import attrs

from .._errors import (
    ComposefsError,
    ErofsError,
    ObjectNotFoundError,
    RepositoryError,
    SplitStreamError,
)
from ..formats._fsverity import Digest
from ..formats._splitstream import SplitStreamInfo, has_splitstream_magic, parse_splitstream
from ..fs.erofs import read_erofs_header
from ..repository import (
    IMAGES,
    STREAMS,
    TMP_SYMLINK_PREFIX,
    Repository,
    object_entry_path,
    object_path,
)
from ..repository._images import referenced_objects

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
        return sum(1 for p in self.links_pruned if p.startswith(f"{STREAMS}/"))

    @property
    def images_pruned(self) -> int:
        """Pruned links under ``images/`` (composefs-rs's counter)."""
        return sum(1 for p in self.links_pruned if p.startswith(f"{IMAGES}/"))

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


def _kind(repo: Repository, digest: Digest) -> str:
    """``"stream"``, ``"image"`` or ``"object"``: what the stored object looks like.

    A splitstream has its magic at byte 0 (or 18, in the header of bootc <= 1.15);
    an image has a composefs header and an EROFS superblock.
    """
    head = repo.read_object_head(digest, _HEAD)
    if has_splitstream_magic(head):
        return "stream"
    try:
        read_erofs_header(head)
    except ErofsError:
        return "object"
    return "image"


_HEAD = 1024 + 128


def _collect(repo: Repository, extra: list[str], *, dry_run: bool) -> GcResult:
    root_streams, root_images, streams, images = _gc_roots(repo, extra)
    marker = _Marker(
        repo,
        stream_names={digest: name for name, digest in streams.items()},
        image_names={digest: name for name, digest in images.items()},
    )
    marker.mark(root_streams, root_images)
    if marker.broken:
        raise RepositoryError(
            "gc stopped, nothing was deleted: cannot read "
            + "; ".join(marker.broken)
            + " (run fsck; repair or remove the ref that reaches it)"
        )
    live = marker.live
    removed, removed_bytes, notes = _sweep_objects(repo, live, dry_run=dry_run)
    tmp_removed, tmp_bytes = _remove_tmpfiles(repo, dry_run=dry_run)
    gone = {object_entry_path(p) for p in removed}
    pruned = _prune_links(repo, gone, dry_run=dry_run)
    return GcResult(
        dry_run=dry_run,
        objects_removed=tuple(object_entry_path(p) for p in removed),
        objects_bytes=removed_bytes,
        tmpfiles_removed=tuple(tmp_removed),
        tmpfiles_bytes=tmp_bytes,
        links_pruned=tuple(pruned),
        live_objects=len(live),
        notes=tuple(notes),
    )


def _gc_roots(
    repo: Repository, extra: list[str]
) -> tuple[list[Digest], list[Digest], dict[str, Digest], dict[str, Digest]]:
    """``(root streams, root images, first-level streams, first-level images)``.

    Raises:
        RepositoryError: a damaged layout or ref, or an extra root that names nothing.
    """
    damaged = [str(e) for e in repo.layout_errors()]
    if damaged:
        raise RepositoryError("gc stopped, nothing was deleted: " + "; ".join(damaged))
    streams = repo.linked_objects(STREAMS)
    images = repo.linked_objects(IMAGES)

    root_streams = _roots(repo, STREAMS, damaged)
    root_images = _roots(repo, IMAGES, damaged)
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
    return root_streams, root_images, streams, images


@attrs.define(eq=False)
class _Marker:
    """The mark phase: every object the roots reach, and what could not be read."""

    repo: Repository
    stream_names: dict[Digest, str]
    image_names: dict[Digest, str]
    live: set[Digest] = attrs.Factory(set)
    walked: set[Digest] = attrs.Factory(set)
    broken: list[str] = attrs.Factory(list)
    pending: list[tuple[Digest, str]] = attrs.Factory(list)

    def mark(self, root_streams: list[Digest], root_images: list[Digest]) -> None:
        self.pending = [(d, "") for d in root_streams]
        while self.pending:
            self.walk_stream(*self.pending.pop())
        for digest in root_images:
            self.walk_image(digest, "")

    def where(self, digest: Digest, top: str, names: dict[Digest, str]) -> str:
        name = names.get(digest)
        return f"{top}/{name}" if name else object_path(digest)

    def walk_image(self, digest: Digest, via: str) -> None:
        self.live.add(digest)
        if digest in self.walked or not self.repo.has_object(digest):
            return
        self.walked.add(digest)
        try:
            self.live.update(referenced_objects(self.repo, digest))
        except (ComposefsError, OSError, ValueError) as e:
            self.broken.append(f"image {self.where(digest, IMAGES, self.image_names)}{via}: {e}")

    def walk_stream(self, digest: Digest, via: str) -> None:
        repo = self.repo
        self.live.add(digest)
        if digest in self.walked:
            return
        self.walked.add(digest)
        if not repo.has_object(digest):
            return  # a dangling stream: pruned below
        label = self.where(digest, STREAMS, self.stream_names)
        try:
            info = _read_splitstream(repo, digest)
        except (ComposefsError, OSError, ValueError) as e:
            self.broken.append(f"stream {label}{via}: {e}")
            return
        self.live.update(info.object_refs)
        ref_names = {target: name for name, target in info.named_refs.items()}
        for ref in info.stream_refs:
            self.live.add(ref)
            if ref in self.walked or not repo.has_object(ref):
                continue
            ref_name = ref_names.get(ref)
            sub_via = f" (reached from {label}" + (f" as {ref_name!r})" if ref_name else ")")
            try:
                kind = _kind(repo, ref)
            except (ComposefsError, OSError) as e:
                self.broken.append(f"object {ref.object_path()}{sub_via}: {e}")
                continue
            if kind == "stream":
                self.pending.append((ref, sub_via))
            elif kind == "image" or (ref_name or "").startswith("composefs.image"):
                self.walk_image(ref, sub_via)


def _read_splitstream(repo: Repository, digest: Digest) -> SplitStreamInfo:
    fd = repo.open_object(digest)
    try:
        if os.fstat(fd).st_size == 0:
            raise SplitStreamError("the splitstream file is empty")
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            return parse_splitstream(data, algorithm=repo.algorithm)
    finally:
        os.close(fd)


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
            notes.append(f"kept {object_entry_path(entry.path)}: not an object name")
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
    for path in repo.stray_tmpfiles():
        size = repo.remove_stray_tmpfile(path, dry_run=dry_run)
        if size is None:
            continue
        removed.append(path)
        total += size
    return removed, total


def _prune_links(repo: Repository, gone: set[str], *, dry_run: bool) -> list[str]:
    """Prune dangling first-level links, then refs (which may point at those)."""
    pruned: list[str] = []
    for top in (IMAGES, STREAMS):
        for name, mode in repo.scan_owned_dir(top) or []:
            path = f"{top}/{name}"
            if name.startswith(TMP_SYMLINK_PREFIX):
                continue  # removed as a temporary file
            if stat.S_ISLNK(mode) and not repo.link_is_alive(path, gone):
                pruned.append(path)
        first = set(pruned)
        for entry in repo.walk_refs(top):
            if entry.is_tmp or entry.target is None:
                continue
            if not repo.link_is_alive(entry.path, gone | first):
                pruned.append(entry.path)
    if not dry_run:
        for path in pruned:
            repo.remove_link(path)
    return pruned
