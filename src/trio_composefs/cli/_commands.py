"""The bodies of the ``trio-cfsctl`` commands: each takes the parsed arguments and the
output stream, and returns the exit status."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import trio

from .._errors import ComposefsError, VerityUnsupportedError
from ..formats import Algorithm, ExternalChunk, FsVerityHasher
from ..importer import (
    ByteSource,
    LayerProgress,
    LayerStats,
    layer_content_id,
    open_importer,
)
from ..repository import Repository

PROG = "trio-cfsctl"
USER_REPO = "~/.var/lib/composefs"
SYSTEM_REPO = "/sysroot/composefs"


class UsageError(ComposefsError):
    """A mistake on the command line."""


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
    from ..repository import copy_stream

    with _open_repo(args) as repo:
        copy_stream(repo, args.name, _stdout_writer())
    return 0


def cmd_oci_layer(args: argparse.Namespace, out: TextIO) -> int:
    from ..repository import copy_stream, iter_layer_entries
    from ._format import format_entry

    name = layer_content_id(args.diff_id)
    with _open_repo(args) as repo:
        if args.list:
            for entry in iter_layer_entries(repo, name):
                print(format_entry(entry), file=out)
        else:
            copy_stream(repo, name, _stdout_writer())
    return 0


def _stdout_writer() -> Callable[[bytes], object]:
    if sys.stdout is None:
        raise UsageError("standard output is closed")
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
        # A plain fd, read with os.read: no buffered reader whose lock a reading
        # thread, abandoned on Ctrl-C while blocked on a pipe, would still hold.
        fd: int | None = None
        if args.file:
            try:
                fd = os.open(args.file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ComposefsError(f"{args.file}: {e.strerror}") from None
            source: ByteSource = fd
        elif sys.stdin is None:
            raise UsageError("standard input is closed: give the tar with --file PATH")
        else:
            source = sys.stdin.fileno()
        try:
            stats = trio.run(
                _import_one, repo, source, args.diff_id, args.name, args.jobs, not args.no_progress
            )
        finally:
            if fd is not None:
                os.close(fd)
    print(stats.splitstream.hex(), file=out)
    print(_summary(stats, time.monotonic() - start), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Pull the built-in sample image (creating the repository if needed) and show it."""
    import tempfile

    from ..oci import open_source, parse_source, pull_image
    from ..repository import copy_stream, iter_layer_entries
    from ..testing import write_sample_layout
    from ._format import format_entry

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

    with tempfile.TemporaryDirectory(prefix="trio-cfs-sample-") as tmp, _open_repo(args) as repo:
        reference = write_sample_layout(os.path.join(tmp, "layout"))
        print(f"wrote the built-in sample image as an OCI layout: {reference}", file=out)

        async def pull() -> Any:
            async with open_importer(repo) as importer, open_source(parse_source(reference)) as src:
                return await pull_image(importer, src, tag="sample")

        start = time.monotonic()
        stats = trio.run(pull)
        seconds = time.monotonic() - start
        print(f"pulled it as tag 'sample' in {seconds:.2f} s", file=out)
        print(f"  manifest {stats.manifest_digest}", file=out)
        print(f"  config   {stats.config_digest}", file=out)
        for layer in stats.layers:
            print(f"\nlayer {layer.diff_id}", file=out)
            print(f"  splitstream {layer.splitstream.hex()}", file=out)
            if layer.skipped:
                print("  already in the repository", file=out)
            else:
                print(
                    f"  {layer.tar_bytes / 2**20:.1f} MiB of tar; {layer.objects} objects"
                    f" ({layer.objects_written} new, {layer.objects_deduplicated} deduplicated),"
                    f" {layer.inline_bytes} bytes inline",
                    file=out,
                )
            name = layer_content_id(layer.diff_id)
            for entry in iter_layer_entries(repo, name):
                where = (
                    f"   [object {entry.content.digest.object_path()[:14]}…]"
                    if isinstance(entry.content, ExternalChunk)
                    else ""
                )
                print("  " + format_entry(entry) + where, file=out)
            h = hashlib.sha256()
            copy_stream(repo, name, h.update)
            ok = "sha256:" + h.hexdigest() == layer.diff_id
            print(f"  cat: {'identical to the original tar' if ok else 'MISMATCH'}", file=out)
            if not ok:
                return 1
        if stats.image is not None:
            from ..fs import write_dumpfile
            from ..oci import image_filesystem, open_image

            size = repo.object_size(stats.image)
            print(f"\ncomposefs image {stats.image.hex()}", file=out)
            print(
                f"  a {size}-byte V1 EROFS (byte-identical to C mkcomposefs --min-version=1);"
                " its merged tree as a dumpfile:",
                file=out,
            )
            for line in write_dumpfile(image_filesystem(repo, open_image(repo, "sample"))):
                text = line.decode("ascii", "replace").rstrip("\n")
                print("  " + (text if len(text) <= 110 else text[:109] + "…"), file=out)
            _demo_mount(repo, stats.image.hex(), out)
        objects = sum(1 for _ in repo.iter_objects())
        print(
            f"\nthe repository {repo.path} now holds {objects} objects;"
            f" try: trio-cfsctl --repo {repo.path} oci images",
            file=out,
        )
    return 0


def _demo_mount(repo: Repository, image: str, out: TextIO) -> None:
    """Mount the sample's image on a temporary directory, show a little, unmount (root only)."""
    import tempfile

    from ..mount import MountError, mount_image, unmount

    if os.geteuid() != 0:
        print(
            "\nnot root, so the image is not mounted (as root: trio-cfsctl"
            f" --repo {repo.path} oci mount sample MOUNTPOINT)",
            file=out,
        )
        return
    with tempfile.TemporaryDirectory(prefix="trio-cfs-mnt-") as mountpoint:
        try:
            result = mount_image(repo, image, mountpoint)
        except MountError as e:
            print(f"\ncould not mount the image: {e}", file=out)
            return
        try:
            print(f"\nmounted it ({result.describe()}):", file=out)
            for rel in ("usr/bin", "opt/app"):
                names = sorted(os.listdir(os.path.join(mountpoint, rel)))
                print(f"  ls /{rel}: {' '.join(names)}", file=out)
            with open(os.path.join(mountpoint, "usr/bin/hello"), "rb") as f:
                print(f"  /usr/bin/hello: {f.readline().decode().strip()} …", file=out)
            big = os.path.join(mountpoint, "usr/lib/big.bin")
            with open(big, "rb") as f:
                h = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            print(
                f"  /usr/lib/big.bin: {os.path.getsize(big)} bytes read from its object"
                f" (sha256 {h.hexdigest()[:16]}…)",
                file=out,
            )
        finally:
            unmount(mountpoint)
        print("  unmounted", file=out)


def cmd_fsck(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from ..maintenance import FsckProgress, fsck

    show = not args.no_progress and sys.stderr.isatty()

    def progress(p: FsckProgress) -> None:
        if show:
            sys.stderr.write(
                f"\r\x1b[K{p.phase}: {p.done}/{p.total}, {p.objects_checked} objects,"
                f" {p.bytes_hashed / 2**20:.1f} MiB hashed"
            )
            sys.stderr.flush()

    with _open_repo(args) as repo:
        try:
            report = trio.run(
                lambda: fsck(
                    repo,
                    check_objects=not args.metadata_only,
                    check_layers=not args.no_check_layers,
                    progress=progress,
                )
            )
        finally:
            if show:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
    if args.json:
        print(json.dumps(report.to_json(), indent=2), file=out)
    else:
        for line in report.summary():
            print(line, file=out)
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from ..maintenance import gc

    def waiting() -> None:
        print(
            f"{PROG}: waiting for the repository's exclusive lock (another process has it open)",
            file=sys.stderr,
        )

    with _open_repo(args) as repo:
        result = gc(repo, args.root, dry_run=args.dry_run, on_wait=waiting)
    if args.json:
        print(json.dumps(result.to_json(), indent=2), file=out)
        return 0
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
        f"{verb} {len(result.objects_removed)} objects ({result.objects_bytes} bytes),"
        f" {len(result.tmpfiles_removed)} temporary files ({result.tmpfiles_bytes} bytes),"
        f" {len(result.links_pruned)} links; {result.bytes_freed} bytes"
        f" {'would be ' if result.dry_run else ''}freed; {result.live_objects} objects live",
        file=out,
    )
    return 0


def cmd_oci_pull(args: argparse.Namespace, out: TextIO) -> int:
    from ..oci import ImageProgress, ImageStats, Platform, open_source, parse_source, pull_image
    from ..oci.sources import SkopeoOptions

    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    ref = parse_source(args.source)
    skopeo = SkopeoOptions(tls_verify=args.tls_verify, authfile=args.authfile, creds=args.creds)
    if skopeo != SkopeoOptions() and ref.transport in ("oci", "oci-archive", "docker-archive"):
        raise UsageError(
            f"--tls-verify, --authfile and --creds are for registries (skopeo transports),"
            f" not {ref.transport}:"
        )
    platform = Platform.parse(args.platform) if args.platform else None
    tag = args.tag if args.tag is not None else args.source
    line = _ProgressLine(not args.no_progress)

    def progress(p: ImageProgress) -> None:
        if p.layer is None:
            return
        if not p.layer.done:
            line(p.layer)
        elif line.enabled:  # one permanent line per finished layer, on a TTY only
            line.close()
            line.shown = False
            sys.stderr.write(
                f"{p.layer.diff_id[:19]}…  {p.layer.bytes_read / 2**20:8.1f} MiB, objects"
                f" {p.layer.objects_written} new, {p.layer.objects_deduplicated} dedup"
                f"  [{p.layers_done}/{p.layers_total} layers]\n"
            )

    async def go(repo: Repository) -> ImageStats:
        async with (
            open_importer(repo, jobs=args.jobs) as importer,
            open_source(ref, skopeo=skopeo) as source,
        ):
            return await pull_image(importer, source, tag=tag, platform=platform, progress=progress)

    start = time.monotonic()
    with _open_repo(args) as repo:
        try:
            stats = trio.run(go, repo)
        finally:
            line.close()
    seconds = time.monotonic() - start
    print(f"manifest {stats.manifest_digest}", file=out)
    print(f"config   {stats.config_digest}", file=out)
    print(f"verity   {stats.manifest_stream.hex()}", file=out)
    print(f"tagged   {tag}", file=out)
    if stats.image is not None:
        print(f"image    {stats.image.hex()}", file=out)
    if stats.skipped:
        summary = f"{len(stats.layers)} layers, image already present"
    else:
        mib = stats.tar_bytes / 2**20
        summary = (
            f"{len(stats.layers)} layers ({stats.layers_imported} imported,"
            f" {len(stats.layers) - stats.layers_imported} already present);"
            f" {mib:.1f} MiB of tar; objects {stats.objects_written} new,"
            f" {stats.objects_deduplicated} deduplicated ({stats.object_bytes} bytes of files)"
        )
    print(f"{summary}; {seconds:.2f} s", file=sys.stderr)
    return 0


def cmd_oci_images(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from ..oci import list_images

    with _open_repo(args) as repo:
        images = list_images(repo)
    if args.json:
        print(json.dumps({"images": [i.to_json() for i in images]}, indent=2), file=out)
        return 0
    if not images:
        print("No images found", file=out)
        return 0
    rows = [["NAME", "DIGEST", "ARCH", "LAYERS", "REFS"]]
    for i in images:
        digest = i.manifest_digest.removeprefix("sha256:")[:12]
        arch = i.architecture or "artifact"
        rows.append([i.name, digest, arch, str(i.layer_count), str(i.referrer_count)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    rows.insert(1, ["-" * w for w in widths])
    for r in rows:
        cells = (cell.ljust(w) for cell, w in zip(r, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)
    return 0


def cmd_oci_inspect(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from ..oci import open_image

    with _open_repo(args) as repo:
        image = open_image(repo, args.image)
    if args.manifest or args.config:
        raw = image.manifest if args.manifest else image.config
        out.flush()
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            buffer.write(raw + b"\n")
            buffer.flush()
        else:
            out.write(raw.decode("utf-8", "surrogateescape") + "\n")
        return 0
    reply: dict[str, object] = {
        "manifest": image.manifest.decode("utf-8", "replace"),
        "config": image.config.decode("utf-8", "replace"),
        "referrers": [],
        "composefs_erofs": image.image.hex() if image.image is not None else None,
        "composefs_boot_erofs": None,
    }
    print(json.dumps(reply, indent=2), file=out)
    return 0


def cmd_oci_tag(args: argparse.Namespace, out: TextIO) -> int:
    from ..oci import tag_image

    with _open_repo(args) as repo:
        tag_image(repo, args.digest, args.name)
    print(f"Tagged {args.digest} as {args.name}", file=out)
    return 0


def cmd_oci_untag(args: argparse.Namespace, out: TextIO) -> int:
    from ..oci import untag_image

    with _open_repo(args) as repo:
        untag_image(repo, args.name)
    print(f"Removed tag {args.name}", file=out)
    return 0
