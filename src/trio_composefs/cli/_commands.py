"""The bodies of the ``trio-cfsctl`` commands: each takes the parsed arguments and the
output stream, and returns the exit status."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import trio

from .._errors import ComposefsError, VerityUnsupportedError
from ..formats import Algorithm, ExternalChunk, FsVerityHasher
from ..importer import (
    ByteSource,
    LayerStats,
    layer_content_id,
    open_importer,
)
from ..repository import META_JSON, Repository
from ._progress import PullProgress, Renderer, human_bytes, plural

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
    path = _repo_path(args)
    if not os.path.lexists(path):
        raise UsageError(
            f"no repository at {path}; create one with `{PROG} --repo {path} init`"
            " (add --insecure on a filesystem without fs-verity)"
        )
    timeout = getattr(args, "lock_timeout", None)

    def waiting() -> None:
        limit = "until it is free" if timeout is None else f"at most {timeout:g} s"
        print(
            f"{PROG}: another process (gc) holds the repository's exclusive lock; waiting {limit}",
            file=sys.stderr,
            flush=True,
        )

    return Repository.open(
        path, insecure=True if args.insecure else None, on_wait=waiting, lock_timeout=timeout
    )


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest_arg(text: str, what: str = "DIFF_ID") -> str:
    """A ``sha256:<64 lowercase hex>`` argument, checked before any lookup."""
    if not _DIGEST.fullmatch(text):
        raise UsageError(f"{what} {text!r} is not a digest (expected sha256:<64 hex digits>)")
    return text


def _refuse_terminal(what: str) -> None:
    """cfsctl's rule: binary data never goes to a terminal."""
    if sys.stdout is not None and sys.stdout.isatty():
        raise UsageError(
            f"refusing to write {what} to a terminal; redirect it to a file or pipe it"
            " (e.g. to tar)"
        )


# --- commands ---------------------------------------------------------------


def cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    path = args.path or _repo_path(args)
    insecure = bool(args.init_insecure or args.insecure)
    existed = os.path.lexists(os.path.join(path, META_JSON))
    try:
        repo = Repository.init(path, algorithm=Algorithm(args.algorithm), insecure=insecure)
    except VerityUnsupportedError:
        raise VerityUnsupportedError(
            f"the filesystem of {path} has no fs-verity, so run `{PROG} --repo {path} init"
            " --insecure` for a repository that computes digests in userspace"
        ) from None
    with repo:
        # cfsctl's lines
        if existed:
            print(f"Repository already initialized at {repo.path}", file=out)
        else:
            print(f"Initialized composefs repository at {repo.path}", file=out)
            print(f"  algorithm: {repo.algorithm.value}", file=out)
            verity = "not required (insecure)" if repo.insecure else "required"
            print(f"  verity:    {verity}", file=out)
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

    _refuse_terminal("a stream's bytes")
    with _open_repo(args) as repo:
        copy_stream(repo, args.name, _stdout_writer())
    return 0


def cmd_oci_layer(args: argparse.Namespace, out: TextIO) -> int:
    from ..repository import copy_stream, iter_layer_entries
    from ._format import format_entry, layer_dumpfile_line

    name = layer_content_id(check_digest_arg(args.diff_id))
    if not (args.list or args.json or args.dumpfile):
        _refuse_terminal("tar data")
    with _open_repo(args) as repo:
        if repo.has_stream(name) is None:
            from .._errors import ObjectNotFoundError

            raise ObjectNotFoundError(f"layer {args.diff_id} not found in {repo.path}")
        if args.list:
            for entry in iter_layer_entries(repo, name):
                print(format_entry(entry), file=out)
        elif args.dumpfile:
            write = _stdout_writer(out)
            for entry in iter_layer_entries(repo, name):
                write(layer_dumpfile_line(entry) + b"\n")
        elif args.json:
            import json

            print(json.dumps(_layer_info(repo, args.diff_id), indent=2), file=out)
        else:
            copy_stream(repo, name, _stdout_writer())
    return 0


def _layer_info(repo: Repository, diff_id: str) -> dict[str, Any]:
    """cfsctl's ``LayerInfo`` (camelCase): diffId, verity, size, entryCount and
    splitstream {externalObjects, externalSize, inlineSize}."""
    from ..formats import ExternalChunk
    from ..repository import iter_layer_entries, open_splitstream

    name = layer_content_id(diff_id)
    with open_splitstream(repo, name) as (info, _data):
        size = info.stream_size
        external_objects = len(info.object_refs)
    entries = 0
    external_size = 0
    for entry in iter_layer_entries(repo, name):
        entries += 1
        if isinstance(entry.content, ExternalChunk):
            external_size += entry.content.size
    verity = repo.has_stream(name)
    return {
        "diffId": diff_id,
        "verity": verity.hex() if verity is not None else None,
        "size": size,
        "entryCount": entries,
        "splitstream": {
            "externalObjects": external_objects,
            "externalSize": external_size,
            "inlineSize": max(size - external_size, 0),
        },
    }


def _stdout_writer(out: TextIO | None = None) -> Callable[[bytes], object]:
    if out is not None and out is not sys.stdout:  # a test's StringIO
        return lambda data: out.write(data.decode("utf-8", "surrogateescape"))
    if sys.stdout is None:
        raise UsageError("standard output is closed")
    sys.stdout.flush()
    fd = sys.stdout.fileno()

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def _summary(stats: LayerStats, seconds: float) -> str:
    if stats.skipped:
        return f"{stats.diff_id}: skipped: already present"
    mib = stats.tar_bytes / 2**20
    return (
        f"{stats.diff_id}: {mib:.1f} MiB in {seconds:.2f} s ({mib / max(seconds, 1e-6):.1f} MiB/s);"
        f" {plural(stats.objects, 'object')} ({stats.objects_written} new,"
        f" {stats.objects_deduplicated} already present), {stats.inline_bytes} bytes inline"
    )


def objects_line(new: int, present: int, stored: int, inlined: int) -> str:
    """cfsctl's ``objects`` line (its ``ImportStats`` display without zero-copy):
    ``N new + M already present objects; <stored> stored, <inlined> inlined``."""
    return (
        f"{new} new + {present} already present objects;"
        f" {human_bytes(stored)} stored, {human_bytes(inlined)} inlined"
    )


async def _import_one(
    repo: Repository,
    source: ByteSource,
    diff_id: str,
    name: str | None,
    jobs: int | None,
    progress: bool,
) -> LayerStats:
    with Renderer(enabled=progress) as renderer:
        display = PullProgress(renderer)
        file = _regular_file(source)
        async with open_importer(repo, jobs=jobs) as importer, trio.open_nursery() as nursery:
            if file is not None and renderer.live:
                # A file's offset says how far the importer has read: a live line with a
                # total and an ETA, moved by time, not by the importer's 64 MiB events.
                fd, start, size = file
                renderer.add(diff_id, diff_id.removeprefix("sha256:")[:12], size)
                display.started[diff_id] = time.monotonic()
                nursery.start_soon(_follow_offset, renderer, diff_id, fd, start)
                callback = None
            else:
                callback = display.layer
            stats = await importer.import_layer(source, diff_id, name=name, progress=callback)
            nursery.cancel_scope.cancel()
            return stats


def _regular_file(source: ByteSource) -> tuple[int, int, int] | None:
    """``(fd, offset, bytes left)`` when ``source`` is an fd on a regular file."""
    import stat

    if not isinstance(source, int):
        return None
    try:
        st = os.fstat(source)
        start = os.lseek(source, 0, os.SEEK_CUR)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return source, start, max(st.st_size - start, 0)


async def _follow_offset(renderer: Renderer, key: str, fd: int, start: int) -> None:
    while True:
        try:
            renderer.update(key, os.lseek(fd, 0, os.SEEK_CUR) - start)
        except OSError:
            return
        await trio.sleep(0.1)


def cmd_oci_import_layer(args: argparse.Namespace, out: TextIO) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    check_digest_arg(args.diff_id)
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
    # cfsctl prints the stream's object id with its algorithm: sha256:<hex> or sha512:<hex>.
    print(f"{stats.splitstream.algorithm.hash_name}:{stats.splitstream.hex()}", file=out)
    if not args.no_progress:
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
    if not os.path.exists(os.path.join(path, META_JSON)):
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


def cmd_oci_pull(args: argparse.Namespace, out: TextIO) -> int:
    from ..oci import ImageStats, Platform, open_source, parse_source, pull_image
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

    async def go(repo: Repository) -> ImageStats:
        with Renderer(enabled=not args.no_progress) as renderer:
            async with (
                open_importer(repo, jobs=args.jobs) as importer,
                open_source(ref, skopeo=skopeo) as source,
            ):
                if platform is not None:
                    await _warn_platform(source, platform, renderer)
                return await pull_image(
                    importer, source, tag=tag, platform=platform, progress=PullProgress(renderer)
                )

    start = time.monotonic()
    with _open_repo(args) as repo:
        stats = trio.run(go, repo)
    seconds = time.monotonic() - start
    # cfsctl's five lines, in its order; ours (image) after them.
    print(f"manifest {stats.manifest_digest}", file=out)
    print(f"config   {stats.config_digest}", file=out)
    print(f"verity   {stats.manifest_stream.hex()}", file=out)
    print(f"tagged   {tag}", file=out)
    inline = sum(layer.inline_bytes for layer in stats.layers)
    print(
        "objects  "
        + objects_line(
            stats.objects_written, stats.objects_deduplicated, stats.object_bytes, inline
        ),
        file=out,
    )
    if stats.image is not None:
        print(f"image    {stats.image.hex()}", file=out)
    if not args.no_progress:
        n = len(stats.layers)
        if stats.skipped:
            summary = f"{plural(n, 'layer')}, image already present"
        else:
            summary = (
                f"{plural(n, 'layer')} ({stats.layers_imported} imported,"
                f" {n - stats.layers_imported} already present);"
                f" {human_bytes(stats.tar_bytes)} of tar"
            )
        print(f"{summary}; {seconds:.2f} s", file=sys.stderr)
    return 0


async def _warn_platform(source: Any, platform: Any, renderer: Renderer) -> None:
    """podman's warning when ``--platform`` does not match a single-manifest image.

    An index picks the manifest of the platform (or fails); a lone manifest is
    pulled whatever its config says, so its config's ``os``/``architecture``
    (``variant``) are compared with the request and a mismatch is said once.
    """
    import json

    from ..oci import Descriptor

    try:
        resolved = await source.resolve(platform)
        manifest = json.loads(resolved.manifest)
        config_desc = Descriptor.from_json(manifest["config"], where="the manifest's config")
        config = json.loads(await source.read_blob(config_desc))
    except (ComposefsError, ValueError, KeyError, TypeError):
        return  # the pull itself says what is wrong
    if not isinstance(config, dict) or "architecture" not in config:
        return  # an artifact: no platform
    found = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    if config.get("variant"):
        found += f"/{config['variant']}"
    wanted = (platform.os, platform.architecture)
    variant_differs = platform.variant is not None and config.get("variant") != platform.variant
    if (config.get("os"), config.get("architecture")) != wanted or variant_differs:
        message = (
            f"{PROG}: warning: image platform ({found}) does not match the expected"
            f" platform ({platform}); it has a single manifest, so it is pulled anyway"
        )
        if renderer.live:
            renderer.note(message)
        else:
            print(message, file=sys.stderr, flush=True)


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
        digest = i.manifest_digest.removeprefix("sha256:")
        if not args.no_trunc:
            digest = digest[:12]
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
