"""Issue 10 (store safety), classes 1 and 5-13, and issue 9's closed repository.

Each test builds the hostile input with plain Python or real tools, runs the real
CLI (``python -m trio_composefs``) or the library, and checks what a user sees: exit
status 1, one line on stderr naming the file, no traceback, nothing outside the
repository touched, bounded time and memory where the class is about them.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import zstandard

from ocifixtures import Layout, make_tar, sha256
from trio_composefs import (
    ComposefsError,
    FormatError,
    InvalidNameError,
    RepositoryError,
)
from trio_composefs.formats._json import MAX_DEPTH, load_json
from trio_composefs.importer._decompress import open_verified_stream
from trio_composefs.oci import Platform
from trio_composefs.oci._model import Descriptor, parse_source
from trio_composefs.repository import Repository, check_ref_name

CLI = [sys.executable, "-m", "trio_composefs"]


def cli(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]


def one_line_error(done: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """Exit status 1, a single stderr line, no traceback, naming every needle."""
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    done = cli("--repo", str(path), "init", "--insecure")
    assert done.returncode == 0, done.stderr
    return path


def snapshot(path: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``path``: (mode, content or link target), to detect any change."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root, name)
            st = p.lstat()
            if p.is_symlink():
                out[str(p)] = (st.st_mode, os.readlink(p))
            elif p.is_file():
                out[str(p)] = (st.st_mode, p.read_bytes())
            else:
                out[str(p)] = (st.st_mode, b"")
    return out


def make_chain(parent: Path, depth: int) -> None:
    """``parent/d/d/.../d``, ``depth`` levels (deeper than Python's recursion limit)."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


def remove_chain(parent: Path) -> None:
    """Remove what :func:`make_chain` made, iteratively (pytest's own cleanup recurses)."""
    fds = [os.open(parent, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        while True:
            try:
                fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            except FileNotFoundError:
                break
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir("d", dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


def simple_layout(tmp_path: Path, name: str = "layout") -> tuple[Layout, str]:
    layout = Layout(tmp_path / name)
    image = layout.add_image([make_tar([("hello.txt", b"hello world\n" * 20)])], tag="v1")
    layout.write_index()
    return layout, image.manifest_digest


# ---------------------------------------------------------------- 1: names like temp files


@pytest.mark.parametrize("bad", [".symlink-abc", "a/.hidden", ".tmp-object-x", "x/./y", "."])
def test_check_ref_name_refuses_dot_components(bad: str) -> None:
    with pytest.raises(InvalidNameError):
        check_ref_name(bad)
    assert issubclass(InvalidNameError, ComposefsError)
    assert issubclass(InvalidNameError, ValueError)


def test_dot_names_refused_by_every_command_before_any_work(
    tmp_path: Path, repo_path: Path
) -> None:
    layout, manifest = simple_layout(tmp_path)
    tar = make_tar([("f", b"data" * 100)])
    tar_file = tmp_path / "layer.tar"
    tar_file.write_bytes(tar)
    before = snapshot(repo_path)
    r = str(repo_path)
    # pull with a bad tag: refused before anything is written
    done = cli("--repo", r, "oci", "pull", f"oci:{layout.path}:v1", ".symlink-evil")
    one_line_error(done, ".symlink-evil")
    # import-layer with a bad ref name: nothing stored either
    done = cli(
        "--repo", r, "oci", "import-layer", sha256(tar), "x/.symlink-1", "--file", str(tar_file)
    )
    one_line_error(done, ".symlink-1")
    assert snapshot(repo_path) == before
    # a good pull, then tag with a bad name
    assert cli("--repo", r, "oci", "pull", f"oci:{layout.path}:v1", "good").returncode == 0
    done = cli("--repo", r, "oci", "tag", manifest, ".symlink-xyz")
    one_line_error(done, ".symlink-xyz")
    assert not list(repo_path.glob("streams/refs/**/.symlink-*"))
    images = cli("--repo", r, "oci", "images")
    assert b"good" in images.stdout


def test_image_ref_with_dot_component_is_refused(repo: Repository) -> None:
    digest = repo.store_object(b"not really an image")
    with pytest.raises(InvalidNameError, match=r"starts with '\.'"):
        repo.publish_image(digest, "x/.symlink-abc")
    assert not (Path(repo.path) / "images" / digest.hex()).exists()


# ---------------------------------------------------------------- 10: long and deep refs


def test_deep_and_long_refs_refused_before_any_work(tmp_path: Path, repo_path: Path) -> None:
    tar = make_tar([("f", b"data" * 100)])
    tar_file = tmp_path / "layer.tar"
    tar_file.write_bytes(tar)
    before = snapshot(repo_path)
    for deep, why in (
        ("/".join(["d"] * 40), "40 path components"),
        ("/".join(["d"] * 2000), "3999 bytes long"),
    ):
        done = cli(
            "--repo",
            str(repo_path),
            "oci",
            "import-layer",
            sha256(tar),
            deep,
            "--file",
            str(tar_file),
        )
        one_line_error(done, why)
    long = "x" * 200 + "/" + "y" * 200 + "/" + "z" * 200 + "/" + "w" * 200 + "/" + "v" * 250
    done = cli(
        "--repo", str(repo_path), "oci", "import-layer", sha256(tar), long, "--file", str(tar_file)
    )
    one_line_error(done, "bytes long")
    assert snapshot(repo_path) == before  # no stream published, no directory made


def test_deep_ref_tree_is_listed_without_recursion(repo: Repository) -> None:
    digest = repo.store_object(b"x")
    repo.publish_stream("s", digest, "ok/ref")
    # A tree deeper than Python's recursion limit, as an old version could leave it.
    path = Path(repo.path) / "streams" / "refs"
    make_chain(path, 1500)
    try:
        assert repo.list_stream_refs() == {"ok/ref": "s"}  # no RecursionError
        done = cli("--repo", repo.path, "oci", "images")
        assert done.returncode == 0, done.stderr
    finally:
        remove_chain(path)
    # a tree within the limits is listed (iteratively)
    nested = "/".join(["n"] * 31)
    repo.publish_stream("s", digest, nested)
    assert repo.list_stream_refs() == {"ok/ref": "s", nested: "s"}


def test_stream_not_published_when_ref_cannot_be_created(repo: Repository) -> None:
    digest = repo.store_object(b"x")
    repo.publish_stream("s1", digest, "a")  # streams/refs/a is a symlink
    with pytest.raises(RepositoryError, match="not a directory"):
        repo.publish_stream("s2", digest, "a/b")  # 'a' cannot be a directory
    assert not (Path(repo.path) / "streams" / "s2").exists()


# ---------------------------------------------------------------- issue 9: closed repository


def test_closed_repository_refuses_calls_even_after_fd_reuse(tmp_path: Path) -> None:
    from trio_composefs.oci import list_tags, tag_image, untag_image

    layout, manifest = simple_layout(tmp_path)
    paths = [tmp_path / "one", tmp_path / "two"]
    for p in paths:
        assert cli("--repo", str(p), "init", "--insecure").returncode == 0
        assert cli("--repo", str(p), "oci", "pull", f"oci:{layout.path}:v1", "t").returncode == 0
    first = Repository.open(paths[0])
    old_fd = first._dirfd
    first.close()
    second = Repository.open(paths[1])
    try:
        assert second._dirfd == old_fd  # the old number now names the other repository
        with pytest.raises(RepositoryError, match="is closed"):
            untag_image(first, "t")
        with pytest.raises(RepositoryError, match="is closed"):
            first.list_stream_refs()
        with pytest.raises(RepositoryError, match="is closed"):
            tag_image(first, manifest, "other")
        with pytest.raises(RepositoryError, match="is closed"):
            first.store_object(b"x")
        with pytest.raises(RepositoryError, match="is closed"):
            first.list_images()
        assert [t for t, _ in list_tags(second)] == ["t"]  # untouched
        assert first.closed
    finally:
        second.close()
    first.close()  # still idempotent


# ---------------------------------------------------------------- 5: layout blob symlinks


def test_layout_blob_symlink_outside_is_refused(tmp_path: Path, repo_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOPSECRETDATA-" * 100)
    layout, _ = simple_layout(tmp_path)
    tar = make_tar([("f", b"z" * 1000)])
    image = layout.add_image([tar], tag="evil")
    layout.write_index()
    blob = layout.blob_path(image.layer_digests[0])
    blob.unlink()
    blob.symlink_to(secret)
    before = secret.read_bytes()
    done = cli("--repo", str(repo_path), "oci", "pull", f"oci:{layout.path}:evil", "e")
    line = one_line_error(done, "outside the layout")
    assert "TOPSECRET" not in line
    assert secret.read_bytes() == before
    # an in-layout symlink is fine
    inside = layout.path / "blobs" / "copy"
    inside.write_bytes(tar)
    blob.unlink()
    blob.symlink_to(inside)
    assert (
        cli("--repo", str(repo_path), "oci", "pull", f"oci:{layout.path}:evil", "e").returncode == 0
    )


def test_garbage_blob_error_quotes_no_bytes(tmp_path: Path, repo_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    garbage = b"root:$6$secretsalt$hash:19000:0:99999:7:::\n" * 30
    digest, size = layout.add_blob(garbage)
    cfg = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest]}}
    ).encode()
    cdigest, csize = layout.add_blob(cfg)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cdigest,
                "size": csize,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest,
                    "size": size,
                }
            ],
        }
    ).encode()
    mdigest, msize = layout.add_blob(manifest)
    layout.index.append(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest,
            "size": msize,
            "annotations": {"org.opencontainers.image.ref.name": "g"},
        }
    )
    layout.write_index()
    done = cli("--repo", str(repo_path), "oci", "pull", f"oci:{layout.path}:g", "g")
    line = one_line_error(done, digest)  # names the layer (#11)
    assert "secret" not in line
    assert "root:" not in line


# ---------------------------------------------------------------- 6: FIFO archives


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
def test_archive_fifo_is_refused_without_blocking(
    tmp_path: Path, repo_path: Path, transport: str
) -> None:
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    start = time.monotonic()
    done = cli("--repo", str(repo_path), "oci", "pull", f"{transport}:{fifo}", "t", timeout=30)
    one_line_error(done, str(fifo), "not a regular file")
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------- 7, 9, 13: meta.json


def _limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "huge", "deep", "types"])
def test_hostile_meta_json(tmp_path: Path, repo_path: Path, kind: str) -> None:
    meta = repo_path / "meta.json"
    meta.unlink()
    expect = str(meta)
    if kind == "dev-zero":
        meta.symlink_to("/dev/zero")
        expect_why = "symbolic link"
    elif kind == "fifo":
        os.mkfifo(meta)
        expect_why = "not a regular file"
    elif kind == "directory":
        meta.mkdir()
        expect_why = "is a directory"
    elif kind == "huge":
        meta.write_bytes(b" " * (10 << 20) + b"{}")
        expect_why = "more than"
    elif kind == "deep":
        meta.write_bytes(b"[" * 5000 + b"]" * 5000)
        expect_why = "nested too deeply"
    else:
        meta.write_bytes(b'{"version": [1], "algorithm": {"a": 1}}')
        expect_why = "invalid 'version'"
    for args in (["oci", "images"], ["gc", "--dry-run"], ["init", "--insecure"]):
        done = cli(
            "--repo",
            str(repo_path),
            *args,
            timeout=20,
            preexec_fn=lambda: _limit_memory(1 << 30),
        )
        one_line_error(done, expect, expect_why)


def test_init_with_unknown_incompatible_feature_names_it(repo_path: Path) -> None:
    meta = json.loads((repo_path / "meta.json").read_text())
    meta["features"]["incompatible"] = ["frobnicate"]
    (repo_path / "meta.json").write_text(json.dumps(meta))
    done = cli("--repo", str(repo_path), "init", "--insecure")
    one_line_error(done, "frobnicate", str(repo_path))


# ---------------------------------------------------------------- 8: tar index limits


def _pax_bomb(path: Path, header_size: int) -> None:
    """A tar whose first header claims a PAX extension of ``header_size`` bytes (sparse file)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = header_size
    block = info.tobuf(format=tarfile.USTAR_FORMAT)
    with open(path, "wb") as f:
        f.write(block)
        f.truncate(len(block) + header_size + 4096)  # a sparse gigabyte of NULs


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
def test_huge_pax_header_fails_fast_in_bounded_memory(
    tmp_path: Path, repo_path: Path, transport: str
) -> None:
    bomb = tmp_path / "bomb.tar"
    _pax_bomb(bomb, 1 << 30)
    start = time.monotonic()
    done = cli(
        "--repo",
        str(repo_path),
        "oci",
        "pull",
        f"{transport}:{bomb}",
        "t",
        timeout=30,
        preexec_fn=lambda: _limit_memory(600 << 20),
    )
    one_line_error(done, str(bomb), "too large")
    assert time.monotonic() - start < 20


def test_many_members_are_capped(tmp_path: Path) -> None:
    from trio_composefs.oci.sources._tarindex import MAX_MEMBERS, index_tar

    path = tmp_path / "many.tar"
    block = tarfile.TarInfo("e").tobuf(format=tarfile.USTAR_FORMAT)
    path.write_bytes(block * (MAX_MEMBERS + 1))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(FormatError, match="members"):
            index_tar(fd, where=str(path))
    finally:
        os.close(fd)


def test_tar_index_agrees_with_tarfile_on_real_archives(tmp_path: Path) -> None:
    from trio_composefs.oci.sources._tarindex import index_tar

    long = "d/" + "x" * 150 + "/file"
    path = tmp_path / "a.tar"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in [("index.json", b"{}"), (long, b"y" * 700), ("ü.txt", b"z")]:
                if fmt == tarfile.USTAR_FORMAT and name == long:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("link")
            link.type = tarfile.SYMTYPE
            link.linkname = "index.json"
            tar.addfile(link)
        fd = os.open(path, os.O_RDONLY)
        try:
            ours = index_tar(fd, where="a.tar")
        finally:
            os.close(fd)
        with tarfile.open(path) as tar:
            for info in tar:
                if info.isreg():
                    member = ours[info.name]
                    assert (member.offset, member.size) == (info.offset_data, info.size)
        assert ours["link"].link == "index.json"


# ---------------------------------------------------------------- 9: JSON depth and types


def test_load_json_bounds_depth() -> None:
    with pytest.raises(FormatError, match="nested too deeply"):
        load_json(b"[" * 100_000 + b"]" * 100_000, where="x")
    with pytest.raises(FormatError, match="nested too deeply"):
        load_json(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), where="x")
    assert load_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, where="x") is not None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.update(annotations={"org.opencontainers.image.ref.name": 5}),
        lambda e: e.update(platform={"os": "linux", "architecture": "amd64", "variant": ["v8"]}),
        lambda e: e.update(platform={"os": "linux", "architecture": "amd64", "variant": 7}),
        lambda e: e.update(platform="linux/amd64"),
    ],
)
def test_wrong_json_types_in_index(tmp_path: Path, repo_path: Path, mutate: object) -> None:
    layout, _ = simple_layout(tmp_path)
    mutate(layout.index[0])  # type: ignore[operator]
    layout.write_index()
    done = cli("--repo", str(repo_path), "oci", "pull", f"oci:{layout.path}", "t")
    one_line_error(done, "index.json", "not a")


@pytest.mark.parametrize("where", ["index", "manifest", "config"])
def test_deeply_nested_oci_json(tmp_path: Path, repo_path: Path, where: str) -> None:
    layout = Layout(tmp_path / "layout")
    deep = b'{"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    if where == "index":
        (layout.path / "index.json").write_bytes(deep)
    else:
        tar = make_tar([("f", b"x")])
        image = layout.add_image([tar], tag="v", config_bytes=deep if where == "config" else None)
        layout.write_index()
        if where == "manifest":
            body = json.loads(layout.blob_path(image.manifest_digest).read_bytes())
            body["annotations"] = {}
            data = (
                json.dumps(body).encode()[:-1] + b',"deep":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
            )
            mdigest, msize = layout.add_blob(data)
            layout.index = [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": mdigest,
                    "size": msize,
                    "annotations": {"org.opencontainers.image.ref.name": "v"},
                }
            ]
            layout.write_index()
    done = cli("--repo", str(repo_path), "oci", "pull", f"oci:{layout.path}:v", "t")
    one_line_error(done, "nested too deeply")


def _docker_archive(path: Path, manifest_json: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest_json)
        tar.addfile(info, io.BytesIO(manifest_json))


@pytest.mark.parametrize(
    ("manifest_json", "needle"),
    [
        (
            b'[{"Config": "c.json", "Layers": [], "RepoTags": 5}, {"RepoTags": 5}]',
            "no image tagged",
        ),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    ],
)
def test_docker_manifest_json_types_and_depth(
    tmp_path: Path, repo_path: Path, manifest_json: bytes, needle: str
) -> None:
    archive = tmp_path / "d.tar"
    _docker_archive(archive, manifest_json)
    done = cli("--repo", str(repo_path), "oci", "pull", f"docker-archive:{archive}:x:y", "t")
    one_line_error(done, str(archive), needle)


def test_invalid_platform_and_reference_are_invalid_names() -> None:
    with pytest.raises(InvalidNameError):
        Platform.parse("linux")
    with pytest.raises(InvalidNameError):
        parse_source("nocolon")
    with pytest.raises(InvalidNameError):
        parse_source("oci:/x@sha256:zz")
    with pytest.raises(FormatError, match="not a string"):
        Descriptor.from_json(
            {
                "mediaType": "m",
                "digest": "sha256:" + "0" * 64,
                "size": 1,
                "annotations": {"k": ["v"]},
            },
            where="w",
        )


# ---------------------------------------------------------------- 11: clear errors


def test_index_json_too_large_says_so(tmp_path: Path, repo_path: Path) -> None:
    layout, _ = simple_layout(tmp_path)
    with open(layout.path / "index.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse; JSON would be cut silently before
    done = cli("--repo", str(repo_path), "oci", "pull", f"oci:{layout.path}:v1", "t")
    one_line_error(done, "index.json", "too large")


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_compressed_import_layer_is_recognized(tmp_path: Path, repo_path: Path, kind: str) -> None:
    tar = make_tar([("f", b"x" * 1000)])
    data = gzip.compress(tar) if kind == "gzip" else zstandard.ZstdCompressor().compress(tar)
    path = tmp_path / "layer"
    path.write_bytes(data)
    done = cli("--repo", str(repo_path), "oci", "import-layer", sha256(tar), "--file", str(path))
    one_line_error(done, f"{kind}-compressed", sha256(tar), str(repo_path))


def test_full_disk_names_layer_and_repository(tmp_path: Path, repo_path: Path) -> None:
    from trio_composefs.cli._app import _describe
    from trio_composefs.importer._importer import _name_the_layer

    error = OSError(errno.ENOSPC, "No space left on device")
    group = ExceptionGroup("x", [error])
    _name_the_layer(group, "sha256:" + "1" * 64, str(repo_path))
    line = _describe(error)
    assert "No space left on device" in line
    assert "sha256:" + "1" * 64 in line
    assert str(repo_path) in line
    assert "gc" in line


# ---------------------------------------------------------------- 12: source errors kept


async def test_source_error_is_not_a_digest_mismatch() -> None:
    data = gzip.compress(b"x" * 100_000)

    async def pieces() -> AsyncIterator[bytes]:
        yield data[:100]
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    for compression in ("gzip", None):
        with pytest.RaisesGroup(ConnectionResetError, flatten_subgroups=True, allow_unwrapped=True):
            async with open_verified_stream(
                pieces(),
                compression=compression,
                digest=sha256(data),
                size=len(data),
                where="blob",
            ) as stream:
                async for _ in stream:
                    pass


async def test_real_mismatch_still_reported() -> None:
    from trio_composefs import DigestMismatchError

    data = b"y" * 1000

    async def pieces() -> AsyncIterator[bytes]:
        yield data

    with pytest.RaisesGroup(DigestMismatchError, flatten_subgroups=True, allow_unwrapped=True):
        async with open_verified_stream(
            pieces(),
            compression=None,
            digest="sha256:" + hashlib.sha256(b"z").hexdigest(),
            size=len(data),
            where="blob",
        ) as stream:
            async for _ in stream:
                pass
    await trio.lowlevel.checkpoint()


def test_fsck_and_gc_survive_a_deep_ref_tree(tmp_path: Path, repo_path: Path) -> None:
    layout, _ = simple_layout(tmp_path)
    r = str(repo_path)
    assert cli("--repo", r, "oci", "pull", f"oci:{layout.path}:v1", "t").returncode == 0
    refs = repo_path / "streams" / "refs"
    make_chain(refs, 1200)
    try:
        for args in (["fsck"], ["gc", "--dry-run"]):
            done = cli("--repo", r, *args, timeout=120)
            assert "RecursionError" not in done.stderr.decode()
            assert "Traceback" not in done.stderr.decode()
    finally:
        remove_chain(refs)
    assert not (refs / "d").exists()


def test_real_full_disk_names_layer_and_repository(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        repo = mnt / "repo"
        assert cli("--repo", str(repo), "init", "--insecure").returncode == 0
        tar = make_tar([(f"f{i}", os.urandom(300_000)) for i in range(8)])
        path = tmp_path / "layer.tar"
        path.write_bytes(tar)
        done = cli("--repo", str(repo), "oci", "import-layer", sha256(tar), "--file", str(path))
        err = done.stderr.decode()
        assert done.returncode == 1, err
        assert "Traceback" not in err
        assert "No space left on device" in err
        assert sha256(tar) in err
        assert str(repo) in err
        assert [p.name for p in (repo / "streams").iterdir()] == ["refs"]  # nothing published
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
