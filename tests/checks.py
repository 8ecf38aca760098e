"""On-disk invariants of a repository, checked after every fault, cancellation and kill."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from trio_composefs.formats import Algorithm, Digest, FsVerityHasher
from trio_composefs.repository import Repository, copy_stream


def digest_path(path: Path, algorithm: Algorithm) -> Digest:
    h = FsVerityHasher(algorithm)
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.digest()


def assert_objects_complete(repo_path: Path, algorithm: Algorithm) -> int:
    """Every file under objects/XX/ is named by its true digest; nothing else is visible."""
    count = 0
    objects = repo_path / "objects"
    for sub in sorted(objects.iterdir()):
        if not sub.is_dir():
            # only a stray named temporary file may sit at the top (O_TMPFILE fallback)
            assert sub.name.startswith(".tmp-"), f"unexpected file in objects/: {sub.name}"
            continue
        for obj in sorted(sub.iterdir()):
            name = f"{sub.name}/{obj.name}"
            expected = Digest.from_object_path(name, algorithm)
            actual = digest_path(obj, algorithm)
            assert actual == expected, f"objects/{name} holds data with digest {actual}"
            count += 1
    return count


def assert_streams_complete(repo_path: Path) -> dict[str, str]:
    """Every published layer stream reassembles to a tar whose sha256 is its diff_id."""
    found: dict[str, str] = {}
    with Repository.open(repo_path) as repo:
        for content_id in repo.list_streams():
            if not content_id.startswith("oci-layer-sha256:"):
                continue
            h = hashlib.sha256()
            copy_stream(repo, content_id, h.update)
            diff_id = content_id.removeprefix("oci-layer-")
            assert f"sha256:{h.hexdigest()}" == diff_id, f"{content_id} reassembles wrongly"
            found[content_id] = diff_id
    return found


def assert_consistent(repo_path: Path, algorithm: Algorithm) -> dict[str, str]:
    assert_objects_complete(repo_path, algorithm)
    return assert_streams_complete(repo_path)


def busy_threads() -> list[str]:
    """Threads other than the main one and trio's idle worker cache."""
    return [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith("Trio thread")
    ]


def list_tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
