"""A shell script written against cfsctl's output formats runs unchanged against ours."""

from __future__ import annotations

import os
import pty
import shlex
import subprocess
import sys
from pathlib import Path

from trio_composefs.testing import sample_layers, write_sample_layout

HERE = Path(__file__).parent
CLI = [sys.executable, "-m", "trio_composefs"]


def test_cfsctl_script(tmp_path: Path) -> None:
    layer = sample_layers()[1]
    tar = tmp_path / "layer.tar"
    tar.write_bytes(layer.tar)
    reference = write_sample_layout(str(tmp_path / "layout"))
    env = {**os.environ, "CFSCTL": shlex.join(CLI)}
    done = subprocess.run(
        [
            "bash",
            str(HERE / "cfsctl_script.sh"),
            str(tmp_path / "r"),
            reference,
            str(tar),
            layer.diff_id,
        ],
        capture_output=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"all cfsctl-format checks passed" in done.stderr


def test_binary_output_is_refused_on_a_terminal(tmp_path: Path) -> None:
    """``oci layer`` (raw tar) and ``cat`` refuse a terminal, as cfsctl does; a pipe is fine."""
    repo = tmp_path / "r"
    subprocess.run([*CLI, "--repo", str(repo), "init", "--insecure"], check=True, timeout=60)
    layer = sample_layers()[0]
    subprocess.run(
        [*CLI, "--repo", str(repo), "oci", "import-layer", layer.diff_id, "base"],
        input=layer.tar,
        capture_output=True,
        check=True,
        timeout=120,
    )
    for args in (["oci", "layer", layer.diff_id], ["cat", "refs/base"]):
        leader, follower = pty.openpty()
        try:
            done = subprocess.run(
                [*CLI, "--repo", str(repo), *args],
                stdout=follower,
                stderr=subprocess.PIPE,
                timeout=60,
            )
        finally:
            os.close(follower)
            os.close(leader)
        assert done.returncode == 1
        assert b"refusing to write" in done.stderr
        assert b"Traceback" not in done.stderr
    # --list, --dumpfile and --json are text: fine on a terminal
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [*CLI, "--repo", str(repo), "oci", "layer", layer.diff_id, "--json"],
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 0, done.stderr
