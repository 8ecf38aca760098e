"""Pulls from a real registry: Debian's ``docker-registry`` (CNCF distribution 2.8) on loopback.

Images are pushed with ``skopeo copy --preserve-digests`` and pulled through skopeo's image
proxy, by the CLI (``trio-cfsctl oci pull docker://127.0.0.1:PORT/NAME:TAG --tls-verify=false``)
and by the API. The oracle for what a pull stores is the same image pulled from its OCI layout:
the same streams, composefs image and image ID. Faults are real ones: the registry killed by
its PID, a blob deleted from its storage, a blob's bytes changed in its storage.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ocifixtures import Layout, make_tar, umoci_layout
from trio_composefs import (
    DigestMismatchError,
    ImageSourceError,
    Repository,
    SourceAuthenticationError,
    SourceNetworkError,
)
from trio_composefs.oci import Platform, open_source, parse_source, pull_image
from trio_composefs.oci.sources import SkopeoOptions, SkopeoSource
from trio_composefs.testing import (
    FaultySource,
    Gate,
    ImportChecker,
    LocalRegistry,
    RegistryUnavailable,
    find_registry,
    write_sample_layout,
)

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")

NO_TLS = SkopeoOptions(tls_verify=False)


def need_registry() -> None:
    try:
        find_registry()
    except RegistryUnavailable as e:
        pytest.skip(str(e))


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``trio-cfsctl --repo REPO --insecure ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "trio_composefs", "--repo", str(repo), "--insecure", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def stored(repo_path: Path) -> dict[str, Any]:
    """What a repository publishes: streams, stream refs, images (the oracle's terms)."""
    with Repository.open(repo_path, insecure=True) as repo:
        return {
            "streams": {k: v.hex() for k, v in repo.list_streams().items()},
            "refs": repo.list_stream_refs(),
            "images": sorted(repo.list_images()),
        }


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


# --------------------------------------------------------------------------- images


def umoci_tars(layout: Path) -> tuple[list[bytes], dict[str, Any]]:
    """The uncompressed layers and the config of the umoci-built layout's tag 'latest'."""
    (entry,) = json.loads((layout / "index.json").read_bytes())["manifests"]
    blobs = layout / "blobs/sha256"
    manifest = json.loads((blobs / entry["digest"][7:]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
    tars = [gzip.decompress((blobs / d["digest"][7:]).read_bytes()) for d in manifest["layers"]]
    return tars, config


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """OCI layouts, each with the tag given: ``umoci`` (the umoci-built multi-layer image,
    gzip, tag latest), ``umoci-zstd`` (its layers as zstd, tag latest), ``sample`` (gzip,
    zstd and plain layers), ``multi`` (an index: linux/amd64 and linux/arm64, tag latest)."""
    base = tmp_path_factory.mktemp("registry-images")
    umoci = umoci_layout(
        base / "u", {"etc/hostname": b"registry\n", "usr/share/big": os.urandom(300_000)}
    )
    if umoci is None:
        pytest.skip("umoci is not installed")
    tars, config = umoci_tars(umoci)
    assert len(tars) >= 2
    zstd = Layout(base / "umoci-zstd")
    zstd.add_image(tars, compression="zstd", config=config, tag="latest")
    zstd.write_index()
    write_sample_layout(base / "sample")
    multi = Layout(base / "multi")
    entries = []
    for arch in ("amd64", "arm64"):
        image = multi.add_image(
            [make_tar([(f"arch/{arch}", arch.encode() * 100)])],
            compression="gzip",
            config={"architecture": arch, "os": "linux"},
            index=False,
        )
        entries.append(image.descriptor(Platform("linux", arch)))
    multi.add_index(entries, tag="latest")
    multi.write_index()
    return {"umoci": umoci, "umoci-zstd": base / "umoci-zstd", "sample": base / "sample"} | {
        "multi": base / "multi"
    }


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]
) -> Iterator[LocalRegistry]:
    """A registry without authentication holding every image of :func:`images`."""
    need_registry()
    with LocalRegistry(tmp_path_factory.mktemp("registry")) as reg:
        for name, layout in images.items():
            reg.push(f"oci:{layout}:latest", f"{name}:latest", all_images=name == "multi")
        yield reg


@pytest.fixture(scope="module")
def auth_registry(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]
) -> Iterator[LocalRegistry]:
    """A registry with htpasswd authentication (user alice) holding the sample."""
    need_registry()
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd (apache2-utils) is not installed")
    root = tmp_path_factory.mktemp("auth-registry")
    with LocalRegistry(root, users={"alice": "s3cret-pass"}) as reg:
        reg.push(f"oci:{images['sample']}:latest", "sample:latest")
        yield reg


# --------------------------------------------------------------------------- pulls


@pytest.mark.parametrize("name", ["umoci", "umoci-zstd", "sample"])
def test_registry_pull_stores_what_the_layout_pull_stores(
    registry: LocalRegistry, images: dict[str, Path], tmp_path: Path, name: str
) -> None:
    ours, theirs = tmp_path / "from-registry", tmp_path / "from-layout"
    for repo in (ours, theirs):
        assert cli(repo, "init").returncode == 0
    pulled = cli(
        ours, "oci", "pull", registry.reference(f"{name}:latest"), "t", "--tls-verify=false"
    )
    assert pulled.returncode == 0, pulled.stderr
    local = cli(theirs, "oci", "pull", f"oci:{images[name]}:latest", "t")
    assert local.returncode == 0, local.stderr
    # the same manifest, config, verity digest and image ID lines, and the same repository
    assert pulled.stdout == local.stdout
    assert "image    " in pulled.stdout
    assert stored(ours) == stored(theirs)
    # a second pull finds everything present
    again = cli(ours, "oci", "pull", registry.reference(f"{name}:latest"), "t", "--tls-verify")
    assert again.returncode == 1  # --tls-verify (true): plain HTTP is refused, in one line
    assert again.stderr.count("\n") == 1
    assert "--tls-verify=false" in again.stderr
    again = cli(ours, "oci", "pull", registry.reference(f"{name}:latest"), "t", "--tls-verify=0")
    assert again.returncode == 0, again.stderr
    assert "image already present" in again.stderr


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
async def test_registry_index_picks_the_platform(
    registry: LocalRegistry, images: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    platform = Platform("linux", arch)
    results = []
    for i, ref in enumerate([registry.reference("multi:latest"), f"oci:{images['multi']}:latest"]):
        with Repository.init(tmp_path / f"r{i}", insecure=True) as repo:
            async with open_source(parse_source(ref), skopeo=NO_TLS) as source:
                stats = await pull_image(repo, source, tag="t", platform=platform)
            config = json.loads(
                (images["multi"] / "blobs/sha256" / stats.config_digest[7:]).read_bytes()
            )
            assert config["architecture"] == arch
            results.append((stats.manifest_digest, stats.image, repo.list_streams()))
    assert results[0] == results[1]


# --------------------------------------------------------------------------- authentication


def test_registry_auth_required_is_one_line(auth_registry: LocalRegistry, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert cli(repo, "init").returncode == 0
    ref = auth_registry.reference("sample:latest")
    for extra in ([], ["--creds", "alice:wrong"]):
        result = cli(repo, "oci", "pull", ref, "t", "--tls-verify=false", *extra)
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("trio-cfsctl: error: ")
        assert "authentication required" in lines[0]
    assert stored(repo)["streams"] == {}


def test_registry_auth_with_credentials(
    auth_registry: LocalRegistry, images: dict[str, Path], tmp_path: Path
) -> None:
    ref = auth_registry.reference("sample:latest")
    by_creds, by_file, local = tmp_path / "creds", tmp_path / "authfile", tmp_path / "local"
    for repo in (by_creds, by_file, local):
        assert cli(repo, "init").returncode == 0
    result = cli(
        by_creds,
        "oci",
        "pull",
        ref,
        "t",
        "--tls-verify=false",
        "--creds",
        auth_registry.credentials(),
    )
    assert result.returncode == 0, result.stderr
    authfile = auth_registry.write_authfile(tmp_path / "auth.json")
    result2 = cli(
        by_file, "oci", "pull", ref, "t", "--tls-verify=false", "--authfile", str(authfile)
    )
    assert result2.returncode == 0, result2.stderr
    result3 = cli(local, "oci", "pull", f"oci:{images['sample']}:latest", "t")
    assert result.stdout == result2.stdout == result3.stdout
    assert stored(by_creds) == stored(by_file) == stored(local)


async def test_registry_auth_error_type(auth_registry: LocalRegistry, tmp_path: Path) -> None:
    with Repository.init(tmp_path / "repo", insecure=True) as repo:
        ref = parse_source(auth_registry.reference("sample:latest"))
        with pytest.raises(SourceAuthenticationError, match="authentication required"):
            async with open_source(ref, skopeo=NO_TLS) as source:
                await pull_image(repo, source)


def test_registry_options_refused_for_local_sources(
    images: dict[str, Path], tmp_path: Path
) -> None:
    result = cli(tmp_path / "r", "oci", "pull", f"oci:{images['sample']}:latest", "--creds", "a:b")
    assert result.returncode == 1
    assert "for registries" in result.stderr


# --------------------------------------------------------------------------- faults

BIG = 40 << 20  # more than loopback sockets and the proxy's pipe buffer together


@pytest.fixture(scope="module")
def big_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An image whose first layer is a 40 MiB plain tar of random bytes, then a gzip and
    a zstd layer; its layer digests (the big one first)."""
    layout = Layout(tmp_path_factory.mktemp("big") / "layout")
    tars = [
        make_tar([("big.bin", os.urandom(BIG))]),
        make_tar([("etc/a", b"a" * 5000), ("etc/b", os.urandom(70_000))]),
        make_tar([("usr/c", os.urandom(100_000))]),
    ]
    image = layout.add_image(tars, compression=[None, "gzip", "zstd"], tag="latest")
    layout.write_index()
    return layout.path, list(image.layer_digests)


@pytest.fixture
def big_registry(tmp_path: Path, big_layout: tuple[Path, list[str]]) -> Iterator[LocalRegistry]:
    """A registry of this test's own (to fault) holding :func:`big_layout` as big:latest."""
    need_registry()
    with LocalRegistry(tmp_path / "registry") as reg:
        reg.push(f"oci:{big_layout[0]}:latest", "big:latest")
        yield reg


async def pull_big(
    repo: Repository, registry: LocalRegistry, faulty: FaultySource | None = None
) -> Any:
    source = faulty or FaultySource(
        open_source(parse_source(registry.reference("big:latest")), skopeo=NO_TLS)
    )
    async with source:
        return await pull_image(repo, source, tag="big", layer_jobs=1)


async def pull_killing(
    repo: Repository, registry: LocalRegistry, source: FaultySource, gate: Gate
) -> None:
    """Pull; kill the registry (by PID) while the source is stopped at ``gate``."""

    async def kill_when_stalled() -> None:
        await gate.wait_reached()
        registry.kill()
        gate.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_when_stalled)
        await pull_big(repo, registry, source)


async def test_registry_killed_mid_blob(
    big_registry: LocalRegistry, big_layout: tuple[Path, list[str]], tmp_path: Path
) -> None:
    big = big_layout[1][0]
    with Repository.init(tmp_path / "repo", insecure=True) as repo:
        repo.begin_object().abort()  # the directories it opens lazily, and keeps
        checker = ImportChecker(repo)
        source = FaultySource(
            open_source(parse_source(big_registry.reference("big:latest")), skopeo=NO_TLS)
        )
        gate = source.stall(digest=big, after_bytes=1 << 20)

        with pytest.raises(BaseExceptionGroup) as caught:
            await pull_killing(repo, big_registry, source, gate)
        (error,) = leaves(caught.value)
        # the connection broke: a network error, saying which blob and how much was missing
        assert isinstance(error, SourceNetworkError)
        assert isinstance(error, ConnectionError)
        assert f"blob {big}" in str(error)
        assert "bytes early" in str(error)
        assert checker.published_since() == []
        checker.assert_no_leaks()
        await checker.assert_consistent()

        big_registry.start()  # back, on a new port, with its storage
        checker.baseline()  # the registry is a child process of ours again
        stats = await pull_big(repo, big_registry)
        assert stats.layers_imported == 3
        await checker.assert_consistent()
        checker.assert_no_leaks()


async def test_registry_killed_between_layers(
    big_registry: LocalRegistry, big_layout: tuple[Path, list[str]], tmp_path: Path
) -> None:
    big = big_layout[1][0]
    with Repository.init(tmp_path / "repo", insecure=True) as repo:
        repo.begin_object().abort()  # the directories it opens lazily, and keeps
        checker = ImportChecker(repo)
        source = FaultySource(
            open_source(parse_source(big_registry.reference("big:latest")), skopeo=NO_TLS)
        )
        # the big layer comes first (largest first): stop after its last byte, kill
        size = (big_layout[0] / "blobs/sha256" / big[7:]).stat().st_size
        gate = source.stall(digest=big, after_bytes=size)

        with pytest.raises(BaseExceptionGroup) as caught:
            await pull_killing(repo, big_registry, source, gate)
        (error,) = leaves(caught.value)
        assert isinstance(error, SourceNetworkError), repr(error)
        assert "connection refused" in str(error)
        # only the verified big layer is published: no config, manifest or tag
        new = checker.published_since()
        assert len(new) == 1
        assert new[0].startswith("streams/oci-layer-sha256:")
        checker.assert_nothing_published()
        await checker.assert_consistent()

        big_registry.start()
        checker.baseline()
        stats = await pull_big(repo, big_registry)
        assert stats.layers_imported == 2  # the big layer was re-used, not fetched again
        assert [layer.skipped for layer in stats.layers] == [True, False, False]
        checker.assert_no_leaks()


@pytest.mark.parametrize("fault", ["deleted", "changed"])
async def test_registry_blob_damaged_in_storage(
    big_registry: LocalRegistry, big_layout: tuple[Path, list[str]], tmp_path: Path, fault: str
) -> None:
    gzip_layer = big_layout[1][1]
    blob = big_registry.blob_path(gzip_layer)
    original = blob.read_bytes()
    if fault == "deleted":
        blob.unlink()
    else:
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x40
        blob.write_bytes(bytes(damaged))
    with Repository.init(tmp_path / "repo", insecure=True) as repo:
        repo.begin_object().abort()  # the directories it opens lazily, and keeps
        checker = ImportChecker(repo)
        with pytest.raises(BaseExceptionGroup) as caught:
            await pull_big(repo, big_registry)
        (error,) = leaves(caught.value)
        assert gzip_layer in str(error)  # names the layer
        if fault == "deleted":
            assert isinstance(error, ImageSourceError)
            assert "404" in str(error)
        else:
            assert isinstance(error, DigestMismatchError), repr(error)
        checker.assert_nothing_published()
        await checker.assert_consistent()
        checker.assert_no_leaks()

        blob.write_bytes(original)  # repaired
        stats = await pull_big(repo, big_registry)
        skipped = {layer.diff_id: layer.skipped for layer in stats.layers}
        # imported largest first, one at a time: the two before the damaged one were
        # verified and published the first time, and are re-used
        assert sorted(skipped.values()) == [False, True, True]
        await checker.assert_consistent()


def test_registry_down_is_a_one_line_network_error(
    big_registry: LocalRegistry, tmp_path: Path
) -> None:
    ref = big_registry.reference("big:latest")
    big_registry.kill()
    repo = tmp_path / "repo"
    assert cli(repo, "init").returncode == 0
    result = cli(repo, "oci", "pull", ref, "t", "--tls-verify=false")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("trio-cfsctl: error: ")
    assert "connection refused" in line
    assert stored(repo)["streams"] == {}


async def test_skopeo_copy_source_takes_the_same_options(
    auth_registry: LocalRegistry, images: dict[str, Path], tmp_path: Path
) -> None:
    ref = auth_registry.reference("sample:latest")
    authfile = str(auth_registry.write_authfile(tmp_path / "auth.json"))
    options = SkopeoOptions(tls_verify=False, authfile=authfile)
    assert options.copy_args() == ["--src-tls-verify=false", "--src-authfile", authfile]
    with Repository.init(tmp_path / "a", insecure=True) as repo:
        async with SkopeoSource(ref, workdir=str(tmp_path), options=options) as source:
            stats = await pull_image(repo, source, tag="t")
    with Repository.init(tmp_path / "b", insecure=True) as repo:
        async with open_source(parse_source(f"oci:{images['sample']}:latest")) as source:
            local = await pull_image(repo, source, tag="t")
    assert (stats.manifest_digest, stats.image) == (local.manifest_digest, local.image)
    with pytest.raises(SourceAuthenticationError, match="authentication required"):
        async with SkopeoSource(ref, workdir=str(tmp_path), options=NO_TLS) as source:
            await source.resolve()
