"""The repository object store, checked on disk."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from trio_composefs import (
    DigestError,
    DigestMismatchError,
    FormatError,
    InvalidNameError,
    ObjectNotFoundError,
    RepositoryError,
    VerityUnsupportedError,
)
from trio_composefs.formats import Algorithm, Digest, fsverity_digest
from trio_composefs.hashing import _objstore as objstore
from trio_composefs.repository import ObjectTmpfile, RepoMetadata, Repository
from trio_composefs.repository import _repository as repository_module
from trio_composefs.repository._verity import SimulatedVerityKernel, VerityOps

EXPECTED_META = """\
{{
  "version": 1,
  "algorithm": "{alg}",
  "features": {{
    "compatible": [],
    "read-only-compatible": [
      "v1_erofs"
    ],
    "incompatible": []
  }},
  "erofs_formats": {{
    "default": 1
  }}
}}
"""

SIZES = [0, 1, 65, 4095, 4096, 4097, 8192, 128 * 4096 + 1]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every test must close every fd it (or the repository) opened."""
    before = open_fds()
    yield
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"leaked fds: {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked]}"


@pytest.fixture
def repo_algorithm() -> Algorithm:
    """This module's ``repo`` (conftest) uses the default algorithm of ``Repository.init``."""
    return Algorithm.SHA512


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (relative), sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def object_files(repo_path: Path) -> list[str]:
    objects = repo_path / "objects"
    return sorted(str(p.relative_to(objects)) for p in objects.rglob("*") if not p.is_dir())


# ------------------------------------------------------------------ init/open


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_init_layout_and_meta_bytes(tmp_path: Path, algorithm: Algorithm) -> None:
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=algorithm, insecure=True) as r:
        assert r.algorithm is algorithm
        assert r.insecure
        assert not r.read_only
        assert r.path == str(path)
    assert (path / "meta.json").read_text() == EXPECTED_META.format(alg=algorithm.value)
    assert tree(path) == [
        "images",
        "images/refs",
        "meta.json",
        "objects",
        "streams",
        "streams/refs",
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((path / "meta.json").stat().st_mode) == 0o644


def test_meta_json_round_trip_matches_serde_model() -> None:
    meta = RepoMetadata.new(Algorithm.SHA256)
    assert RepoMetadata.from_json(meta.to_json()) == meta
    # upstream's own fixtures: compact JSON, missing optional fields
    old = RepoMetadata.from_json(
        b'{"version":1,"algorithm":"fsverity-sha256-12",'
        b'"features":{"read-only-compatible":["v1_erofs"]}}'
    )
    assert old.erofs_version() == 1
    legacy = RepoMetadata.from_json(
        b'{"version":1,"algorithm":"fsverity-sha256-12","features":{},"erofs_version":2}'
    )
    assert legacy.erofs_version() == 2


def test_init_default_is_sha512(tmp_path: Path) -> None:
    with Repository.init(tmp_path / "r", insecure=True) as r:
        assert r.algorithm is Algorithm.SHA512


def test_init_secure_without_fs_verity_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    with pytest.raises(VerityUnsupportedError, match=r"lacks fs-verity.*--insecure"):
        Repository.init(path)
    assert not path.exists()  # nothing left behind
    path.mkdir()
    with pytest.raises(VerityUnsupportedError):
        Repository.init(path)
    assert list(path.iterdir()) == []  # an existing directory is kept, but stays empty


def test_init_in_existing_empty_dir_and_again(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    path.mkdir()
    Repository.init(path, insecure=True).close()
    before = (path / "meta.json").stat().st_ino
    Repository.init(path, insecure=True).close()  # same metadata: just opens it
    assert (path / "meta.json").stat().st_ino == before
    with pytest.raises(RepositoryError, match="different configuration"):
        Repository.init(path, algorithm=Algorithm.SHA256, insecure=True)


def test_reopen(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    Repository.init(path, algorithm=Algorithm.SHA256, insecure=True).close()
    with Repository.open(path) as r:
        assert r.algorithm is Algorithm.SHA256
        assert r.insecure  # meta.json has no fs-verity here
        assert not r.verity_supported  # this kernel has none
    with Repository.open(path, insecure=False) as r:
        assert not r.insecure


def write_meta(path: Path, doc: object) -> None:
    path.mkdir(exist_ok=True)
    (path / "meta.json").write_text(json.dumps(doc))


def test_unknown_incompatible_feature_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    write_meta(
        path,
        {"version": 1, "algorithm": "fsverity-sha256-12", "features": {"incompatible": ["zz"]}},
    )
    with pytest.raises(RepositoryError, match=r"unknown incompatible features \['zz'\]"):
        Repository.open(path)


def test_unknown_compat_feature_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    write_meta(
        path,
        {"version": 1, "algorithm": "fsverity-sha256-12", "features": {"compatible": ["zz"]}},
    )
    with Repository.open(path) as r:
        assert not r.read_only


def test_unknown_ro_compat_feature_gives_read_only(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    Repository.init(path, insecure=True).close()
    with Repository.open(path) as r:
        digest = r.store_object(b"stored before")
    doc = json.loads((path / "meta.json").read_text())
    doc["features"]["read-only-compatible"].append("future_thing")
    write_meta(path, doc)
    with Repository.open(path) as r:
        assert r.read_only
        assert r.read_object(digest) == b"stored before"  # reading works
        with pytest.raises(RepositoryError, match=r"read-only.*future_thing"):
            r.ensure_writable()
        with pytest.raises(RepositoryError, match="read-only"):
            r.begin_object()
        with pytest.raises(RepositoryError, match="read-only"):
            r.store_object(b"new")
        with pytest.raises(RepositoryError, match="read-only"):
            r.publish_stream("s", digest)
    assert object_files(path) == [digest.object_path()]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"name": "something else"}', "'version'"),
        ('{"version": 1, "algorithm": "sha3"}', "unknown 'algorithm'"),
        ('{"version": 1, "algorithm": "fsverity-sha256-12", "features": []}', "'features'"),
        (
            '{"version": 1, "algorithm": "fsverity-sha256-12", "erofs_formats": {"default": 9}}',
            "EROFS format version 9",
        ),
    ],
)
def test_meta_json_not_ours_is_a_clear_error(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "repo"
    path.mkdir()
    (path / "meta.json").write_text(content)
    with pytest.raises(FormatError, match="not a composefs repository metadata file") as info:
        Repository.open(path)
    assert str(path / "meta.json") in str(info.value)
    assert why in str(info.value)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    write_meta(path, {"version": 2, "algorithm": "fsverity-sha256-12"})
    with pytest.raises(RepositoryError, match="unsupported repository format version 2"):
        Repository.open(path)


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match=r"not a composefs repository: meta.json not found"):
        Repository.open(tmp_path)
    (tmp_path / "objects").mkdir()
    with pytest.raises(RepositoryError, match="old-format repository"):
        Repository.open(tmp_path)
    with pytest.raises(RepositoryError, match="cannot open repository"):
        Repository.open(tmp_path / "missing")


def test_upstream_layout_without_subdirectories(tmp_path: Path) -> None:
    """`cfsctl init` writes only meta.json; objects/ and streams/ appear on first write."""
    path = tmp_path / "repo"
    path.mkdir()
    (path / "meta.json").write_bytes(RepoMetadata.new(Algorithm.SHA256).to_json())
    with Repository.open(path) as r:
        d = fsverity_digest(b"x", Algorithm.SHA256)
        assert not r.has_object(d)
        assert r.list_streams() == {}
        assert r.list_stream_refs() == {}
        assert r.find_stray_tmpfiles() == []
        assert r.store_object(b"x") == d
        r.publish_stream("s", d, "r/x")
        assert r.resolve_stream("refs/r/x") == d


# -------------------------------------------------------------------- objects


def fsverity_tool_digest(path: Path, algorithm: Algorithm) -> str | None:
    if shutil.which("fsverity") is None:
        return None
    out = subprocess.run(
        ["fsverity", "digest", f"--hash-alg={algorithm.hash_name}", "--block-size=4096", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[0].split(":", 1)[1]


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_objects_are_named_by_their_true_digest(tmp_path: Path, algorithm: Algorithm) -> None:
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=algorithm, insecure=True) as r:
        for size in SIZES:
            data = bytes((i * 7 + size) % 251 for i in range(size))
            expected = fsverity_digest(data, algorithm)
            # path A: in memory
            assert r.store_object(data) == expected
            # path B: streamed in odd chunks, digest computed by the repository
            with r.begin_object() as tmp:
                for i in range(0, size, 1000):
                    tmp.write(memoryview(data)[i : i + 1000])
                assert tmp.size == size
                assert tmp.finish() == (expected, True)
            on_disk = path / "objects" / expected.object_path()
            assert on_disk.read_bytes() == data
            assert on_disk.stat().st_nlink == 1
            tool = fsverity_tool_digest(on_disk, algorithm)
            if tool is not None:
                assert tool == expected.hex()
            assert r.object_size(expected) == size
            assert r.read_object(expected) == data
    assert len(object_files(path)) == len(SIZES)


def test_upstream_vectors(tmp_path: Path) -> None:
    with Repository.init(tmp_path / "r", algorithm=Algorithm.SHA256, insecure=True) as r:
        assert r.store_object(b"hello world").hex() == (
            "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"
        )
        assert r.store_object(bytes(4096)).hex() == (
            "babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e"
        )


def test_dedup(repo: Repository) -> None:
    path = Path(repo.path)
    with repo.begin_object() as tmp:
        tmp.write(b"same content")
        digest, present = tmp.finish()
    assert not present
    with repo.begin_object() as tmp:
        tmp.write(b"same content")
        assert tmp.finish() == (digest, True)
    assert repo.store_object(b"same content") == digest
    assert object_files(path) == [digest.object_path()]
    # a caller-supplied digest is trusted on the userspace path
    with repo.begin_object() as tmp:
        tmp.write(b"same content")
        assert tmp.finish(digest) == (digest, True)


def enospc_after(calls: int) -> Callable[[int, Any], int]:
    real_write = os.write
    count = [0]

    def fake_write(fd: int, data: Any) -> int:
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    return fake_write


@pytest.mark.parametrize("named", [False, True])
def test_failed_write_leaves_nothing_in_objects(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, named: bool
) -> None:
    repo.force_named_tmpfile = named
    path = Path(repo.path)
    before = tree(path / "objects")
    data = os.urandom(100_000)

    def attempt() -> None:
        with repo.begin_object() as tmp:
            tmp.write(data[:50_000])
            tmp.write(data[50_000:])  # the disk fills up here

    with monkeypatch.context() as m:
        m.setattr(os, "write", enospc_after(1))
        with pytest.raises(OSError, match="No space left"):
            attempt()
    assert tree(path / "objects") == before
    assert not repo.has_object(fsverity_digest(data, repo.algorithm))
    assert repo.find_stray_tmpfiles() == []


def test_failed_link_leaves_nothing_in_objects(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(repo.path)

    def no_link(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def attempt() -> None:
        with repo.begin_object() as tmp:
            tmp.write(b"abc")
            tmp.finish()

    with monkeypatch.context() as m:
        m.setattr(os, "link", no_link)
        with pytest.raises(OSError, match="Input/output"):
            attempt()
    digest = fsverity_digest(b"abc", repo.algorithm)
    assert not (path / "objects" / digest.object_path()).exists()
    assert repo.find_stray_tmpfiles() == []


def test_finish_checks_algorithm_and_state(repo: Repository) -> None:
    with repo.begin_object() as tmp:
        tmp.write(b"a")
        with pytest.raises(DigestError):
            tmp.finish(fsverity_digest(b"a", Algorithm.SHA256))
    tmp.abort()  # idempotent
    with pytest.raises(Exception, match="after finish"):
        tmp.write(b"b")


def test_named_tmpfile_fallback(repo: Repository) -> None:
    repo.force_named_tmpfile = True
    path = Path(repo.path)
    tmp = repo.begin_object()
    assert tmp.name is not None
    assert tmp.name.startswith(".tmp-object-")
    assert len(tmp.name) == len(".tmp-object-") + 12
    assert (path / "objects" / tmp.name).exists()
    tmp.write(b"named")
    digest, present = tmp.finish()
    assert not present
    assert (path / "objects" / digest.object_path()).read_bytes() == b"named"
    assert repo.find_stray_tmpfiles() == []
    # dedup through the fallback discards the temporary name
    with repo.begin_object() as tmp2:
        tmp2.write(b"named")
        assert tmp2.finish() == (digest, True)
    assert repo.find_stray_tmpfiles() == []
    # a writer that dies without cleaning up leaves a discoverable leftover
    crashed = repo.begin_object()
    crashed.write(b"partial")
    assert crashed.name is not None
    assert repo.find_stray_tmpfiles() == [crashed.name]
    assert object_files(path) == sorted([digest.object_path(), crashed.name])
    crashed.abort()
    assert repo.find_stray_tmpfiles() == []


def test_fallback_without_renameat2(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    repo.force_named_tmpfile = True
    monkeypatch.setattr(repository_module, "_renameat2_noreplace", lambda *a: False)
    d = repo.store_object(b"linked then unlinked")
    assert repo.read_object(d) == b"linked then unlinked"
    assert repo.find_stray_tmpfiles() == []
    assert os.stat(Path(repo.path) / "objects" / d.object_path()).st_nlink == 1


def test_fallback_chosen_when_o_tmpfile_is_unsupported(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_tmpfile(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    with repo.begin_object() as tmp:
        assert tmp.name is not None
        tmp.write(b"fuse-overlayfs")
        digest, _ = tmp.finish()
    monkeypatch.undo()
    assert repo.read_object(digest) == b"fuse-overlayfs"


def test_open_object_verify_detects_corruption(repo: Repository) -> None:
    digest = repo.store_object(b"original")
    on_disk = Path(repo.path) / "objects" / digest.object_path()
    on_disk.write_bytes(b"tampered")
    fd = repo.open_object(digest)  # insecure, no kernel verity: not checked
    os.close(fd)
    with pytest.raises(DigestMismatchError, match=str(on_disk)):
        repo.open_object(digest, verify=True)


def test_missing_object(repo: Repository) -> None:
    digest = fsverity_digest(b"never stored", repo.algorithm)
    assert not repo.has_object(digest)
    for call in (repo.open_object, repo.object_size, repo.read_object):
        with pytest.raises(ObjectNotFoundError, match=str(digest)):
            call(digest)
    with pytest.raises(DigestError):
        repo.has_object(fsverity_digest(b"x", Algorithm.SHA256))


def test_concurrent_writers(repo: Repository) -> None:
    payloads = [str(i % 40).encode() * (i % 40 * 300) for i in range(160)]

    def write(data: bytes) -> tuple[Digest, bool]:
        with repo.begin_object() as tmp:
            tmp.write(data)
            return tmp.finish()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(write, payloads))
    for data, (digest, _) in zip(payloads, results, strict=True):
        assert digest == fsverity_digest(data, repo.algorithm)
        assert repo.read_object(digest) == data
    assert sum(1 for _, present in results if not present) == 40
    assert len(object_files(Path(repo.path))) == 40


# -------------------------------------------------------------------- streams


def test_symlinks_are_relative_and_correct(repo: Repository) -> None:
    path = Path(repo.path)
    d = repo.store_object(b"splitstream bytes")
    cid = "oci-layer-sha256:" + "ab" * 32
    repo.publish_stream(cid, d, "oci/myimage:latest")
    repo.publish_stream(cid, d, "plain")
    repo.publish_stream(cid, d, "a/b/c/deep")
    obj = f"../objects/{d.object_path()}"
    assert os.readlink(path / "streams" / cid) == obj
    assert os.readlink(path / "streams/refs/oci/myimage:latest") == f"../../{cid}"
    assert os.readlink(path / "streams/refs/plain") == f"../{cid}"
    assert os.readlink(path / "streams/refs/a/b/c/deep") == f"../../../../{cid}"
    real = os.path.realpath(path / "objects" / d.object_path())
    for link in ("streams/refs/oci/myimage:latest", "streams/refs/a/b/c/deep", f"streams/{cid}"):
        assert os.path.realpath(path / link) == real
    assert stat.S_IMODE((path / "streams/refs/a/b").stat().st_mode) == 0o755
    assert repo.has_stream(cid) == d
    assert repo.has_stream("oci-layer-sha256:other") is None
    assert repo.resolve_stream(cid) == d
    assert repo.resolve_stream("refs/oci/myimage:latest") == d
    assert repo.list_streams() == {cid: d}
    assert repo.list_stream_refs() == {
        "oci/myimage:latest": cid,
        "plain": cid,
        "a/b/c/deep": cid,
    }


def test_atomic_replacement(repo: Repository) -> None:
    path = Path(repo.path)
    d1 = repo.store_object(b"one")
    d2 = repo.store_object(b"two")
    repo.publish_stream("s1", d1, "tag")
    repo.publish_stream("s2", d2)
    link = path / "streams/s1"
    ino = link.lstat().st_ino
    repo.publish_stream("s1", d1, "tag")  # already right: untouched
    assert link.lstat().st_ino == ino
    repo.publish_stream("s1", d2, sync=False)  # replaced
    assert os.readlink(link) == f"../objects/{d2.object_path()}"
    assert link.lstat().st_ino != ino
    repo.publish_stream("s2", d2, "tag")  # the ref moves to another stream
    assert os.readlink(path / "streams/refs/tag") == "../s2"
    assert repo.resolve_stream("refs/tag") == d2
    leftovers = [p for p in tree(path / "streams") if ".symlink-" in p]
    assert leftovers == []


@pytest.mark.parametrize("bad", ["", "..", "a/../b", "/abs", "a//b", "a/", "./a", "a\0b"])
def test_invalid_names_are_refused(repo: Repository, bad: str) -> None:
    d = repo.store_object(b"x")
    with pytest.raises(InvalidNameError, match="invalid stream name"):
        repo.publish_stream(bad, d)
    with pytest.raises(InvalidNameError, match="invalid ref name"):
        repo.publish_stream("good", d, bad)
    assert not (Path(repo.path) / "streams/good").exists()


def test_refs_is_not_a_stream_name(repo: Repository) -> None:
    with pytest.raises(RepositoryError, match="reserved"):
        repo.publish_stream("refs/x", repo.store_object(b"x"))


def test_resolve_missing_and_dangling(repo: Repository) -> None:
    with pytest.raises(ObjectNotFoundError, match="'refs/nope'"):
        repo.resolve_stream("refs/nope")
    with pytest.raises(ObjectNotFoundError, match="'nope'"):
        repo.resolve_stream("nope")
    d = repo.store_object(b"soon gone")
    repo.publish_stream("s", d, "r")
    os.unlink(Path(repo.path) / "objects" / d.object_path())
    with pytest.raises(ObjectNotFoundError, match="dangling"):
        repo.resolve_stream("refs/r")
    assert repo.has_stream("s") == d  # the link itself is still there


def test_bad_stream_link_is_reported(repo: Repository) -> None:
    os.symlink("/etc/passwd", Path(repo.path) / "streams/evil")
    with pytest.raises(RepositoryError, match="not an object"):
        repo.has_stream("evil")
    with pytest.raises(RepositoryError, match="absolute"):
        repo.resolve_stream("evil")
    assert repo.list_streams() == {}


# ------------------------------------------------------- locks, fds, read-only


def test_flock_is_shared(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    r1 = Repository.init(path, insecure=True)
    r2 = Repository.open(path)  # a second shared holder is fine
    probe = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r1.close()
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r2.close()
        r2.close()  # idempotent
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # now free
    finally:
        os.close(probe)


def test_no_fd_leak_across_operations(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    before = open_fds()
    with pytest.raises(VerityUnsupportedError):
        Repository.init(path)
    with pytest.raises(RepositoryError):
        Repository.open(path)
    with Repository.init(path, insecure=True) as r:
        d = r.store_object(b"fd")
        with r.begin_object() as tmp:
            tmp.write(b"abandoned")
        r.publish_stream("s", d, "t")
        r.read_object(d)
        r.list_streams()
        r.list_stream_refs()
        assert r.verity_supported is False
    (path / "meta.json").write_text("garbage")
    with pytest.raises(FormatError):
        Repository.open(path)
    assert open_fds() == before


@pytest.fixture
def ro_mount(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_read_only_filesystem(ro_mount: Path) -> None:
    path = ro_mount / "repo"
    with Repository.init(path, insecure=True) as r:
        r.ensure_writable()  # tmpfs, writable
        d = r.store_object(b"on tmpfs")
    subprocess.run(["mount", "-o", "remount,ro", str(ro_mount)], check=True)
    with Repository.open(path) as r:
        with pytest.raises(RepositoryError, match="not writable: read-only file system"):
            r.ensure_writable()
        with pytest.raises(RepositoryError, match="cannot create a temporary file"):
            r.begin_object()
        with pytest.raises(RepositoryError, match="read-only file system"):
            r.publish_stream("s", d)
        assert r.read_object(d) == b"on tmpfs"
        assert not r.verity_supported


# ------------------------------------------------- secure mode (simulated kernel)


@pytest.fixture
def kernel() -> Iterator[SimulatedVerityKernel]:
    with SimulatedVerityKernel() as k:
        yield k


@pytest.fixture
def secure(tmp_path: Path, kernel: SimulatedVerityKernel) -> Iterator[Repository]:
    with Repository.init(tmp_path / "repo", verity_ops=VerityOps(kernel)) as r:
        yield r


def inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino)


def test_secure_init_enables_verity_on_meta_json(
    tmp_path: Path, secure: Repository, kernel: SimulatedVerityKernel
) -> None:
    path = Path(secure.path)
    meta = path / "meta.json"
    assert meta.read_text() == EXPECTED_META.format(alg="fsverity-sha512-12")
    assert kernel.enabled[inode(meta)] == fsverity_digest(meta.read_bytes(), Algorithm.SHA512)
    assert not secure.insecure
    assert secure.verity_supported
    with Repository.open(path, verity_ops=VerityOps(kernel)) as again:
        assert not again.insecure  # inferred from meta.json's verity
    with Repository.open(path, verity_ops=VerityOps(kernel), insecure=True) as forced:
        assert forced.insecure


def test_init_keeps_an_existing_secure_repository_secure(
    secure: Repository, kernel: SimulatedVerityKernel
) -> None:
    with Repository.init(secure.path, insecure=True, verity_ops=VerityOps(kernel)) as again:
        assert not again.insecure  # the mode comes from meta.json, as upstream


def test_secure_objects_get_kernel_verity(
    secure: Repository, kernel: SimulatedVerityKernel
) -> None:
    path = Path(secure.path)
    d = secure.store_object(b"secure data")
    with secure.begin_object() as tmp:
        tmp.write(b"streamed " * 1000)
        streamed, present = tmp.finish()  # measured by the kernel
    assert not present
    assert streamed == fsverity_digest(b"streamed " * 1000, Algorithm.SHA512)
    for digest in (d, streamed):
        assert kernel.enabled[inode(path / "objects" / digest.object_path())] == digest
    assert secure.read_object(d) == b"secure data"


def test_secure_finish_refuses_a_wrong_promised_digest(secure: Repository) -> None:
    wrong = fsverity_digest(b"something else", Algorithm.SHA512)
    with secure.begin_object() as tmp:
        tmp.write(b"actual content")
        with pytest.raises(DigestMismatchError, match=str(wrong)):
            tmp.finish(wrong)
    assert object_files(Path(secure.path)) == []


def test_etxtbsy_retry_then_success(secure: Repository, kernel: SimulatedVerityKernel) -> None:
    with secure.begin_object() as tmp:
        tmp.write(b"busy for a moment")
        kernel.busy_failures = 2
        kernel.calls.clear()
        digest, _ = tmp.finish()
    assert [c for c, _ in kernel.calls].count("enable") == 3
    assert secure.read_object(digest) == b"busy for a moment"


@pytest.mark.parametrize("named", [False, True])
def test_etxtbsy_persisting_falls_back_to_a_copy(
    secure: Repository, kernel: SimulatedVerityKernel, named: bool
) -> None:
    secure.force_named_tmpfile = named
    with secure.begin_object() as tmp:
        tmp.write(b"held open elsewhere")
        # like a forked child that inherited the writable fd
        held = os.open(f"/proc/self/fd/{tmp.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            digest, present = tmp.finish()
            held_inode = os.fstat(held).st_ino
        finally:
            os.close(held)
    assert not present
    on_disk = Path(secure.path) / "objects" / digest.object_path()
    assert on_disk.read_bytes() == b"held open elsewhere"
    assert on_disk.stat().st_ino != held_inode  # the copy was linked, not the busy file
    assert kernel.enabled[inode(on_disk)] == digest
    assert secure.find_stray_tmpfiles() == []


def test_etxtbsy_on_the_copy_too_is_an_error(
    secure: Repository, kernel: SimulatedVerityKernel
) -> None:
    with secure.begin_object() as tmp:
        tmp.write(b"always busy")
        kernel.busy_failures = 100
        with pytest.raises(RepositoryError, match="ETXTBSY"):
            tmp.finish()
    assert object_files(Path(secure.path)) == []


def test_eexist_means_already_enabled(secure: Repository, kernel: SimulatedVerityKernel) -> None:
    with secure.begin_object() as tmp:
        tmp.write(b"already verity")
        kernel.set_digest(tmp.fd, fsverity_digest(b"already verity", Algorithm.SHA512))
        digest, _ = tmp.finish()
    assert secure.read_object(digest) == b"already verity"


def test_secure_refuses_measured_mismatch_and_missing_verity(
    secure: Repository, kernel: SimulatedVerityKernel
) -> None:
    path = Path(secure.path)
    d = secure.store_object(b"will be corrupted")
    fd = os.open(path / "objects" / d.object_path(), os.O_RDONLY)
    kernel.set_digest(fd, fsverity_digest(b"other", Algorithm.SHA512))
    os.close(fd)
    with pytest.raises(DigestMismatchError, match="measured fs-verity digest"):
        secure.open_object(d)
    with pytest.raises(DigestMismatchError):
        secure.store_object(b"will be corrupted")  # dedup checks the existing object
    # an object replaced by a file without verity
    d2 = secure.store_object(b"replaced")
    obj = path / "objects" / d2.object_path()
    obj.unlink()
    obj.write_bytes(b"replaced")
    with pytest.raises(RepositoryError, match="has no fs-verity"):
        secure.read_object(d2)
    with Repository.open(path, verity_ops=VerityOps(kernel), insecure=True) as insecure:
        assert insecure.read_object(d2) == b"replaced"  # insecure: accepted unchecked
        with pytest.raises(DigestMismatchError):
            insecure.read_object(d)  # a measured mismatch is refused in every mode


def test_secure_repository_without_kernel_verity(
    secure: Repository, kernel: SimulatedVerityKernel
) -> None:
    d = secure.store_object(b"before")
    kernel.supported = False
    path = Path(secure.path)
    with Repository.open(path, verity_ops=VerityOps(kernel), insecure=False) as r:
        assert not r.verity_supported
        with r.begin_object() as tmp:
            tmp.write(b"x")
            with pytest.raises(VerityUnsupportedError, match="lacks fs-verity"):
                tmp.finish()
        with pytest.raises(VerityUnsupportedError):
            r.open_object(d)
    assert object_files(path) == [d.object_path()]


def test_insecure_repository_uses_kernel_verity_when_available(
    tmp_path: Path, kernel: SimulatedVerityKernel
) -> None:
    path = tmp_path / "repo"
    with Repository.init(path, insecure=True, verity_ops=VerityOps(kernel)) as r:
        assert r.insecure
        assert r.verity_supported
        assert inode(path / "meta.json") not in kernel.enabled
        d = r.store_object(b"gets verity anyway")
        assert kernel.enabled[inode(path / "objects" / d.object_path())] == d


def test_object_tmpfile_type() -> None:
    assert ObjectTmpfile.__init__ is not None  # exported for type annotations


@pytest.mark.parametrize("path_kind", ["o_tmpfile", "renameat2", "link_unlink"])
@pytest.mark.parametrize("existing", ["other_size", "same_size", "dangling_symlink"])
def test_an_existing_entry_of_any_kind_is_reported_present_and_kept(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, path_kind: str, existing: str
) -> None:
    """Whatever already sits at ``objects/XX/rest`` (a damaged copy of another size,
    one of the same size, a dangling symlink) the new copy is discarded and the
    object reported present; the entry is left for ``fsck`` (as before: the writer
    never judged it by its size)."""
    content = b"the true content"
    digest = fsverity_digest(content, Algorithm.SHA512)
    target = Path(repo.path) / "objects" / digest.object_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if existing == "dangling_symlink":
        target.symlink_to("nowhere")
    else:
        target.write_bytes(
            b"damaged, and longer than the content"
            if existing == "other_size"
            else b"x" * len(content)
        )
    before = os.lstat(target)
    repo.force_named_tmpfile = path_kind != "o_tmpfile"
    if path_kind == "link_unlink":
        monkeypatch.setattr(repository_module, "_renameat2_noreplace", lambda *a: False)
    with repo.begin_object() as tmp:
        tmp.write(content)
        assert tmp.finish() == (digest, True)
    after = os.lstat(target)
    assert (after.st_ino, after.st_size, after.st_nlink) == (
        before.st_ino,
        before.st_size,
        before.st_nlink,
    )
    assert repo.find_stray_tmpfiles() == []
    assert object_files(Path(repo.path)) == [digest.object_path()]


@pytest.mark.parametrize("path_kind", ["o_tmpfile", "renameat2", "link_unlink"])
def test_a_new_object_costs_one_link_and_no_stat(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, path_kind: str
) -> None:
    """Linking a new object tries the link first: ``XX/`` is made only when the link
    says ENOENT, and no ``stat`` of the target is made."""
    repo.force_named_tmpfile = path_kind != "o_tmpfile"
    if path_kind == "link_unlink":
        monkeypatch.setattr(repository_module, "_renameat2_noreplace", lambda *a: False)
    calls: list[str] = []
    for name in ("stat", "mkdir", "link"):
        real = getattr(os, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    first = fsverity_digest(b"first", Algorithm.SHA512)
    # a second content whose object shares first's XX/ directory
    n = 0
    while (second := fsverity_digest(b"second %d" % n, Algorithm.SHA512)).hex()[:2] != first.hex()[
        :2
    ]:
        n += 1
    link = [] if path_kind == "renameat2" else ["link"]  # renameat2 goes through ctypes
    expected = [(b"first", [*link, "mkdir", *link]), (b"second %d" % n, link)]
    if path_kind == "o_tmpfile":
        # linkat(AT_EMPTY_PATH) through ctypes, where allowed (CAP_DAC_READ_SEARCH); its
        # ENOENT is checked with the /proc link, which tells a missing XX/ from a refusal.
        objstore._load_linkat()
        if objstore._linkat_empty is not None:
            func, get_errno = objstore._linkat_empty

            def counted_linkat(*args: Any) -> Any:
                calls.append("linkat")
                return func(*args)

            monkeypatch.setattr(objstore, "_linkat_empty", (counted_linkat, get_errno))
            allowed = ["linkat", "link", "mkdir", "linkat"], ["linkat"]
            refused = ["linkat", "link", "mkdir", "linkat", "link"], ["link"]
    for i, (content, syscalls) in enumerate(expected):
        with repo.begin_object() as tmp:
            tmp.write(content)
            calls.clear()
            digest, present = tmp.finish()
            assert not present
            if path_kind == "o_tmpfile" and "linkat" in calls:
                assert calls in (allowed[i], refused[i])
            else:
                assert calls == syscalls
        assert repo.read_object(digest) == content
    assert second.hex()[:2] == first.hex()[:2]
