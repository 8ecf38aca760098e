"""fsck: a clean repository passes; every kind of damage is found, all at once."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import trio

from trio_composefs.cli import run
from trio_composefs.formats import Algorithm, ContentType, Digest, ExternalChunk, encode_splitstream
from trio_composefs.importer import layer_content_id, open_importer
from trio_composefs.maintenance import FsckProblem, FsckProgress, fsck
from trio_composefs.repository import Repository, open_splitstream
from trio_composefs.testing import sample_layers

FSVERITY = shutil.which("fsverity")


def content(seed: str, size: int) -> bytes:
    out = bytearray()
    n = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{n}".encode()).digest()
        n += 1
    return bytes(out[:size])


def make_tar(files: dict[str, bytes]) -> bytes:
    """A tar written by Python's tarfile (regular files, fixed metadata)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


async def import_all(repo: Repository, layers: list[tuple[bytes, str | None]]) -> list[str]:
    """Import each (tar, ref) with the real pipeline; returns the stream names."""
    names = []
    async with open_importer(repo) as importer:
        for tar, ref in layers:
            await importer.import_layer(tar, diff_id(tar), name=ref)
            names.append(layer_content_id(diff_id(tar)))
    return names


def object_refs(repo: Repository, stream: str) -> list[Digest]:
    with open_splitstream(repo, stream) as (info, _data):
        return list(info.object_refs)


def tool_digest(path: Path, algorithm: Algorithm) -> str:
    """The fs-verity digest computed by the fsverity tool (the independent oracle)."""
    assert FSVERITY is not None
    out = subprocess.run(
        [FSVERITY, "digest", f"--hash-alg={algorithm.hash_name}", "--compact", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip()


async def cli(argv: list[str]) -> int:
    """The CLI (which runs trio itself), from a worker thread."""
    return await trio.to_thread.run_sync(run, argv)


def object_files(repo_path: Path) -> list[Path]:
    return sorted(p for p in (repo_path / "objects").glob("??/*"))


@pytest.mark.parametrize("algorithm", [Algorithm.SHA256, Algorithm.SHA512])
async def test_clean_repository_passes(
    tmp_path: Path, algorithm: Algorithm, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=algorithm, insecure=True) as repo:
        layers = sample_layers()
        await import_all(repo, [(layer.tar, f"sample/{i}") for i, layer in enumerate(layers)])
        seen: list[FsckProgress] = []
        report = await fsck(repo, progress=seen.append)
    assert report.ok, report.summary()
    assert report.problems == ()
    assert report.objects_checked == len(object_files(path))
    assert report.objects_corrupted == 0
    assert report.bytes_hashed >= sum(len(layer.tar) for layer in layers) // 2
    assert report.streams_checked == len(layers)
    assert report.contents_checked == len(layers)  # each layer's sha256 matched its diff_id
    assert report.refs_checked == len(layers)
    assert report.stray_tmpfiles == ()
    assert seen
    assert seen[-1].phase == "streams"
    assert seen[-1].done == seen[-1].total
    # The CLI, in text and JSON.
    assert await cli(["--repo", str(path), "fsck"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "status: ok"  # cfsctl's last line
    assert await cli(["--repo", str(path), "fsck", "--json", "--no-check-layers"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert doc["errors"] == []
    assert doc["contentsChecked"] == 0
    assert doc["objectsChecked"] == report.objects_checked


@pytest.mark.skipif(FSVERITY is None, reason="needs the fsverity tool as an oracle")
async def test_every_damage_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alg = Algorithm.SHA256
    path = tmp_path / "repo"
    shared = content("shared", 5000)
    tars = [
        make_tar({"a/shared": shared, "a/own": content(f"own{i}", 3000 + 1000 * i)})
        for i in range(3)
    ]
    repo = Repository.init(path, algorithm=alg, insecure=True)
    with repo:
        streams = await import_all(repo, [(tar, f"ref{i}") for i, tar in enumerate(tars)])
        shared_digest = object_refs(repo, streams[0])[0]
        own = [object_refs(repo, s)[1] for s in streams]
        assert all(
            own[i] not in object_refs(repo, streams[j])
            for i in range(3)
            for j in range(3)
            if i != j
        )
        splitstream2 = repo.resolve_stream(streams[2])
        assert (await fsck(repo)).ok

        # A config stream (one external object, as composefs-oci writes them)
        # with a named ref to a missing layer stream, and a manifest stream
        # whose reassembled bytes do not match the sha256 in its name.
        missing_layer = Digest(alg, b"\x42" * 32)
        config = b'{"config": "of some image"}'
        cfg_obj = repo.store_object(config)
        cfg = repo.store_object(
            encode_splitstream(
                [ExternalChunk(cfg_obj, len(config))],
                algorithm=alg,
                content_type=ContentType.OCI_CONFIG,
                named_refs={"sha256:" + "1" * 64: missing_layer},
            )
        )
        cfg_name = "oci-config-sha256:" + hashlib.sha256(config).hexdigest()
        repo.publish_stream(cfg_name, cfg, "oci/cfg")
        manifest = b'{"manifest": true}'
        man_obj = repo.store_object(manifest)
        man = repo.store_object(
            encode_splitstream(
                [ExternalChunk(man_obj, len(manifest))],
                algorithm=alg,
                content_type=ContentType.OCI_MANIFEST,
            )
        )
        wrong = hashlib.sha256(b"something else").hexdigest()
        man_name = f"oci-manifest-sha256:{wrong}"
        repo.publish_stream(man_name, man, "oci/man")
        good_name = "oci-manifest-sha256:" + hashlib.sha256(manifest).hexdigest()
        repo.publish_stream(good_name, man, "oci/good")

        # 1. A flipped byte in layer 0's own object.
        flipped = path / "objects" / own[0].object_path()
        data = bytearray(flipped.read_bytes())
        data[1234] ^= 0x01
        flipped.write_bytes(bytes(data))
        # 2. Layer 1's own object is missing.
        (path / "objects" / own[1].object_path()).unlink()
        # 3. Layer 2's splitstream is truncated.
        truncated = path / "objects" / splitstream2.object_path()
        truncated.write_bytes(truncated.read_bytes()[:100])
        # 4. A stream name whose object does not exist.
        dangling = "oci-layer-sha256:" + "e" * 64
        os.symlink(f"../objects/ee/{'e' * 62}", path / "streams" / dangling)
        # 5. A ref to a stream that does not exist.
        os.makedirs(path / "streams/refs/deep/er")
        os.symlink("../../../oci-layer-sha256:" + "f" * 64, path / "streams/refs/deep/er/gone")
        # Not a problem: a leftover temporary file.
        (path / "objects/.tmp-object-AbCdEf123456").write_bytes(b"partial")

        report = await fsck(repo)

    got = {(p.kind, p.path) for p in report.problems}
    assert got == {
        ("object-digest-mismatch", f"objects/{own[0].object_path()}"),
        ("stream-digest-mismatch", f"streams/{streams[0]}"),
        ("missing-object-ref", f"streams/{streams[1]}"),
        ("object-digest-mismatch", f"objects/{splitstream2.object_path()}"),
        ("stream-read-failed", f"streams/{streams[2]}"),
        ("broken-symlink", f"streams/{dangling}"),
        ("broken-symlink", "streams/refs/deep/er/gone"),
        ("missing-named-ref", f"streams/{cfg_name}"),
        ("stream-digest-mismatch", f"streams/{man_name}"),
    }
    assert len(report.problems) == len(got)
    by_kind: dict[tuple[str, str], FsckProblem] = {(p.kind, p.path): p for p in report.problems}
    bad = by_kind[("object-digest-mismatch", f"objects/{own[0].object_path()}")]
    assert bad.expected == own[0].hex()
    assert bad.actual == tool_digest(flipped, alg)
    bad = by_kind[("object-digest-mismatch", f"objects/{splitstream2.object_path()}")]
    assert bad.expected == splitstream2.hex()
    assert bad.actual == tool_digest(truncated, alg)
    layer = by_kind[("stream-digest-mismatch", f"streams/{streams[0]}")]
    tampered = bytearray(tars[0])
    offset = tampered.find(content("own0", 3000))
    tampered[offset + 1234] ^= 0x01
    assert layer.expected == diff_id(tars[0])
    assert layer.actual == diff_id(bytes(tampered))
    assert by_kind[("missing-object-ref", f"streams/{streams[1]}")].object_id == own[1].hex()
    named = by_kind[("missing-named-ref", f"streams/{cfg_name}")]
    assert named.object_id == missing_layer.hex()
    assert named.ref_name == "sha256:" + "1" * 64
    mismatch = by_kind[("stream-digest-mismatch", f"streams/{man_name}")]
    assert mismatch.expected == f"sha256:{wrong}"
    assert mismatch.actual == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert report.stray_tmpfiles == ("objects/.tmp-object-AbCdEf123456",)
    assert report.objects_corrupted == 2
    assert report.missing_objects == 2
    assert report.broken_links == 2
    assert shared_digest.object_path() not in {p.path for p in report.problems}

    # The CLI reports all of them and fails.
    # (cfsctl: --json exits 0 once the check ran; ``errors`` are its message strings)
    assert await cli(["--repo", str(path), "fsck", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert {(e["type"], e["path"]) for e in doc["problems"]} == got
    assert {tuple(e.split(": ")[1:3]) for e in doc["errors"]} == got
    assert await cli(["--repo", str(path), "fsck"]) == 1
    text = capsys.readouterr().out
    assert text.count("fsck: ") == len(got)
    assert "status: 9 error(s)" in text
    assert "stray temporary file: objects/.tmp-object-AbCdEf123456" in text


async def test_structure_problems(tmp_path: Path) -> None:
    """Not-a-symlink entries, bad object names and unexpected ref files."""
    path = tmp_path / "repo"
    with Repository.init(path, algorithm=Algorithm.SHA256, insecure=True) as repo:
        await import_all(repo, [(make_tar({"f": content("x", 200)}), "r")])
        (path / "streams" / "plain-file").write_bytes(b"")
        (path / "objects" / "ab").mkdir(exist_ok=True)
        (path / "objects" / "ab" / "not-hex").write_bytes(b"")
        (path / "streams" / "refs" / "file").write_bytes(b"")
        (path / "images" / "img").symlink_to("../objects/00/" + "0" * 62)
        report = await fsck(repo, check_objects=True)
    assert {(p.kind, p.path) for p in report.problems} == {
        ("entry-not-symlink", "streams/plain-file"),
        ("object-invalid-name", "objects/ab/not-hex"),
        ("unexpected-file-type", "streams/refs/file"),
        ("broken-symlink", "images/img"),
    }
    assert report.images_checked == 1


async def test_secure_repository_needs_verity(tmp_path: Path) -> None:
    """A secure repository (simulated kernel fs-verity): a file without verity is reported."""
    from trio_composefs.repository._verity import SimulatedVerityKernel, VerityOps

    path = tmp_path / "repo"
    with SimulatedVerityKernel() as kernel:
        ops = VerityOps(kernel)
        Repository.init(path, algorithm=Algorithm.SHA256, verity_ops=ops).close()
        with Repository.open(path, verity_ops=ops) as repo:
            assert not repo.insecure
            await import_all(repo, [(make_tar({"f": content("y", 9000)}), "r")])
            assert (await fsck(repo)).ok
            digest = repo.store_object(b"x" * 100)
            target = path / "objects" / digest.object_path()
            data = target.read_bytes()
            target.unlink()
            target.write_bytes(data)  # a new inode: no fs-verity on it
            report = await fsck(repo)
    assert [(p.kind, p.path) for p in report.problems] == [
        ("object-verity-missing", f"objects/{digest.object_path()}")
    ]
