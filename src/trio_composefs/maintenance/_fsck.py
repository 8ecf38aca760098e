"""Checking a repository's consistency (``fsck``), like composefs-rs's ``Repository::fsck``.

What is checked, in order, and the kebab-case kind of each problem (the names
composefs-rs uses, plus ``stream-digest-mismatch``, ``missing-stream-name`` and
``image-digest-mismatch``):

1. ``meta.json`` parses and names the repository's algorithm
   (``metadata-parse-failed``, ``metadata-algorithm-mismatch``).
2. Every ``objects/XX/<rest>`` is named by its fs-verity digest: measured by
   the kernel where the file has fs-verity, else (insecure repository) hashed
   in userspace by a :class:`~trio_composefs.hashing.HashPool`, on every core
   (``object-invalid-name``, ``object-open-failed``, ``object-digest-mismatch``,
   ``object-verity-failed``, ``object-verity-missing``, ``unexpected-file-type``).
3. Every first-level ``streams/<name>`` is a symlink that resolves, its
   splitstream parses and decodes, and every object and named-ref target it
   references exists (``entry-not-symlink``, ``broken-symlink``,
   ``stat-failed``, ``stream-open-failed``, ``stream-read-failed``,
   ``missing-object-ref``, ``missing-named-ref``). Streams named
   ``oci-{config,manifest,blob,layer}-sha256:<hex>`` are reassembled and their
   sha256 compared with the name (``stream-digest-mismatch``); for layers this
   reads every byte and can be turned off.
   A manifest's or config's named refs must have their ``streams/`` names
   (``config:<d>`` -> ``oci-config-<d>``, a layer ``sha256:<hex>`` ->
   ``oci-layer-sha256:<hex>``), linked to the very object the ref holds
   (``missing-stream-name``).
4. Every symlink under ``streams/refs/`` and ``images/refs/`` resolves, link by
   link, to an object inside the repository (``broken-symlink``: dangling, a
   loop, an absolute or escaping target; ``unexpected-file-type``: not a
   symlink). Directories the repository owns (``objects``, ``objects/XX``,
   ``streams``, ``images``, their ``refs``) must be real directories: a symlink
   there is reported (``unexpected-file-type``) and never followed.
5. Images (upstream's kinds): every first-level ``images/<hex>`` is a symlink
   that resolves (``entry-not-symlink``, ``broken-symlink``,
   ``image-open-failed``, ``image-read-failed``) to the object named ``<hex>``
   (``image-invalid``), whose bytes re-hash to that digest
   (``image-digest-mismatch``), parse as a composefs EROFS (header, superblock,
   directories and metacopy xattrs: ``image-invalid``), and every object it
   references exists (``image-missing-object``). Counted as ``images_checked``
   and ``images_corrupted``.

Leftover temporary files of interrupted writers (``objects/.tmp-object-*``,
``.symlink-*`` next to stream names, ``.tmp-spool-*``) are listed as
:attr:`FsckReport.stray_tmpfiles`; they are not problems (a running import may
own them) and ``gc`` removes them.

Concurrency: one thread hop per ``objects/XX`` directory and per stream, all
under one :class:`trio.CapacityLimiter`; large objects are split over the hash
pool's worker processes, so both cores work even though most threads wait.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import stat
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import attrs
import trio

from .._errors import (
    ComposefsError,
    DigestError,
    DigestMismatchError,
    ErofsError,
    FormatError,
    ObjectNotFoundError,
    RepositoryError,
    UnsafeLayoutError,
    VerityUnsupportedError,
)
from ..formats._chunks import InlineChunk
from ..formats._fsverity import Digest
from ..formats._splitstream import iter_chunks, parse_splitstream
from ..fs.erofs import image_objects, read_erofs_header
from ..hashing._pool import HashPool, digest_fd
from ..repository import (
    IMAGES,
    META_JSON,
    STREAMS,
    TMP_SYMLINK_PREFIX,
    Repository,
    image_path,
    object_entry_path,
    stream_path,
)

__all__ = ["FsckKind", "FsckProblem", "FsckProgress", "FsckReport", "fsck", "stray_tmpfiles"]

#: Names of a stream whose reassembled sha256 is in its name: (kind, hex).
OCI_DIGEST_NAME = re.compile(r"oci-(config|manifest|blob|layer)-sha256:([0-9a-f]{64})")
_READ_SIZE = 1 << 20
_HEX2 = re.compile(r"[0-9a-f]{2}")


class FsckKind(StrEnum):
    """The kind of an :class:`FsckProblem`: composefs-rs's ``FsckError`` variants,
    spelled as it serialises them (kebab-case), plus three of ours (last).

    A ``StrEnum``: each member equals its kebab-case string.
    """

    OBJECT_INVALID_NAME = "object-invalid-name"
    OBJECT_OPEN_FAILED = "object-open-failed"
    OBJECT_DIGEST_MISMATCH = "object-digest-mismatch"
    OBJECT_VERITY_FAILED = "object-verity-failed"
    OBJECT_VERITY_MISSING = "object-verity-missing"
    ENTRY_NOT_SYMLINK = "entry-not-symlink"
    BROKEN_SYMLINK = "broken-symlink"
    STAT_FAILED = "stat-failed"
    UNEXPECTED_FILE_TYPE = "unexpected-file-type"
    STREAM_OPEN_FAILED = "stream-open-failed"
    MISSING_OBJECT_REF = "missing-object-ref"
    STREAM_READ_FAILED = "stream-read-failed"
    MISSING_NAMED_REF = "missing-named-ref"
    OBJECT_CHECK_FAILED = "object-check-failed"
    IMAGE_OPEN_FAILED = "image-open-failed"
    IMAGE_READ_FAILED = "image-read-failed"
    IMAGE_INVALID = "image-invalid"
    IMAGE_MISSING_OBJECT = "image-missing-object"
    METADATA_PARSE_FAILED = "metadata-parse-failed"
    METADATA_ALGORITHM_MISMATCH = "metadata-algorithm-mismatch"
    # ours
    STREAM_DIGEST_MISMATCH = "stream-digest-mismatch"
    MISSING_STREAM_NAME = "missing-stream-name"
    IMAGE_DIGEST_MISMATCH = "image-digest-mismatch"


#: Kinds whose composefs-rs message is just ``<path>`` (no detail).
_PATH_ONLY = frozenset(
    {FsckKind.OBJECT_VERITY_MISSING, FsckKind.ENTRY_NOT_SYMLINK, FsckKind.BROKEN_SYMLINK}
)


@attrs.frozen
class FsckProblem:
    """One problem found by :func:`fsck`.

    Attributes:
        kind: a :class:`FsckKind` (a ``str``: composefs-rs's kebab-case name);
            a plain string is converted, and an unknown one raises ``ValueError``.
        path: where, relative to the repository (``objects/ab/cd...``, ``streams/NAME``).
        detail: a human explanation, if any.
        object_id: the referenced object, for missing references.
        ref_name: the named ref, for ``missing-named-ref``.
        expected: the digest the name promises (hex, or ``sha256:<hex>``).
        actual: the digest found.
    """

    kind: FsckKind = attrs.field(converter=FsckKind)
    path: str
    detail: str = ""
    object_id: str | None = None
    ref_name: str | None = None
    expected: str | None = None
    actual: str | None = None

    def to_json(self) -> dict[str, str]:
        """A JSON object in composefs-rs's shape (``type``, ``path``, camelCase fields)."""
        out = {"type": self.kind, "path": self.path}
        for key, value in (
            ("objectId", self.object_id),
            ("refName", self.ref_name),
            ("expected", self.expected),
            ("actual", self.actual),
            ("detail", self.detail),
        ):
            if value:
                out[key] = value
        return out

    def cfsctl_message(self) -> str:
        """The message composefs-rs's ``FsckError`` displays, ``fsck: <kind>: <path>...``.

        Its formats: ``object-digest-mismatch: <path>: measured <hex>``;
        ``missing-object-ref``/``image-missing-object: <path>: <object id>``;
        ``missing-named-ref: <path>: ref <name>: <object id>``;
        ``object-verity-missing``, ``entry-not-symlink``, ``broken-symlink``:
        ``<path>`` alone; ``metadata-algorithm-mismatch: meta.json: expected <a>,
        repository opened as <b>``; the rest ``<path>: <detail>``. Our own kinds
        use :meth:`__str__`'s shape.
        """
        kind = self.kind
        if kind is FsckKind.OBJECT_DIGEST_MISMATCH:
            return f"fsck: {kind}: {self.path}: measured {self.actual}"
        if kind in (FsckKind.MISSING_OBJECT_REF, FsckKind.IMAGE_MISSING_OBJECT):
            return f"fsck: {kind}: {self.path}: {self.object_id or self.detail}"
        if kind is FsckKind.MISSING_NAMED_REF:
            return f"fsck: {kind}: {self.path}: ref {self.ref_name}: {self.object_id}"
        if kind is FsckKind.METADATA_ALGORITHM_MISMATCH and self.expected is not None:
            return (
                f"fsck: {kind}: {self.path}: expected {self.expected},"
                f" repository opened as {self.actual}"
            )
        if kind in _PATH_ONLY or (kind.value in _UPSTREAM_KINDS and not self.detail):
            return f"fsck: {kind}: {self.path}"
        if kind.value in _UPSTREAM_KINDS:
            return f"fsck: {kind}: {self.path}: {self.detail}"
        return f"fsck: {self}"

    def __str__(self) -> str:
        text = f"{self.kind}: {self.path}"
        if self.ref_name is not None:
            text += f": ref {self.ref_name}"
        if self.object_id:
            text += f": {self.object_id}"
        if self.expected is not None or self.actual is not None:
            text += f": expected {self.expected}, found {self.actual}"
        if self.detail:
            text += f": {self.detail}"
        return text


_UPSTREAM_KINDS = frozenset(k.value for k in FsckKind) - {
    FsckKind.STREAM_DIGEST_MISMATCH.value,
    FsckKind.MISSING_STREAM_NAME.value,
    FsckKind.IMAGE_DIGEST_MISMATCH.value,
}


@attrs.frozen
class FsckProgress:
    """Handed to the ``progress`` callback after each unit of work.

    Attributes:
        phase: ``"objects"``, ``"images"`` or ``"streams"``.
        done: directories (objects phase) or streams finished.
        total: how many there are in this phase.
        objects_checked: objects whose digest was checked so far.
        bytes_hashed: bytes read to check digests so far.
    """

    phase: str
    done: int
    total: int
    objects_checked: int
    bytes_hashed: int


@attrs.frozen
class FsckReport:
    """The outcome of :func:`fsck`; :attr:`ok` when no problem was found."""

    objects_checked: int
    objects_corrupted: int
    streams_checked: int
    streams_corrupted: int
    contents_checked: int
    """Streams whose reassembled sha256 was compared with their name."""
    refs_checked: int
    images_checked: int
    broken_links: int
    missing_objects: int
    bytes_hashed: int
    problems: tuple[FsckProblem, ...]
    stray_tmpfiles: tuple[str, ...]
    images_corrupted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The report as ``cfsctl fsck --json`` prints it, plus our fields.

        cfsctl's keys (its ``FsckReply``, snake_case): ``ok``, ``has_metadata``,
        ``objects_checked``, ``objects_corrupted``, ``streams_checked``,
        ``streams_corrupted``, ``images_checked``, ``images_corrupted``,
        ``broken_links``, ``missing_objects`` and ``errors``, a list of
        :meth:`FsckProblem.cfsctl_message` strings. Ours, added: ``problems``
        (structured: ``type``, ``path``, camelCase details),
        ``contents_checked``, ``refs_checked``, ``bytes_hashed``,
        ``stray_tmpfiles``, and the camelCase counters of composefs-rs's library
        ``FsckResult`` serialisation (``objectsChecked``...) as earlier
        releases printed them.
        """
        has_metadata = not any(
            p.kind is FsckKind.METADATA_PARSE_FAILED and p.detail == "not found"
            for p in self.problems
        )
        return {
            "ok": self.ok,
            "has_metadata": has_metadata,
            "objects_checked": self.objects_checked,
            "objects_corrupted": self.objects_corrupted,
            "streams_checked": self.streams_checked,
            "streams_corrupted": self.streams_corrupted,
            "images_checked": self.images_checked,
            "images_corrupted": self.images_corrupted,
            "broken_links": self.broken_links,
            "missing_objects": self.missing_objects,
            "errors": [p.cfsctl_message() for p in self.problems],
            "problems": [p.to_json() for p in self.problems],
            "contents_checked": self.contents_checked,
            "refs_checked": self.refs_checked,
            "bytes_hashed": self.bytes_hashed,
            "stray_tmpfiles": list(self.stray_tmpfiles),
            **self._camel_counters(),
        }

    def _camel_counters(self) -> dict[str, Any]:
        return {
            "objectsChecked": self.objects_checked,
            "objectsCorrupted": self.objects_corrupted,
            "streamsChecked": self.streams_checked,
            "streamsCorrupted": self.streams_corrupted,
            "contentsChecked": self.contents_checked,
            "refsChecked": self.refs_checked,
            "imagesChecked": self.images_checked,
            "imagesCorrupted": self.images_corrupted,
            "brokenLinks": self.broken_links,
            "missingObjects": self.missing_objects,
            "bytesHashed": self.bytes_hashed,
        }

    def cfsctl_lines(self) -> list[str]:
        """The lines ``cfsctl fsck`` prints (``meta.json: ok``, ``objects: N/M ok``,
        ..., ``status: ok`` or ``status: N error(s)`` then ``  - fsck: ...`` per problem).
        """
        meta = "ok"
        if any(p.path == META_JSON for p in self.problems):
            meta = "error"
        lines = [
            f"meta.json: {meta}",
            f"objects: {self.objects_checked - self.objects_corrupted}/{self.objects_checked} ok",
            f"streams: {self.streams_checked - self.streams_corrupted}/{self.streams_checked} ok",
            f"images: {self.images_checked - self.images_corrupted}/{self.images_checked} ok",
        ]
        if self.broken_links:
            lines.append(f"broken symlinks: {self.broken_links}")
        if self.missing_objects:
            lines.append(f"missing objects: {self.missing_objects}")
        if self.ok:
            lines.append("status: ok")
        else:
            lines.append(f"status: {len(self.problems)} error(s)")
            lines += [f"  - {p.cfsctl_message()}" for p in self.problems]
        return lines

    def summary(self) -> list[str]:
        """Human-readable lines: the counters, then one line per problem."""
        lines = [
            f"objects: {self.objects_checked - self.objects_corrupted}/{self.objects_checked} ok"
            f" ({self.bytes_hashed / 2**20:.1f} MiB hashed)",
            f"streams: {self.streams_checked - self.streams_corrupted}/{self.streams_checked} ok"
            f" ({self.contents_checked} reassembled and matched against their sha256 name)",
            f"images: {self.images_checked - self.images_corrupted}/{self.images_checked} ok",
            f"refs: {self.refs_checked},"
            f" broken links: {self.broken_links}, missing objects: {self.missing_objects}",
        ]
        lines += [f"stray temporary file: {name}" for name in self.stray_tmpfiles]
        lines += [f"fsck: {p}" for p in self.problems]
        n = len(self.problems)
        lines.append("ok" if self.ok else f"{n} {'problem' if n == 1 else 'problems'} found")
        return lines


@attrs.define
class _Tally:
    objects_checked: int = 0
    objects_corrupted: int = 0
    streams_checked: int = 0
    streams_corrupted: int = 0
    contents_checked: int = 0
    refs_checked: int = 0
    images_checked: int = 0
    images_corrupted: int = 0
    broken_links: int = 0
    missing_objects: int = 0
    bytes_hashed: int = 0
    problems: list[FsckProblem] = attrs.Factory(list)

    def add(self, other: _Tally) -> None:
        for field in attrs.fields(_Tally):
            if field.name != "problems":
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        self.problems += other.problems

    def freeze(self, stray: list[str]) -> FsckReport:
        return FsckReport(
            objects_checked=self.objects_checked,
            objects_corrupted=self.objects_corrupted,
            streams_checked=self.streams_checked,
            streams_corrupted=self.streams_corrupted,
            contents_checked=self.contents_checked,
            refs_checked=self.refs_checked,
            images_checked=self.images_checked,
            images_corrupted=self.images_corrupted,
            broken_links=self.broken_links,
            missing_objects=self.missing_objects,
            bytes_hashed=self.bytes_hashed,
            problems=tuple(self.problems),
            stray_tmpfiles=tuple(stray),
        )


# --------------------------------------------------------------------------- helpers


def _scan(repo: Repository, rel: str) -> list[tuple[str, int]] | None:
    """``(name, st_mode)`` of each entry of ``rel`` (sorted), ``None`` if absent or unsafe."""
    try:
        return repo.scan_owned_dir(rel)
    except UnsafeLayoutError:
        return None


def stray_tmpfiles(repo: Repository) -> list[str]:
    """Repository-relative paths of temporary files that interrupted writers left behind.

    ``objects/.tmp-object-*`` (named object files, only on filesystems without
    ``O_TMPFILE``), ``.tmp-spool-*`` (splitstream spool files) and
    ``.symlink-*`` (symlinks about to replace a stream name or ref). Right
    after a crash they are garbage; while an import runs they may be in use.
    Directories that are symlinks are never entered.
    """
    return repo.stray_tmpfiles()


# --------------------------------------------------------------------------- objects


def _check_object_dir(repo: Repository, prefix: str, pool: HashPool | None) -> _Tally:
    """Check every object of ``objects/<prefix>/`` (one thread hop)."""
    tally = _Tally()
    for entry in repo.object_entries(prefix):
        path, mode = object_entry_path(entry.path), entry.mode
        tally.objects_checked += 1
        try:
            expected = Digest.from_object_path(entry.path, repo.algorithm)
        except DigestError as e:
            tally.objects_corrupted += 1
            tally.problems.append(FsckProblem("object-invalid-name", path, str(e)))
            continue
        if not stat.S_ISREG(mode):
            tally.objects_corrupted += 1
            tally.problems.append(
                FsckProblem("unexpected-file-type", path, f"not a regular file (mode {mode:o})")
            )
            continue
        try:
            fd = repo.open_object_entry(entry)
        except OSError as e:
            tally.objects_corrupted += 1
            tally.problems.append(FsckProblem("object-open-failed", path, e.strerror or str(e)))
            continue
        try:
            problem = _check_object(repo, fd, path, expected, pool, tally)
        finally:
            os.close(fd)
        if problem is not None:
            tally.objects_corrupted += 1
            tally.problems.append(problem)
    return tally


def _check_object(
    repo: Repository, fd: int, path: str, expected: Digest, pool: HashPool | None, tally: _Tally
) -> FsckProblem | None:
    try:
        measured = repo.verity_ops.measure(fd, repo.algorithm)
    except VerityUnsupportedError:
        measured = None
    except DigestMismatchError as e:
        return FsckProblem("object-verity-failed", path, str(e))
    except OSError as e:
        return FsckProblem("object-verity-failed", path, e.strerror or str(e))
    if measured is None:
        if not repo.insecure:
            return FsckProblem("object-verity-missing", path)
        try:
            size = os.fstat(fd).st_size
            measured = (
                pool.digest_fd(fd, size, repo.algorithm)
                if pool is not None
                else digest_fd(fd, size, repo.algorithm)
            )
        except (OSError, ComposefsError) as e:
            return FsckProblem("object-verity-failed", path, str(e))
        tally.bytes_hashed += size
    if measured != expected:
        return FsckProblem(
            "object-digest-mismatch", path, expected=expected.hex(), actual=measured.hex()
        )
    return None


# --------------------------------------------------------------------------- streams


def _check_stream(repo: Repository, name: str, check_layers: bool) -> _Tally:
    """Check one first-level stream: its splitstream, references and content (one hop)."""
    tally = _Tally(streams_checked=1)
    path = stream_path(name)

    def fail(problem: FsckProblem) -> _Tally:
        tally.streams_corrupted += 1
        tally.problems.append(problem)
        return tally

    try:
        digest = repo.has_stream(name)
        if digest is None:  # pragma: no cover - removed since the directory was read
            raise ObjectNotFoundError("the stream disappeared")
        fd = repo.open_object(digest)
    except (ComposefsError, OSError) as e:
        return fail(FsckProblem("stream-open-failed", path, str(e)))
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return fail(FsckProblem("stream-read-failed", path, "the splitstream file is empty"))
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            try:
                info = parse_splitstream(data, algorithm=repo.algorithm)
            except FormatError as e:
                return fail(FsckProblem("stream-read-failed", path, str(e)))
            missing = False
            for ref in info.object_refs:
                if not repo.has_object(ref):
                    missing = True
                    tally.missing_objects += 1
                    tally.problems.append(
                        FsckProblem("missing-object-ref", path, object_id=ref.hex())
                    )
            for ref_name, target in sorted(info.named_refs.items()):
                if not repo.has_object(target):
                    missing = True
                    tally.missing_objects += 1
                    tally.problems.append(
                        FsckProblem(
                            "missing-named-ref", path, object_id=target.hex(), ref_name=ref_name
                        )
                    )
            missing |= _check_stream_names(repo, name, info.named_refs, tally)
            if missing:
                tally.streams_corrupted += 1
                return tally
            match = OCI_DIGEST_NAME.fullmatch(name)
            want = match is not None and (check_layers or match.group(1) != "layer")
            sha = hashlib.sha256() if want else None
            try:
                _read_stream(repo, data, info, sha, tally)
            except ObjectNotFoundError as e:  # pragma: no cover - removed meanwhile
                return fail(FsckProblem("missing-object-ref", path, str(e)))
            except (ComposefsError, OSError) as e:
                return fail(FsckProblem("stream-read-failed", path, str(e)))
    finally:
        os.close(fd)
    if sha is not None and match is not None:
        tally.contents_checked += 1
        if sha.hexdigest() != match.group(2):
            return fail(
                FsckProblem(
                    "stream-digest-mismatch",
                    path,
                    "the reassembled stream's sha256 is not the one in its name",
                    expected=f"sha256:{match.group(2)}",
                    actual=f"sha256:{sha.hexdigest()}",
                )
            )
    return tally


def _check_stream_names(
    repo: Repository, name: str, named_refs: Mapping[str, Digest], tally: _Tally
) -> bool:
    """A manifest's or config's named refs must have their ``streams/`` names.

    ``config:<digest>`` names ``oci-config-<digest>``; a ``<alg>:<hex>`` layer ref
    names ``oci-layer-<alg>:<hex>`` (or ``oci-blob-...`` for a non-tar layer). Each
    must be a symlink to the very object the ref holds: without it, a re-pull
    would trust a layer that is not there (``missing-stream-name``).
    """
    if not (name.startswith("oci-manifest-") or name.startswith("oci-config-")):
        return False
    bad = False
    for ref_name, target in sorted(named_refs.items()):
        if not repo.has_object(target):
            continue  # reported as missing-named-ref
        if ref_name.startswith("config:"):
            wanted = [f"oci-config-{ref_name[len('config:') :]}"]
        elif _LAYER_REF.fullmatch(ref_name):
            wanted = [f"oci-layer-{ref_name}", f"oci-blob-{ref_name}"]
        else:
            continue
        why = ""
        for content_id in wanted:
            try:
                found = repo.resolve_stream(content_id)
            except ObjectNotFoundError:
                why = why or f"{stream_path(wanted[0])} is missing"
                continue
            except RepositoryError as e:
                why = str(e)
                continue
            if found == target:
                why = ""
                break
            why = f"{stream_path(content_id)} names another object ({found.object_path()})"
        else:
            if why:
                bad = True
                tally.problems.append(
                    FsckProblem(
                        "missing-stream-name",
                        stream_path(name),
                        why,
                        object_id=target.hex(),
                        ref_name=ref_name,
                    )
                )
    return bad


_LAYER_REF = re.compile(r"sha(256|512):[0-9a-f]{64,128}")


def _read_stream(
    repo: Repository,
    data: mmap.mmap,
    info: Any,
    sha: Any,
    tally: _Tally,
) -> None:
    """Decode every chunk; with ``sha``, also feed it the reassembled bytes."""
    for chunk in iter_chunks(data, info, repo.object_size):
        if sha is None:
            continue
        if isinstance(chunk, InlineChunk):
            sha.update(chunk.data)
            continue
        fd = repo.open_object(chunk.digest)
        try:
            done = 0
            while piece := os.pread(fd, _READ_SIZE, done):
                sha.update(piece)
                done += len(piece)
        finally:
            os.close(fd)
        tally.bytes_hashed += done
        if done != chunk.size:
            raise FormatError(
                f"object {chunk.digest.object_path()} has {done} bytes, {chunk.size} expected"
            )


# --------------------------------------------------------------------------- links


def _check_layout(repo: Repository) -> _Tally:
    """Directories the repository owns that are symlinks or files (never followed)."""
    tally = _Tally()
    bad: list[tuple[str, str]] = []
    bad += [(e.path, str(e)) for e in repo.layout_errors()]  # a parent's error repeats: seen
    try:
        _prefixes, unsafe = repo.object_dirs()
    except UnsafeLayoutError:
        unsafe = []
    bad += [
        (p, "a symlink or file where the repository keeps a directory (not followed)")
        for p in unsafe
    ]
    seen: set[str] = set()
    for path, detail in bad:
        if path in seen:
            continue
        seen.add(path)
        tally.problems.append(FsckProblem("unexpected-file-type", path, detail))
    return tally


def _check_links(repo: Repository) -> tuple[_Tally, list[str], list[str]]:
    """First-level entries and every ref; returns the first-level stream and image names."""
    tally = _Tally()
    streams: list[str] = []
    images: list[str] = []
    for top in (STREAMS, IMAGES):
        for name, mode in _scan(repo, top) or []:
            if name == "refs" or name.startswith(TMP_SYMLINK_PREFIX):
                continue
            path = f"{top}/{name}"
            if top == IMAGES:
                tally.images_checked += 1
            if not stat.S_ISLNK(mode):
                tally.problems.append(FsckProblem("entry-not-symlink", path))
                if top == STREAMS:
                    tally.streams_checked += 1
                    tally.streams_corrupted += 1
                else:
                    tally.images_corrupted += 1
                continue
            why = repo.link_error(path)
            if why is not None:
                if why:
                    tally.problems.append(FsckProblem("stat-failed", path, why))
                else:
                    tally.broken_links += 1
                    target = repo.read_link(path)
                    tally.problems.append(FsckProblem("broken-symlink", path, f"-> {target}"))
                if top == STREAMS:
                    tally.streams_checked += 1
                    tally.streams_corrupted += 1
                else:
                    tally.images_corrupted += 1
                continue
            if top == STREAMS:
                streams.append(name)
            else:
                tally.images_checked -= 1  # counted by _check_image
                images.append(name)
        try:
            refs = repo.walk_refs(top)
        except UnsafeLayoutError:
            refs = []  # reported by the layout check
        for entry in refs:
            if entry.is_tmp:
                continue
            if entry.target is None:
                tally.problems.append(
                    FsckProblem(
                        "unexpected-file-type", entry.path, f"not a symlink (mode {entry.mode:o})"
                    )
                )
                continue
            tally.refs_checked += 1
            try:
                repo.resolve_path(entry.path)
            except RepositoryError as e:
                tally.broken_links += 1
                tally.problems.append(
                    FsckProblem("broken-symlink", entry.path, f"-> {entry.target}: {e}")
                )
    return tally, streams, images


# --------------------------------------------------------------------------- images


def _check_image(repo: Repository, name: str) -> _Tally:
    """Check one ``images/<hex>``: its object is named by its digest, parses as a
    composefs EROFS, and every object it references exists (one thread hop)."""
    tally = _Tally(images_checked=1)
    path = image_path(name)

    def fail(problem: FsckProblem) -> _Tally:
        tally.images_corrupted += 1
        tally.problems.append(problem)
        return tally

    try:
        digest = repo.resolve_path(path)
    except RepositoryError as e:
        return fail(FsckProblem("image-open-failed", path, str(e)))
    if digest.hex() != name:
        return fail(
            FsckProblem(
                "image-invalid",
                path,
                f"links to object {digest.object_path()}, not to the object of its name",
            )
        )
    try:
        fd = repo.open_object(digest)
    except (ComposefsError, OSError) as e:
        return fail(FsckProblem("image-open-failed", path, str(e)))
    try:
        # Hashed and parsed in place (bounded memory: the page cache holds the image).
        try:
            size = os.fstat(fd).st_size
            actual = digest_fd(fd, size, repo.algorithm)
        except (ComposefsError, OSError) as e:
            strerror = e.strerror if isinstance(e, OSError) else None
            return fail(FsckProblem("image-read-failed", path, strerror or str(e)))
        tally.bytes_hashed += size
        if actual != digest:
            return fail(
                FsckProblem(
                    "image-digest-mismatch",
                    path,
                    "the image's fs-verity digest is not its name",
                    expected=digest.hex(),
                    actual=actual.hex(),
                )
            )
        try:
            if size == 0:
                read_erofs_header(b"")
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data, memoryview(data) as view:
                read_erofs_header(view)
                objects = image_objects(view)
        except ErofsError as e:
            return fail(FsckProblem("image-invalid", path, str(e)))
    finally:
        os.close(fd)
    missing = False
    for obj in sorted(objects, key=lambda d: d.hex()):
        if not repo.has_object(obj):
            missing = True
            tally.missing_objects += 1
            tally.problems.append(FsckProblem("image-missing-object", path, object_id=obj.hex()))
    if missing:
        tally.images_corrupted += 1
    return tally


def _check_metadata(repo: Repository) -> _Tally:
    tally = _Tally()
    try:
        meta = repo.read_metadata()
    except (ComposefsError, OSError, ValueError) as e:
        tally.problems.append(FsckProblem("metadata-parse-failed", META_JSON, str(e)))
        return tally
    if meta is None:
        tally.problems.append(FsckProblem("metadata-parse-failed", META_JSON, "not found"))
    elif meta.algorithm is not repo.algorithm:
        tally.problems.append(
            FsckProblem(
                "metadata-algorithm-mismatch",
                META_JSON,
                expected=str(meta.algorithm),
                actual=str(repo.algorithm),
            )
        )
    return tally


# --------------------------------------------------------------------------- driver


async def fsck(
    repo: Repository,
    *,
    check_objects: bool = True,
    check_layers: bool = True,
    hash_pool: HashPool | None = None,
    limiter: trio.CapacityLimiter | None = None,
    progress: Callable[[FsckProgress], object] | None = None,
) -> FsckReport:
    """Check the whole repository and report every problem found (it changes nothing).

    Args:
        repo: an open repository (its shared lock keeps ``gc`` away meanwhile).
        check_objects: re-check every object's digest (composefs-rs's
            ``fsck``); false is its ``fsck_metadata_only``.
        check_layers: also reassemble ``oci-layer-sha256:`` streams and compare
            their sha256 with the diff_id in the name (reads every byte).
        hash_pool: where to hash objects without fs-verity; by default a pool
            of one worker process per CPU is started when needed.
        limiter: bounds the worker threads (default: two per CPU).
        progress: called on the trio thread after each directory or stream.

    Returns:
        The report; :attr:`FsckReport.ok` is false when there is any problem.

    **Cancellation:** between units of work; a thread already checking a
    directory or a stream finishes it first.
    """
    cpus = os.cpu_count() or 2
    if limiter is None:
        limiter = trio.CapacityLimiter(2 * cpus)
    total = _Tally()
    total.add(await trio.to_thread.run_sync(_check_metadata, repo, limiter=limiter))
    own_pool: HashPool | None = None
    pool = hash_pool
    if check_objects and pool is None and repo.insecure:
        pool = own_pool = HashPool()
    try:
        if check_objects:
            try:
                prefixes, _unsafe = await trio.to_thread.run_sync(repo.object_dirs, limiter=limiter)
            except UnsafeLayoutError:
                prefixes = []  # reported by the layout check
            await _run_all(
                "objects",
                [(_check_object_dir, (repo, p, pool)) for p in prefixes],
                total,
                limiter,
                progress,
            )
    finally:
        if own_pool is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(own_pool.close)
    total.add(await trio.to_thread.run_sync(_check_layout, repo, limiter=limiter))
    links, streams, images = await trio.to_thread.run_sync(_check_links, repo, limiter=limiter)
    total.add(links)
    await _run_all(
        "images", [(_check_image, (repo, name)) for name in images], total, limiter, progress
    )
    await _run_all(
        "streams",
        [(_check_stream, (repo, name, check_layers)) for name in streams],
        total,
        limiter,
        progress,
    )
    stray = await trio.to_thread.run_sync(stray_tmpfiles, repo, limiter=limiter)
    total.problems.sort(key=lambda p: (p.path, p.kind, p.object_id or "", p.ref_name or ""))
    return total.freeze(stray)


async def _run_all(
    phase: str,
    jobs: list[tuple[Callable[..., _Tally], tuple[Any, ...]]],
    total: _Tally,
    limiter: trio.CapacityLimiter,
    progress: Callable[[FsckProgress], object] | None,
) -> None:
    done = 0

    async def one(fn: Callable[..., _Tally], args: tuple[Any, ...]) -> None:
        nonlocal done
        total.add(await trio.to_thread.run_sync(fn, *args, limiter=limiter))
        done += 1
        if progress is not None:
            progress(
                FsckProgress(phase, done, len(jobs), total.objects_checked, total.bytes_hashed)
            )

    async with trio.open_nursery() as nursery:
        for fn, args in jobs:
            nursery.start_soon(one, fn, args)
