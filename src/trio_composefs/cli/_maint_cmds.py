"""``fsck``, ``oci fsck`` and ``gc``, with cfsctl's output and exit rules.

``fsck --json`` and ``oci fsck --json`` print cfsctl's JSON (its ``FsckReply``
and ``OciFsckReply``: snake_case keys, ``errors`` as ``fsck: <kind>: ...``
strings) plus our richer keys, and exit 0 whenever the check could run, as
cfsctl does; the plain forms print cfsctl's lines and exit 1 on any problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import trio

from ..maintenance import FsckKind, FsckProblem, FsckProgress, FsckReport
from ..repository import IMAGES, META_JSON, OBJECTS, STREAMS, Repository
from ._closure import ImageClosure, affected_tags, tag_closures
from ._commands import PROG, UsageError, _open_repo
from ._progress import Renderer, plural

__all__ = ["cmd_fsck", "cmd_gc", "cmd_oci_fsck"]

_PHASE_UNITS = {"objects": "directories", "images": "images", "streams": "streams"}


def _run_fsck(args: argparse.Namespace, repo: Repository) -> FsckReport:
    from ..maintenance import fsck

    with Renderer(enabled=not args.no_progress) as renderer:
        seen: set[str] = set()

        def progress(p: FsckProgress) -> None:
            if p.phase not in seen:
                seen.add(p.phase)
                renderer.add(p.phase, f"fsck {p.phase}", p.total, _PHASE_UNITS[p.phase])
            renderer.update(p.phase, p.done, p.total)
            if p.done == p.total:
                renderer.finish(
                    p.phase,
                    f"fsck: {p.phase}: {p.done}/{plural(p.total, _PHASE_UNITS[p.phase][:-1])}"
                    f" checked; {plural(p.objects_checked, 'object')} so far",
                )

        return trio.run(
            lambda: fsck(
                repo,
                check_objects=not args.metadata_only,
                check_layers=not args.no_check_layers,
                progress=progress,
            )
        )


_BAD_CONTENT = frozenset(
    {
        FsckKind.OBJECT_DIGEST_MISMATCH,
        FsckKind.OBJECT_VERITY_FAILED,
        FsckKind.OBJECT_VERITY_MISSING,
        FsckKind.UNEXPECTED_FILE_TYPE,
    }
)


def _advice(problem: FsckProblem, closures: list[ImageClosure]) -> str:
    """Which tags the problem affects, and how to repair it."""
    hits = affected_tags(problem, closures)
    if problem.path == META_JSON:
        return "repair: restore meta.json (the repository's format; `init` writes a new one)"
    if hits:
        tags = sorted({tag for tag, _ in hits})
        parts = "; ".join(f"{tag} ({part})" for tag, part in hits)
        again = (
            f"pull {'it' if len(tags) == 1 else 'them'} again ({PROG} oci pull SOURCE {tags[0]})"
        )
        if problem.path.startswith(f"{OBJECTS}/") and problem.kind in _BAD_CONTENT:
            # a pull re-imports what is missing; an object with wrong bytes must go first
            return f"affects {parts}; repair: remove {problem.path}, then {again}"
        return f"affects {parts}; repair: {again}, which imports what is missing again"
    return f"affects no tagged image; repair: {PROG} gc removes it when nothing else refers to it"


def _problem_json(problem: FsckProblem, closures: list[ImageClosure]) -> dict[str, Any]:
    out: dict[str, Any] = dict(problem.to_json())
    out["tags"] = sorted({tag for tag, _ in affected_tags(problem, closures)})
    return out


def _report_lines(report: FsckReport, closures: list[ImageClosure]) -> list[str]:
    """cfsctl's lines, each problem followed by our advice line, and our extras
    (what was reassembled and hashed) just before the ``status:`` line."""
    lines = report.cfsctl_lines()
    status = next(i for i, line in enumerate(lines) if line.startswith("status: "))
    out = lines[:status]
    out.append(
        f"checked: {plural(report.contents_checked, 'stream')} reassembled and matched against"
        f" their sha256 name, {report.bytes_hashed / 2**20:.1f} MiB hashed,"
        f" {plural(report.refs_checked, 'ref')}"
    )
    out.append(lines[status])
    for p in report.problems:
        out.append(f"  - {p.cfsctl_message()}")
        out.append(f"    {_advice(p, closures)}")
    out += [f"stray temporary file: {name}" for name in report.stray_tmpfiles]
    if report.stray_tmpfiles:
        out.append(f"({PROG} gc removes stray temporary files)")
    return out


def cmd_fsck(args: argparse.Namespace, out: TextIO) -> int:
    with _open_repo(args) as repo:
        report = _run_fsck(args, repo)
        closures = tag_closures(repo) if not report.ok else []
    if args.json:
        doc = report.to_json()
        doc["problems"] = [_problem_json(p, closures) for p in report.problems]
        print(json.dumps(doc, indent=2), file=out)
        return 0  # as cfsctl: --json reports, the exit status says the check ran
    for line in _report_lines(report, closures):
        print(line, file=out)
    if not report.ok:
        print(f"{PROG}: error: repository integrity check failed", file=sys.stderr)
        return 1
    return 0


# cfsctl's OciFsckError kinds, by the part of the image a repository problem is in.
def _oci_error(tag: str, part: str, problem: FsckProblem) -> str:
    detail = problem.cfsctl_message().removeprefix("fsck: ")
    if part == "manifest" or part == "config":
        if problem.kind is FsckKind.STREAM_DIGEST_MISMATCH:
            return (
                f"fsck: {part}-digest-mismatch: {tag}: expected {problem.expected},"
                f" got {problem.actual}"
            )
        return f"fsck: {part}-read-failed: {tag}: {detail}"
    if part.startswith("layer "):
        diff_id = part.removeprefix("layer ")
        if problem.kind in (FsckKind.MISSING_OBJECT_REF, FsckKind.BROKEN_SYMLINK):
            return f"fsck: layer-object-missing: {tag}: {diff_id}: {detail}"
        return f"fsck: layer-check-failed: {tag}: {diff_id}: {detail}"
    if part == "tag":
        return f"fsck: ref-resolve-failed: {tag}: {detail}"
    return f"fsck: image-check-failed: {tag}: {part.removeprefix('composefs image ')}: {detail}"


def _tags_or_none(repo: Repository) -> list[tuple[str, str]]:
    from .._errors import ComposefsError
    from ..oci import list_tags

    try:
        return list_tags(repo)
    except (ComposefsError, OSError):
        return []


def cmd_oci_fsck(args: argparse.Namespace, out: TextIO) -> int:
    from ..oci import open_image

    with _open_repo(args) as repo:
        if args.image is not None and args.image not in dict(_tags_or_none(repo)):
            open_image(repo, args.image)  # raises: no such tag (or names it by digest)
            raise UsageError(f"{args.image}: give the image by tag")
        report = _run_fsck(args, repo)
        closures = tag_closures(repo, only=args.image)
        errors: list[str] = []
        corrupted: set[str] = set()
        for closure in closures:
            for problem in report.problems:
                for tag, part in affected_tags(problem, [closure]):
                    errors.append(_oci_error(tag, part, problem))
                    corrupted.add(tag)
            if closure.tag not in corrupted:
                try:
                    open_image(repo, closure.tag)
                except Exception as e:  # any failure to read it back is the finding
                    errors.append(f"fsck: manifest-read-failed: {closure.tag}: {e}")
                    corrupted.add(closure.tag)
    ok = report.ok and not errors
    if args.json:
        repo_doc = report.to_json()
        repo_doc["problems"] = [_problem_json(p, closures) for p in report.problems]
        doc = {
            "ok": ok,
            "images_checked": len(closures),
            "images_corrupted": len(corrupted),
            "errors": errors,
            "repo": repo_doc,
            "images": [c.tag for c in closures],
        }
        print(json.dumps(doc, indent=2), file=out)
        return 0
    for line in _report_lines(report, closures):
        print(line, file=out)
    print(f"oci images: {len(closures) - len(corrupted)}/{len(closures)} ok", file=out)
    if errors:
        print(f"oci errors: {len(errors)}", file=out)
        for text in errors:
            print(f"  - {text}", file=out)
    if not ok:
        print(f"{PROG}: error: OCI integrity check failed", file=sys.stderr)
        return 1
    return 0


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    from ..maintenance import gc

    if args.lock_timeout is not None and args.lock_timeout < 0:
        raise UsageError("--lock-timeout must be at least 0")

    with (
        _open_repo(args) as repo,
        Renderer(enabled=not getattr(args, "no_progress", False)) as renderer,
    ):

        def waiting() -> None:
            limit = (
                "until it is free (--lock-timeout SECONDS to give up)"
                if args.lock_timeout is None
                else f"at most {args.lock_timeout:g} s"
            )
            message = (
                f"{PROG}: another process has the repository open; waiting {limit}"
                " for its exclusive lock"
            )
            if renderer.live:
                renderer.note(message)
            else:
                print(message, file=sys.stderr, flush=True)

        renderer.add("gc", "gc: marking and sweeping", None, "steps")
        result = gc(
            repo, args.root, dry_run=args.dry_run, on_wait=waiting, lock_timeout=args.lock_timeout
        )
        renderer.finish("gc", None)
    if args.json:
        print(json.dumps(result.to_json(), indent=2), file=out)
        return 0
    # cfsctl's lines first: "Dry run (no files deleted):", "Objects: N removed (B bytes)",
    # "Pruned symlinks: I images, S streams" (when any).
    if result.dry_run:
        print("Dry run (no files deleted):", file=out)
    print(
        f"Objects: {len(result.objects_removed)} removed ({result.objects_bytes} bytes)", file=out
    )
    images = sum(1 for p in result.links_pruned if p.startswith(f"{IMAGES}/"))
    streams = sum(1 for p in result.links_pruned if p.startswith(f"{STREAMS}/"))
    if images or streams:
        print(f"Pruned symlinks: {images} images, {streams} streams", file=out)
    verb = "would remove" if result.dry_run else "removed"
    if args.verbose:
        for path in result.objects_removed:
            print(f"{verb} {path}", file=out)
    for path in result.tmpfiles_removed:
        print(f"{verb} temporary file {path}", file=out)
    for path in result.links_pruned:
        print(f"{verb} dangling link {path}", file=out)
    for note in result.notes:
        print(f"note: {note}", file=out)
    print(
        f"{verb} {plural(len(result.objects_removed), 'object')} ({result.objects_bytes} bytes),"
        f" {plural(len(result.tmpfiles_removed), 'temporary file')}"
        f" ({result.tmpfiles_bytes} bytes), {plural(len(result.links_pruned), 'link')};"
        f" {result.bytes_freed} bytes {'would be ' if result.dry_run else ''}freed;"
        f" {plural(result.live_objects, 'object')} live",
        file=out,
    )
    return 0
