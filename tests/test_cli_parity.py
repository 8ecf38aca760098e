"""Helpful errors and cfsctl-like behaviour of single commands."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from trio_composefs.repository import Repository
from trio_composefs.testing import write_sample_layout

CLI = [sys.executable, "-m", "trio_composefs"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def test_missing_repository_says_how_to_create_it(tmp_path: Path) -> None:
    done = run("--repo", str(tmp_path / "nope"), "oci", "images")
    assert done.returncode == 1
    assert done.stderr.count(str(tmp_path / "nope")) == 2  # once where, once in the command
    assert "init`" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_gc_lock_timeout_gives_up_and_says_it_waits_once(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    with Repository.open(repo):  # holds the shared lock, as a running import does
        start = time.monotonic()
        done = run("--repo", str(repo), "gc", "--lock-timeout", "0.5")
        took = time.monotonic() - start
    assert done.returncode == 1
    assert done.stderr.count("waiting") == 1
    assert "still held" in done.stderr
    assert took < 20
    free = run("--repo", str(repo), "gc", "--lock-timeout", "0.5")
    assert free.returncode == 0, free.stderr
    assert "waiting" not in free.stderr


def test_fsck_names_the_tags_a_problem_affects(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    reference = write_sample_layout(str(tmp_path / "layout"))
    assert run("--repo", str(repo), "oci", "pull", reference, "mytag").returncode == 0
    stream = next((repo / "streams").glob("oci-layer-*"))
    target = stream.resolve()
    target.unlink()  # the layer's splitstream object is lost
    done = run("--repo", str(repo), "fsck", "--no-progress")
    assert done.returncode == 1
    advice = [line for line in done.stdout.splitlines() if line.startswith("    affects")]
    assert advice, done.stdout
    assert all("mytag" in line and "oci pull" in line for line in advice), done.stdout
    doc = run("--repo", str(repo), "oci", "fsck", "mytag", "--json", "--no-progress")
    assert doc.returncode == 0
    assert '"images_corrupted": 1' in doc.stdout
    # the advice holds: pulling again repairs it
    assert run("--repo", str(repo), "oci", "pull", reference, "mytag").returncode == 0
    assert run("--repo", str(repo), "fsck", "--no-progress").returncode == 0


def test_platform_mismatch_on_a_single_manifest_warns(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    reference = write_sample_layout(str(tmp_path / "layout"))
    done = run("--repo", str(repo), "oci", "pull", "--platform", "linux/s390x", reference, "x")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "linux/s390x" in warnings[0]


def test_open_waits_for_a_running_gc_and_says_so_once(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    assert run("--repo", str(repo), "init", "--insecure").returncode == 0
    with Repository.open(repo) as held, held.exclusive_lock():  # as gc holds it
        done = run("--repo", str(repo), "gc", "-n", "--lock-timeout", "0.3")
        assert done.returncode == 1
        assert done.stderr.count("waiting") == 1, done.stderr
        assert "shared lock is still held" in done.stderr
        errfile = tmp_path / "stderr"
        with open(errfile, "w") as errs:
            proc = subprocess.Popen(
                [*CLI, "--repo", str(repo), "oci", "images"],
                stdout=subprocess.PIPE,
                stderr=errs,
                text=True,
            )
        deadline = time.monotonic() + 60
        while "waiting" not in errfile.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None  # default: it waits
    out, _ = proc.communicate(timeout=60)
    err = errfile.read_text()
    assert proc.returncode == 0, err
    assert err.count("waiting until it is free") == 1
    assert out.strip() == "No images found"
