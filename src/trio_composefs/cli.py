"""trio-cfsctl: the command line, mirroring composefs-rs's cfsctl."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

import trio

from ._chunks import ExternalChunk
from ._errors import ComposefsError, VerityUnsupportedError
from ._sources import ByteSource
from ._version import __version__
from .fsverity import Algorithm, FsVerityHasher
from .layer import LayerProgress, LayerStats, default_jobs, layer_content_id, open_importer
from .repository import Repository

PROG = "trio-cfsctl"
USER_REPO = "~/.var/lib/composefs"
SYSTEM_REPO = "/sysroot/composefs"


class UsageError(ComposefsError):
    """A mistake on the command line."""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Import OCI images into a composefs repository (a Python peer of cfsctl).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--repo", metavar="PATH", help="the repository to use")
    where.add_argument("--user", action="store_true", help=f"use {USER_REPO}")
    where.add_argument("--system", action="store_true", help=f"use {SYSTEM_REPO}")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="do not require fs-verity (digests are computed in userspace)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="create a repository")
    init.add_argument("path", nargs="?", help="where (default: the --repo path)")
    init.add_argument(
        "--algorithm",
        default=Algorithm.SHA512.value,
        choices=[a.value for a in Algorithm],
        help="fs-verity algorithm (default: %(default)s, as cfsctl)",
    )
    init.add_argument(
        "--insecure",
        action="store_true",
        dest="init_insecure",
        help="allow a filesystem without fs-verity; digests are computed in userspace",
    )

    measure = sub.add_parser("measure-file", help="print the fs-verity digest of files")
    measure.add_argument(
        "--algorithm",
        default=Algorithm.SHA256.value,
        choices=[a.value for a in Algorithm],
        help="(default: %(default)s)",
    )
    measure.add_argument("files", nargs="+", metavar="FILE")

    cat = sub.add_parser("cat", help="write a stream's reassembled bytes to standard output")
    cat.add_argument("name", help="a content id (oci-layer-sha256:...) or refs/NAME")

    sub.add_parser(
        "demo",
        help="import the built-in sample image's layers (creating the repository) and show them",
    )

    oci = sub.add_parser("oci", help="OCI images and layers")
    oci_sub = oci.add_subparsers(dest="oci_command", metavar="COMMAND", required=True)
    il = oci_sub.add_parser("import-layer", help="import a tar layer from standard input")
    il.add_argument("diff_id", metavar="DIFF_ID", help="sha256:<hex> of the uncompressed tar")
    il.add_argument("name", nargs="?", metavar="NAME", help="also publish streams/refs/NAME")
    il.add_argument("--file", metavar="PATH", help="read the tar from PATH instead")
    il.add_argument(
        "-j",
        "--jobs",
        type=int,
        metavar="N",
        help=f"object writers at once (default {default_jobs()})",
    )
    il.add_argument("--no-progress", action="store_true", help="no progress line on a TTY")
    layer = oci_sub.add_parser("layer", help="write a layer's tar, or list its entries")
    layer.add_argument("diff_id", metavar="DIFF_ID")
    layer.add_argument("--list", action="store_true", help="one line per entry instead")
    return p


def _repo_path(args: argparse.Namespace) -> str:
    if args.repo:
        return str(args.repo)
    if args.user:
        return os.path.expanduser(USER_REPO)
    if args.system:
        return SYSTEM_REPO
    return SYSTEM_REPO if os.geteuid() == 0 else os.path.expanduser(USER_REPO)


def _open_repo(args: argparse.Namespace) -> Repository:
    return Repository.open(_repo_path(args), insecure=True if args.insecure else None)


# --- commands ---------------------------------------------------------------


def cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    path = args.path or _repo_path(args)
    insecure = bool(args.init_insecure or args.insecure)
    try:
        repo = Repository.init(path, algorithm=Algorithm(args.algorithm), insecure=insecure)
    except VerityUnsupportedError as e:
        raise VerityUnsupportedError(
            f"{e}; run `{PROG} --repo {path} init --insecure` to create a repository that"
            " computes digests in userspace"
        ) from None
    with repo:
        mode = "insecure" if repo.insecure else "fs-verity enforced"
        print(f"initialized {repo.algorithm.value} repository at {repo.path} ({mode})", file=out)
    return 0


def cmd_measure_file(args: argparse.Namespace, out: TextIO) -> int:
    alg = Algorithm(args.algorithm)
    for name in args.files:
        hasher = FsVerityHasher(alg)
        try:
            with open(name, "rb") as f:
                while piece := f.read(1 << 20):
                    hasher.update(piece)
        except OSError as e:
            raise ComposefsError(f"{name}: {e.strerror}") from None
        print(hasher.digest().hex(), file=out)
    return 0


def cmd_cat(args: argparse.Namespace, out: TextIO) -> int:
    from .reassemble import copy_stream

    with _open_repo(args) as repo:
        copy_stream(repo, args.name, _stdout_writer())
    return 0


def cmd_oci_layer(args: argparse.Namespace, out: TextIO) -> int:
    from .reassemble import copy_stream, iter_layer_entries
    from .tarentry import format_entry

    name = layer_content_id(args.diff_id)
    with _open_repo(args) as repo:
        if args.list:
            for entry in iter_layer_entries(repo, name):
                print(format_entry(entry), file=out)
        else:
            copy_stream(repo, name, _stdout_writer())
    return 0


def _stdout_writer() -> Callable[[bytes], object]:
    sys.stdout.flush()
    fd = sys.stdout.fileno()

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


class _ProgressLine:
    """One line on stderr, rewritten in place, only on a TTY."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, p: LayerProgress) -> None:
        if not self.enabled:
            return
        secs = max(time.monotonic() - self.start, 1e-6)
        line = (
            f"{p.diff_id[:19]}…  {p.bytes_read / 2**20:8.1f} MiB"
            f" ({p.bytes_read / 2**20 / secs:6.1f} MiB/s)  objects {p.objects_written} new,"
            f" {p.objects_deduplicated} dedup, {p.objects_in_flight} in flight"
        )
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _summary(stats: LayerStats, seconds: float) -> str:
    if stats.skipped:
        return f"{stats.diff_id}: already present"
    mib = stats.tar_bytes / 2**20
    return (
        f"{stats.diff_id}: {mib:.1f} MiB in {seconds:.2f} s ({mib / max(seconds, 1e-6):.1f} MiB/s);"
        f" {stats.objects} objects ({stats.objects_written} new,"
        f" {stats.objects_deduplicated} deduplicated), {stats.inline_bytes} bytes inline"
    )


async def _import_one(
    repo: Repository,
    source: ByteSource,
    diff_id: str,
    name: str | None,
    jobs: int | None,
    progress: bool,
) -> LayerStats:
    line = _ProgressLine(progress)
    try:
        async with open_importer(repo, jobs=jobs) as importer:
            return await importer.import_layer(source, diff_id, name=name, progress=line)
    finally:
        line.close()


def cmd_oci_import_layer(args: argparse.Namespace, out: TextIO) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    start = time.monotonic()
    with _open_repo(args) as repo:
        if args.file:
            try:
                f = open(args.file, "rb")  # noqa: SIM115 - closed below
            except OSError as e:
                raise ComposefsError(f"{args.file}: {e.strerror}") from None
            source: ByteSource = f
        else:
            f = None
            source = sys.stdin.buffer.fileno()
        try:
            stats = trio.run(
                _import_one, repo, source, args.diff_id, args.name, args.jobs, not args.no_progress
            )
        finally:
            if f is not None:
                f.close()
    print(stats.splitstream.hex(), file=out)
    print(_summary(stats, time.monotonic() - start), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .reassemble import copy_stream, iter_layer_entries
    from .sample import sample_layers
    from .tarentry import format_entry

    path = _repo_path(args)
    if not os.path.exists(os.path.join(path, "meta.json")):
        try:
            Repository.init(path, algorithm=Algorithm.SHA256, insecure=args.insecure).close()
            print(f"created repository {path}", file=out)
        except VerityUnsupportedError:
            Repository.init(path, algorithm=Algorithm.SHA256, insecure=True).close()
            print(
                f"created repository {path} (insecure: this filesystem has no fs-verity)", file=out
            )
    layers = sample_layers()

    async def run_all(repo: Repository) -> list[tuple[LayerStats, float]]:
        results: list[tuple[LayerStats, float]] = []
        async with open_importer(repo) as importer:
            for layer in layers:
                start = trio.current_time()
                stats = await importer.import_layer(layer.tar, layer.diff_id)
                results.append((stats, trio.current_time() - start))
        return results

    with _open_repo(args) as repo:
        for layer, (st, seconds) in zip(layers, trio.run(run_all, repo), strict=True):
            print(f"\nlayer {layer.diff_id}  ({layer.description})", file=out)
            print(f"  splitstream {st.splitstream.hex()}", file=out)
            print(f"  {_summary(st, seconds)}", file=out)
            for entry in iter_layer_entries(repo, layer_content_id(layer.diff_id)):
                where = (
                    f"   [object {entry.content.digest.object_path()[:14]}…]"
                    if isinstance(entry.content, ExternalChunk)
                    else ""
                )
                print("  " + format_entry(entry) + where, file=out)
            h = hashlib.sha256()
            copy_stream(repo, layer_content_id(layer.diff_id), h.update)
            ok = "sha256:" + h.hexdigest() == layer.diff_id
            print(
                f"  cat round trip: {'identical to the original tar' if ok else 'MISMATCH'}",
                file=out,
            )
            if not ok:
                return 1
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "init": cmd_init,
    "measure-file": cmd_measure_file,
    "cat": cmd_cat,
    "demo": cmd_demo,
    "oci import-layer": cmd_oci_import_layer,
    "oci layer": cmd_oci_layer,
}


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; return the exit status (what :func:`main` exits with)."""
    args = _build_parser().parse_args(argv)
    out = out or sys.stdout
    key = args.command if args.command != "oci" else f"oci {args.oci_command}"
    try:
        return COMMANDS[key](args, out)
    except BaseException as exc:
        leaves = _leaves(exc)
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        if any(isinstance(e, BrokenPipeError) for e in leaves):
            # `trio-cfsctl cat ... | head`: the reader went away; say nothing.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        if all(isinstance(e, ComposefsError | OSError) for e in leaves):
            for e in leaves:
                if args.debug:
                    traceback.print_exception(e)
                print(f"{PROG}: error: {_describe(e)}", file=sys.stderr)
            return 1
        raise


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, ComposefsError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return str(e)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``trio-cfsctl`` console script."""
    sys.exit(run(argv))
