"""The command line under Ctrl-C and kill -9: the repository stays consistent."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import IO

import pytest

from checks import assert_consistent
from trio_composefs.formats import Algorithm
from trio_composefs.repository import Repository

CLI = [sys.executable, "-m", "trio_composefs"]


def big_tar(path: Path, files: int = 300, seed: int = 0) -> str:
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            data = rnd.randbytes(rnd.choice([10, 100, 5000, 200_000, 1_500_000]))
            info = tarfile.TarInfo(f"dir{i % 7}/file{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cli(
    repo: Path, *args: str, stdin: IO[bytes] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, "--repo", str(repo), *args], capture_output=True, timeout=300, stdin=stdin
    )


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    Repository.init(tmp_path / "repo", algorithm=Algorithm.SHA256, insecure=True).close()
    return tmp_path / "repo"


def test_import_layer_and_cat_round_trip(repo_path: Path, tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    diff_id = big_tar(tar, files=40)
    done = cli(repo_path, "oci", "import-layer", diff_id, "mylayer", "--file", str(tar))
    assert done.returncode == 0, done.stderr
    splitstream = done.stdout.decode().strip()
    assert splitstream.startswith("sha256:")  # cfsctl prints the object id with its algorithm
    assert len(splitstream) == 7 + 64
    cat = cli(repo_path, "cat", "refs/mylayer")
    assert cat.returncode == 0
    assert cat.stdout == tar.read_bytes()
    layer = cli(repo_path, "oci", "layer", diff_id)
    assert layer.stdout == tar.read_bytes()
    # stdin works too, and the second time the layer is skipped
    with open(tar, "rb") as f:
        again = cli(repo_path, "oci", "import-layer", diff_id, stdin=f)
    assert again.returncode == 0
    assert again.stdout.decode().strip() == splitstream


def test_user_mistakes_are_one_line(repo_path: Path, tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    big_tar(tar, files=5)
    wrong = "sha256:" + "1" * 64
    done = cli(repo_path, "oci", "import-layer", wrong, "--file", str(tar))
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "not the diff_id" in lines[0]
    assert "Traceback" not in done.stderr.decode()
    missing = cli(repo_path, "cat", "oci-layer-" + wrong)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr.decode()
    nofile = cli(repo_path, "oci", "import-layer", wrong, "--file", str(tmp_path / "nope"))
    assert nofile.returncode == 1
    assert "nope" in nofile.stderr.decode()


def test_ctrl_c_exits_130_and_leaves_the_repository_consistent(
    repo_path: Path, tmp_path: Path
) -> None:
    tar = tmp_path / "layer.tar"
    diff_id = big_tar(tar)
    data = tar.read_bytes()
    proc = subprocess.Popen(
        [*CLI, "--repo", str(repo_path), "oci", "import-layer", diff_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) // 2])  # half the layer, then the pipe stays open
    proc.stdin.flush()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert assert_consistent(repo_path, Algorithm.SHA256) == {}
    done = cli(repo_path, "oci", "import-layer", diff_id, "--file", str(tar))
    assert done.returncode == 0, done.stderr
    assert cli(repo_path, "oci", "layer", diff_id).stdout == data


@pytest.mark.parametrize("seed", range(6))
def test_kill_9_at_random_moments(repo_path: Path, tmp_path: Path, seed: int) -> None:
    tar = tmp_path / "layer.tar"
    diff_id = big_tar(tar, seed=seed)
    delay = random.Random(seed).uniform(0.2, 2.5)
    proc = subprocess.Popen(
        [*CLI, "--repo", str(repo_path), "oci", "import-layer", diff_id, "--file", str(tar)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    published = assert_consistent(repo_path, Algorithm.SHA256)
    assert set(published.values()) <= {diff_id}
    done = cli(repo_path, "oci", "import-layer", diff_id, "--file", str(tar))
    assert done.returncode == 0, done.stderr
    assert cli(repo_path, "oci", "layer", diff_id).stdout == tar.read_bytes()
