"""trio-cfsctl: init, measure-file, cat and oci layer, run as a user would."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trio_composefs.formats import Algorithm, fsverity_digest

CLI = [sys.executable, "-m", "trio_composefs"]


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, input=stdin, timeout=120)


def test_init_without_fs_verity_suggests_insecure(tmp_path: Path) -> None:
    done = run("--repo", str(tmp_path / "r"), "init")
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "fs-verity" in err
    assert "--insecure" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "meta.json").exists()


@pytest.mark.parametrize("algorithm", ["fsverity-sha256-12", "fsverity-sha512-12"])
def test_init_insecure_writes_the_upstream_layout(tmp_path: Path, algorithm: str) -> None:
    repo = tmp_path / "r"
    done = run("--repo", str(repo), "init", "--insecure", "--algorithm", algorithm)
    assert done.returncode == 0, done.stderr
    meta = json.loads((repo / "meta.json").read_text())
    assert meta["version"] == 1
    assert meta["algorithm"] == algorithm
    assert (repo.stat().st_mode & 0o777) == 0o700
    # idempotent, like cfsctl init on an existing repository with the same settings
    again = run("--repo", str(repo), "init", "--insecure", "--algorithm", algorithm)
    assert again.returncode == 0, again.stderr


def test_init_defaults_to_sha512_like_cfsctl(tmp_path: Path) -> None:
    assert run("init", "--insecure", str(tmp_path / "r")).returncode == 0
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["algorithm"] == "fsverity-sha512-12"


def test_measure_file_matches_the_fsverity_tool(tmp_path: Path) -> None:
    files = []
    for size in (0, 1, 4096, 4097, 300_000):
        p = tmp_path / f"f{size}"
        p.write_bytes(bytes((i * 7) % 251 for i in range(size)))
        files.append(p)
    done = run("measure-file", *map(str, files))
    assert done.returncode == 0, done.stderr
    ours = done.stdout.decode().split()
    assert ours == [fsverity_digest(p.read_bytes()).hex() for p in files]
    tool = shutil.which("fsverity")
    if tool is None:
        pytest.skip("the fsverity tool (Debian package fsverity) is not installed")
    for alg, flag in ((Algorithm.SHA256, "sha256"), (Algorithm.SHA512, "sha512")):
        out = run("measure-file", "--algorithm", alg.value, *map(str, files)).stdout.decode()
        expected = subprocess.run(
            [tool, "digest", f"--hash-alg={flag}", "--block-size=4096", *map(str, files)],
            capture_output=True,
            check=True,
        ).stdout.decode()
        assert out.split() == [line.split()[0].split(":")[1] for line in expected.splitlines()]


def test_measure_file_missing_file_is_one_line(tmp_path: Path) -> None:
    done = run("measure-file", str(tmp_path / "missing"))
    assert done.returncode == 1
    assert "missing" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


def test_import_list_and_cat(tmp_path: Path) -> None:
    from trio_composefs.testing._sample import sample_layers

    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    layer = sample_layers()[0]
    done = run("--repo", str(repo), "oci", "import-layer", layer.diff_id, "base", stdin=layer.tar)
    assert done.returncode == 0, done.stderr
    listing = run("--repo", str(repo), "oci", "layer", layer.diff_id, "--list").stdout.decode()
    assert "/usr/lib/big.bin" in listing
    assert "/usr/lib/libsample.so.1 -> libsample.so.1.0" in listing
    cat = run("--repo", str(repo), "cat", "refs/base").stdout
    assert hashlib.sha256(cat).hexdigest() == layer.diff_id.removeprefix("sha256:")


def test_missing_stream_and_bad_names(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    for name in ("oci-layer-sha256:" + "a" * 64, "refs/nothing", "../../etc/passwd"):
        done = run("--repo", str(repo), "cat", name)
        assert done.returncode == 1, name
        assert "Traceback" not in done.stderr.decode()
    not_a_repo = run("--repo", str(tmp_path / "nope"), "cat", "refs/x")
    assert not_a_repo.returncode == 1
    assert "Traceback" not in not_a_repo.stderr.decode()


def test_demo_shows_what_was_stored(tmp_path: Path) -> None:
    done = run("--repo", str(tmp_path / "demo"), "demo")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.count("identical to the original tar") == 3
    assert "[object " in out


def test_pull_through_skopeo_streams_and_checks(tmp_path: Path) -> None:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo (Debian package skopeo) is not installed")
    from trio_composefs.testing._sample import sample_layers
    from trio_composefs.testing._sample_image import write_sample_layout

    reference = write_sample_layout(str(tmp_path / "layout"))
    subprocess.run(
        [skopeo, "copy", "-q", reference, f"dir:{tmp_path / 'dir'}"], check=True, timeout=120
    )
    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    done = run("--repo", str(repo), "oci", "pull", f"dir:{tmp_path / 'dir'}", "viadir")
    assert done.returncode == 0, done.stderr
    # cfsctl's lines (manifest, config, verity, tagged, objects), then ours (image)
    lines = done.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == [
        "manifest",
        "config",
        "verity",
        "tagged",
        "objects",
        "image",
    ]
    assert lines[3] == "tagged   viadir"
    for layer in sample_layers():
        tar = run("--repo", str(repo), "oci", "layer", layer.diff_id).stdout
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == layer.diff_id
    check = run("--repo", str(repo), "fsck")
    assert check.returncode == 0, check.stdout


def test_bad_ref_name_is_refused_before_reading_the_layer(tmp_path: Path) -> None:
    from trio_composefs.testing._sample import sample_layers

    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    layer = sample_layers()[0]
    for bad in ("../x", "a//b", "x" * 300):
        done = run("--repo", str(repo), "oci", "import-layer", layer.diff_id, bad, stdin=layer.tar)
        assert done.returncode == 1, bad
        assert "invalid ref name" in done.stderr.decode()
    objects = repo / "objects"
    assert not objects.exists() or not any(objects.rglob("*"))


def test_closed_standard_streams_are_one_line(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    diff_id = "sha256:" + "a" * 64
    no_stdin = subprocess.run(
        [*CLI, "--repo", str(repo), "oci", "import-layer", diff_id],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        preexec_fn=lambda: __import__("os").close(0),
    )
    assert no_stdin.returncode == 1
    assert "standard input is closed" in no_stdin.stderr.decode()
