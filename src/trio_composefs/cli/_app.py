"""trio-cfsctl: the command line, mirroring composefs-rs's cfsctl.

This module holds the parser, the dispatch table and the error → exit status mapping;
the command bodies are in ``_commands``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from .._errors import ComposefsError
from .._version import __version__
from ..formats import Algorithm
from ..importer import (
    default_jobs,
)
from ._commands import (
    PROG,
    SYSTEM_REPO,
    USER_REPO,
    cmd_cat,
    cmd_demo,
    cmd_init,
    cmd_measure_file,
    cmd_oci_images,
    cmd_oci_import_layer,
    cmd_oci_inspect,
    cmd_oci_layer,
    cmd_oci_pull,
    cmd_oci_tag,
    cmd_oci_untag,
)
from ._copy_cmd import add_copy_parser, cmd_oci_copy
from ._image_cmds import (
    cmd_composefs_info,
    cmd_compute_id,
    cmd_create_dumpfile,
    cmd_create_image,
    cmd_dump_files,
    cmd_image_objects,
    cmd_images,
    cmd_mkcomposefs,
    cmd_oci_compute_id,
    cmd_oci_dump,
)
from ._maint_cmds import cmd_fsck, cmd_gc, cmd_oci_fsck
from ._mount_cmds import add_mount_parsers, cmd_mount, cmd_oci_mount, cmd_transaction


def _add_import_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        metavar="N",
        help=f"object writers at once (default {default_jobs()})",
    )
    _add_progress_option(parser)


def _add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress display (live lines on a terminal, a log otherwise)",
    )


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
    _add_repository_commands(sub)
    _add_maintenance_commands(sub)
    oci = sub.add_parser("oci", help="OCI images and layers")
    oci_sub = oci.add_subparsers(dest="oci_command", metavar="COMMAND", required=True)
    _add_oci_layer_commands(oci_sub)
    _add_oci_image_commands(oci_sub)
    add_mount_parsers(sub, oci_sub)
    _add_image_commands(sub, oci_sub)
    add_copy_parser(oci_sub)
    return p


def _add_repository_commands(sub: Any) -> None:
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
        help="pull the built-in sample image (creating the repository) and show what was stored",
    )


def _add_fsck_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print cfsctl's JSON report (exit 0 if it ran)"
    )
    parser.add_argument(
        "--metadata-only", action="store_true", help="do not re-hash objects (streams, refs only)"
    )
    parser.add_argument(
        "--no-check-layers",
        action="store_true",
        help="do not reassemble layer streams to compare their sha256 with the diff_id",
    )
    _add_progress_option(parser)


def _add_maintenance_commands(sub: Any) -> None:
    fsck = sub.add_parser("fsck", help="check the repository's consistency (reports every problem)")
    _add_fsck_options(fsck)
    gc = sub.add_parser("gc", help="remove objects, streams and temporary files no ref reaches")
    gc.add_argument("-n", "--dry-run", action="store_true", help="only say what would be removed")
    gc.add_argument(
        "-r",
        "--root",
        action="append",
        default=[],
        metavar="NAME",
        help="also keep this stream or image (first-level name); repeatable",
    )
    gc.add_argument(
        "--lock-timeout",
        type=float,
        metavar="SECONDS",
        help="give up if the exclusive lock is still busy after SECONDS (default: wait)",
    )
    gc.add_argument("--json", action="store_true", help="print the result as JSON")
    gc.add_argument("-v", "--verbose", action="store_true", help="list every removed object")
    _add_progress_option(gc)


def _add_oci_layer_commands(oci_sub: Any) -> None:
    il = oci_sub.add_parser("import-layer", help="import a tar layer from standard input")
    il.add_argument("diff_id", metavar="DIFF_ID", help="sha256:<hex> of the uncompressed tar")
    il.add_argument("name", nargs="?", metavar="NAME", help="also publish streams/refs/NAME")
    il.add_argument("--file", metavar="PATH", help="read the tar from PATH instead")
    _add_import_options(il)
    layer = oci_sub.add_parser(
        "layer", help="write a layer's tar (not to a terminal), or describe it"
    )
    layer.add_argument("diff_id", metavar="DIFF_ID", help="sha256:<hex> of the layer's tar")
    how = layer.add_mutually_exclusive_group()
    how.add_argument("--list", action="store_true", help="one ls -l line per entry")
    how.add_argument("--dumpfile", action="store_true", help="one dumpfile line per entry")
    how.add_argument("--json", action="store_true", help="the layer's metadata as JSON")
    fsck = oci_sub.add_parser("fsck", help="fsck, then check every tagged image (or IMAGE)")
    fsck.add_argument("image", nargs="?", metavar="IMAGE", help="only this tag's image")
    _add_fsck_options(fsck)


def _add_oci_image_commands(oci_sub: Any) -> None:
    pull = oci_sub.add_parser("pull", help="pull an image and tag it")
    pull.add_argument(
        "source",
        metavar="SOURCE",
        help="oci:DIR[:TAG|@DIGEST], oci-archive:FILE[:TAG], docker-archive:FILE[:REF],"
        " or any skopeo transport (docker://...)",
    )
    pull.add_argument(
        "tag", nargs="?", metavar="TAG", help="tag to give the image (default: SOURCE)"
    )
    pull.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="image of an index to pick")
    _add_import_options(pull)
    images = oci_sub.add_parser("images", help="list tagged images")
    images.add_argument("--json", action="store_true", help="as JSON")
    images.add_argument("--no-trunc", action="store_true", help="show whole digests")
    inspect = oci_sub.add_parser("inspect", help="show an image's manifest and config (JSON)")
    inspect.add_argument("image", metavar="IMAGE", help="a tag, or @sha256:... (manifest digest)")
    what = inspect.add_mutually_exclusive_group()
    what.add_argument("--manifest", action="store_true", help="only the raw manifest")
    what.add_argument("--config", action="store_true", help="only the raw config")
    tag = oci_sub.add_parser("tag", help="tag a stored image")
    tag.add_argument("digest", metavar="DIGEST", help="manifest digest, sha256:...")
    tag.add_argument("name", metavar="NAME")
    untag = oci_sub.add_parser("untag", help="remove a tag")
    untag.add_argument("name", metavar="NAME")


def _add_fs_read_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="the directory tree")
    parser.add_argument(
        "--no-propagate-usr-to-root",
        action="store_true",
        help="no OCI transform (root metadata from /usr, /run emptied, xattr allowlist):"
        " the tree as it is, every xattr kept",
    )


def _add_image_commands(sub: Any, oci_sub: Any) -> None:
    images = sub.add_parser("images", help="list the composefs images and their refs")
    images.add_argument("--json", action="store_true", help="as JSON")
    images.add_argument("--no-trunc", action="store_true", help="show whole digests")
    objects = sub.add_parser("image-objects", help="list the objects an image references")
    objects.add_argument("name", metavar="NAME", help="image ID (hex), refs/NAME or NAME")
    dump = sub.add_parser("dump-files", help="dumpfile lines (or backing paths) from an image")
    dump.add_argument("image", metavar="IMAGE", help="image ID (hex), refs/NAME or NAME")
    dump.add_argument("files", nargs="+", metavar="PATH", help="files or directories in it")
    dump.add_argument(
        "--backing-path-only",
        action="store_true",
        help="print PATH and its object path, or 'inline'",
    )
    create = sub.add_parser(
        "create-image", help="store a directory tree's files and its image; print the image ID"
    )
    _add_fs_read_options(create)
    create.add_argument("name", nargs="?", metavar="NAME", help="also name it images/refs/NAME")
    _add_fs_read_options(
        sub.add_parser("compute-id", help="image ID of a directory tree (nothing stored)")
    )
    _add_fs_read_options(
        sub.add_parser("create-dumpfile", help="dumpfile of a directory tree (nothing stored)")
    )
    oci_id = oci_sub.add_parser("compute-id", help="image ID of a stored OCI image's rootfs")
    oci_id.add_argument("image", metavar="IMAGE", help="a tag, or @sha256:... (manifest digest)")
    oci_dump = oci_sub.add_parser("dump", help="dumpfile of a stored OCI image's rootfs")
    oci_dump.add_argument("image", metavar="IMAGE", help="a tag, or @sha256:...")

    mk = sub.add_parser("mkcomposefs", help="C mkcomposefs: make a composefs image")
    mk.add_argument("source", metavar="SOURCE", help="a directory, or a dumpfile with --from-file")
    mk.add_argument("image", nargs="?", metavar="IMAGE", help="the image file, or - for stdout")
    mk.add_argument("--digest-store", metavar="PATH", help="copy content files to PATH/XX/REST")
    mk.add_argument("--use-epoch", action="store_true", help="make all mtimes zero")
    mk.add_argument("--skip-devices", action="store_true", help="don't store device nodes")
    mk.add_argument("--skip-xattrs", action="store_true", help="don't store file xattrs")
    mk.add_argument("--user-xattrs", action="store_true", help="only store user.* xattrs")
    mk.add_argument("--print-digest", action="store_true", help="print the image's digest")
    mk.add_argument(
        "--print-digest-only", action="store_true", help="print the digest, write no image"
    )
    mk.add_argument("--from-file", action="store_true", help="SOURCE is a dumpfile (- for stdin)")
    mk.add_argument("--min-version", type=int, metavar="N", help="minimal format version (0)")
    mk.add_argument("--max-version", type=int, metavar="N", help="maximal format version (1)")
    mk.add_argument("--threads", type=int, metavar="N", help="accepted for compatibility")
    info = sub.add_parser("composefs-info", help="C composefs-info: show what images hold")
    info.add_argument(
        "info_command",
        choices=["ls", "objects", "missing-objects", "dump", "measure-file"],
        metavar="{ls,objects,missing-objects,dump,measure-file}",
    )
    info.add_argument("files", nargs="+", metavar="FILE")
    info.add_argument("--basedir", metavar="PATH", help="for missing-objects: the object store")


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "init": cmd_init,
    "measure-file": cmd_measure_file,
    "cat": cmd_cat,
    "demo": cmd_demo,
    "oci import-layer": cmd_oci_import_layer,
    "oci layer": cmd_oci_layer,
    "oci pull": cmd_oci_pull,
    "oci images": cmd_oci_images,
    "oci inspect": cmd_oci_inspect,
    "oci tag": cmd_oci_tag,
    "oci untag": cmd_oci_untag,
    "oci copy": cmd_oci_copy,
    "fsck": cmd_fsck,
    "oci fsck": cmd_oci_fsck,
    "gc": cmd_gc,
    "mount": cmd_mount,
    "oci mount": cmd_oci_mount,
    "transaction": cmd_transaction,
    "images": cmd_images,
    "image-objects": cmd_image_objects,
    "dump-files": cmd_dump_files,
    "create-image": cmd_create_image,
    "compute-id": cmd_compute_id,
    "create-dumpfile": cmd_create_dumpfile,
    "oci compute-id": cmd_oci_compute_id,
    "oci dump": cmd_oci_dump,
    "mkcomposefs": cmd_mkcomposefs,
    "composefs-info": cmd_composefs_info,
}


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; return the exit status (what :func:`main` exits with)."""
    try:
        args = _build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
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
        message = f"{e.strerror or e}{where}"
    else:
        message = str(e)
    notes = [n for n in getattr(e, "__notes__", ()) if isinstance(n, str)]
    return message + (f" ({'; '.join(notes)})" if notes else "")


#: Names under which the console script acts as that C tool (as cfsctl does by argv0).
C_TOOL_NAMES = ("mkcomposefs", "composefs-info")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``trio-cfsctl`` console script (``mkcomposefs`` or
    ``composefs-info`` when invoked under that name, e.g. through a symlink)."""
    if argv is None and os.path.basename(sys.argv[0]) in C_TOOL_NAMES:
        argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
    sys.exit(run(argv))
