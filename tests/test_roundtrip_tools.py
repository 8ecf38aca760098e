"""Archives written by other tools go through the whole pipeline and come back bit for bit."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from checks import assert_consistent
from tarfixtures import WRITERS, make_tree, profile_for, write_archive
from trio_composefs.formats import Algorithm, ExternalChunk
from trio_composefs.importer import import_layer, layer_content_id
from trio_composefs.repository import Repository, copy_stream, iter_layer_entries


@pytest.mark.parametrize("writer", WRITERS)
async def test_tool_archive_round_trips_through_the_repository(writer: str, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", profile_for(writer))
    data = write_archive(writer, tree, tmp_path / "layer.tar")
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True) as repo:
        stats = await import_layer(repo, [data], diff_id, name=f"tools/{writer}")
        out = bytearray()
        copy_stream(repo, f"refs/tools/{writer}", out.extend)
        assert bytes(out) == data
        entries = list(iter_layer_entries(repo, layer_content_id(diff_id)))
    with tarfile.open(tmp_path / "layer.tar") as archive:
        members = archive.getmembers()
    assert len(entries) == len(members)
    big = [m for m in members if m.isreg() and m.size > 64]
    assert stats.objects == len(big)
    assert sum(isinstance(e.content, ExternalChunk) for e in entries) == len(big)
    assert_consistent(tmp_path / "repo", Algorithm.SHA256)


async def test_sha512_repository(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", profile_for("gnutar-posix"))
    data = write_archive("gnutar-posix", tree, tmp_path / "layer.tar")
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    with Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA512, insecure=True) as repo:
        stats = await import_layer(repo, [data], diff_id)
        assert stats.splitstream.algorithm is Algorithm.SHA512
        out = bytearray()
        copy_stream(repo, layer_content_id(diff_id), out.extend)
        assert bytes(out) == data
    assert_consistent(tmp_path / "repo", Algorithm.SHA512)
