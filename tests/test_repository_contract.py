"""The repository contract: one suite, run against every implementation of the API.

dulwich's ``ObjectStoreTests`` idea: each test takes ``store``, a
:class:`~trio_composefs.repository.Repository` or a
:class:`~trio_composefs.testing.FaultyRepository` (no fault armed) wrapping one, and
both must behave alike. Digests are checked against the ``fsverity digest`` tool
(fsverity-utils), the on-disk names against the layout composefs-rs documents.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from trio_composefs import (
    Algorithm,
    Digest,
    InternalError,
    InvalidNameError,
    ObjectNotFoundError,
    Repository,
    RepositoryError,
)
from trio_composefs.repository._writing import (
    ImageName,
    StreamName,
    publish_after_sync,
    write_object,
)
from trio_composefs.testing import FaultyRepository

CONTENT = [b"", b"x", b"hello world\n", bytes(range(256)) * 40, os.urandom(70_000)]


@pytest.fixture(params=[Algorithm.SHA256, Algorithm.SHA512], ids=["sha256", "sha512"])
def repo_algorithm(request: pytest.FixtureRequest) -> Algorithm:
    algorithm: Algorithm = request.param
    return algorithm


@pytest.fixture(params=["Repository", "FaultyRepository"])
def store(request: pytest.FixtureRequest, repo: Repository) -> Any:
    """The implementation under test (duck-typed: the wrapper forwards what it does not
    intercept)."""
    return repo if request.param == "Repository" else FaultyRepository(repo)


def oracle(data: bytes, algorithm: Algorithm, tmp_path: Path) -> str:
    """The fs-verity digest of ``data`` (hex) according to fsverity-utils."""
    tool = shutil.which("fsverity")
    if tool is None:
        pytest.skip("fsverity-utils (the `fsverity` tool) is not installed")
    path = tmp_path / "oracle-input"
    path.write_bytes(data)
    out = subprocess.run(
        [tool, "digest", f"--hash-alg={algorithm.hash_name}", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[0].split(":", 1)[1]


def stored(store: Any, data: bytes) -> Digest:
    digest: Digest = store.store_object(data)
    return digest


# ------------------------------------------------------------------------ objects


@pytest.mark.parametrize("data", CONTENT, ids=lambda d: f"{len(d)}B")
def test_store_object_names_it_by_its_fsverity_digest(
    store: Any, data: bytes, tmp_path: Path
) -> None:
    digest = stored(store, data)
    assert digest.hex() == oracle(data, store.algorithm, tmp_path)
    assert digest.algorithm is store.algorithm
    assert store.has_object(digest)
    assert store.object_size(digest) == len(data)
    assert store.read_object(digest) == data
    on_disk = Path(store.path, "objects", digest.object_path())
    assert on_disk.read_bytes() == data
    assert stored(store, data) == digest  # idempotent


def test_begin_object_writes_pieces_then_links(store: Any, tmp_path: Path) -> None:
    pieces = [b"a" * 5000, b"", b"b" * 100_000, b"c"]
    with store.begin_object() as tmp:
        for piece in pieces:
            tmp.write(piece)
        assert tmp.size == sum(map(len, pieces))
        digest, present = tmp.finish()
    assert not present
    assert digest.hex() == oracle(b"".join(pieces), store.algorithm, tmp_path)
    with store.begin_object() as tmp:
        tmp.write(b"".join(pieces))
        assert tmp.finish() == (digest, True)  # already present
    assert store.find_stray_tmpfiles() == []


def test_an_aborted_object_leaves_nothing(store: Any) -> None:
    with store.begin_object() as tmp:
        tmp.write(b"never linked")
        tmp.abort()
    with store.begin_object() as tmp:
        tmp.write(b"left without finish()")
    assert list(store.iter_objects()) == []
    assert store.stray_tmpfiles() == []


def test_write_object_checks_the_size_before_linking(store: Any, tmp_path: Path) -> None:
    digest, present = write_object(store, [b"ab", b"cd"], size=4)
    assert not present
    assert digest.hex() == oracle(b"abcd", store.algorithm, tmp_path)
    calls: list[str] = []
    with pytest.raises(InternalError, match="got 3 bytes, expected 4"):
        write_object(store, [b"abc"], size=4, written=lambda: calls.append("written"))
    assert calls == []
    assert [e.digest for e in store.iter_objects()] == [digest]


def test_iter_and_remove_objects(store: Any) -> None:
    digests = {stored(store, data) for data in CONTENT}
    entries = list(store.iter_objects())
    assert {e.digest for e in entries} == digests
    assert sorted(e.path for e in entries) == sorted(d.object_path() for d in digests)
    victim = stored(store, CONTENT[2])
    assert store.remove_object(victim) == len(CONTENT[2])
    assert not store.has_object(victim)
    with pytest.raises(ObjectNotFoundError):
        store.remove_object(victim)
    with pytest.raises(ObjectNotFoundError):
        store.read_object(victim)


# ------------------------------------------------------------------------ names


def test_streams_and_their_refs(store: Any) -> None:
    digest = stored(store, b"a splitstream, as far as names go")
    store.publish_stream("oci-layer-x", digest, "some/tag")
    assert store.has_stream("oci-layer-x") == digest
    assert store.resolve_stream("oci-layer-x") == digest
    assert store.resolve_stream("refs/some/tag") == digest
    assert store.list_streams() == {"oci-layer-x": digest}
    assert store.list_stream_refs() == {"some/tag": "oci-layer-x"}
    assert os.readlink(Path(store.path, "streams", "oci-layer-x")) == (
        f"../objects/{digest.object_path()}"
    )
    assert store.read_stream_ref("some/tag") == "../../oci-layer-x"
    assert [r.path for r in store.walk_refs("streams")] == ["streams/refs/some/tag"]
    assert store.resolve_path("streams/refs/some/tag") == digest
    assert store.linked_objects("streams") == {"oci-layer-x": digest}
    assert store.remove_stream_ref("some/tag") is True
    assert store.remove_stream_ref("some/tag") is False
    assert store.read_stream_ref("some/tag") is None
    with pytest.raises(ObjectNotFoundError):
        store.resolve_stream("refs/some/tag")
    assert store.has_stream("absent") is None


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", ".hidden", "refs/x", "a\0b"])
def test_invalid_stream_names_are_refused(store: Any, name: str) -> None:
    digest = stored(store, b"x")
    with pytest.raises((InvalidNameError, RepositoryError)):
        store.publish_stream(name, digest)
    assert store.list_streams() == {}


def test_images_and_their_refs(store: Any) -> None:
    digest = stored(store, b"not really an EROFS image, as far as names go")
    store.publish_image(digest, "my/image")
    assert store.has_image(digest)
    assert store.resolve_image(digest.hex()) == digest
    assert store.resolve_image("refs/my/image") == digest
    assert store.resolve_image("my/image") == digest
    assert store.list_images() == {digest.hex(): digest}
    assert store.list_image_refs() == {"my/image": digest.hex()}
    assert store.linked_objects("images") == {digest.hex(): digest}


def test_publish_after_sync_names_everything_in_order(store: Any) -> None:
    stream, image = stored(store, b"stream"), stored(store, b"image")
    publish_after_sync(store, [StreamName("s", stream, "t"), ImageName(image, "i")])
    assert store.resolve_stream("refs/t") == stream
    assert store.resolve_image("i") == image
    if isinstance(store, FaultyRepository):
        assert store.count("sync") == 1


def test_dangling_links_are_seen(store: Any) -> None:
    digest = stored(store, b"soon gone")
    store.publish_stream("s", digest, "r")
    assert store.link_is_alive("streams/refs/r", set())
    assert store.link_error("streams/s") is None
    store.remove_object(digest)
    assert not store.link_is_alive("streams/refs/r", set())
    assert store.link_error("streams/s") == ""
    store.remove_link("streams/refs/r")
    assert store.walk_refs("streams") == []


# ------------------------------------------------------------------------ the whole


def test_a_fresh_repository_is_clean(store: Any) -> None:
    assert store.layout_errors() == []
    assert store.stray_tmpfiles() == []
    assert store.read_metadata() == store.metadata
    assert sorted(os.listdir(store.path)) == ["images", "meta.json", "objects", "streams"]


def test_a_closed_repository_refuses_calls(store: Any) -> None:
    digest = stored(store, b"x")
    store.close()
    assert store.closed
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("has_object", (digest,)),
        ("store_object", (b"y",)),
        ("has_stream", ("s",)),
        ("list_streams", ()),
        ("read_stream_ref", ("t",)),
        ("stray_tmpfiles", ()),
    ]
    for name, args in calls:
        with pytest.raises(RepositoryError, match="is closed"):
            getattr(store, name)(*args)
