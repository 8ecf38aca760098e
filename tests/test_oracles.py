"""The C composefs oracle itself is right: it reproduces composefs-rs's pinned image digests.

``tests/mkfs.rs::test_erofs_digest_stability`` in composefs-rs pins the fs-verity SHA-256 of the
images of two trees, in formats V0 and V1 (composefs-erofs-notes.md §6, which gives each digest as
its first 8 and last 4 hex digits). C ``mkcomposefs --from-file`` must give the same images, and
``fsverity digest`` (fsverity-utils) must measure them as pinned.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from oracles import need_c_tool

ROOT = "/ 0 40755 2 0 0 0 0.0 - - -\n"
EMPTY = ROOT
SIMPLE = ROOT + (
    "/blkdev 0 60000 1 0 0 123 0.0 - - -\n"
    "/chrdev 0 20000 1 0 0 123 0.0 - - -\n"
    "/fifo 0 10000 1 0 0 0 0.0 - - -\n"
    f"/regular-external 1234 100000 1 0 0 0 0.0 5a/{'5a' * 31} - {'5a' * 32}\n"
    "/regular-inline 4 100000 1 0 0 0 0.0 - hihi -\n"
    "/socket 0 140000 1 0 0 0 0.0 - - -\n"
    "/symlink 7 120000 1 0 0 0 0.0 /target - -\n"
)

# (tree, format version, digest prefix, digest suffix)
PINS = [
    ("empty", 0, "8f589e8f", "3682"),
    ("empty", 1, "14a26c95", "0b63"),
    ("simple", 0, "9f3f5620", "fa01"),
    ("simple", 1, "ad6db642", "62b5"),
]
TREES = {"empty": EMPTY, "simple": SIMPLE}


@pytest.mark.parametrize(("tree", "version", "prefix", "suffix"), PINS)
def test_mkcomposefs_reproduces_pinned_digest(
    tmp_path: Path, tree: str, version: int, prefix: str, suffix: str
) -> None:
    mkcomposefs = need_c_tool("mkcomposefs")
    fsverity = shutil.which("fsverity")
    if fsverity is None:
        pytest.skip("the fsverity tool (Debian package fsverity) is not installed")
    dump = tmp_path / f"{tree}.dump"
    dump.write_text(TREES[tree])
    image = tmp_path / f"{tree}.v{version}.img"
    versions = [f"--min-version={version}", f"--max-version={version}"]
    subprocess.run([mkcomposefs, *versions, "--from-file", dump, image], check=True)

    out = subprocess.run(
        [fsverity, "digest", image], check=True, capture_output=True, text=True
    ).stdout
    algorithm, _, digest = out.split()[0].partition(":")
    assert algorithm == "sha256"
    assert len(digest) == 64
    assert digest.startswith(prefix)
    assert digest.endswith(suffix)

    # mkcomposefs's own measure of the image it would write agrees with fsverity-utils.
    printed = subprocess.run(
        [mkcomposefs, *versions, "--print-digest-only", "--from-file", dump],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert printed == digest


def test_composefs_info_reads_back_the_simple_tree(tmp_path: Path) -> None:
    """``composefs-info dump`` gives the dumpfile back, except that the root's size is now the
    size of its directory data in the image (one 4096-byte block), not the 0 that was written."""
    mkcomposefs = need_c_tool("mkcomposefs")
    info = need_c_tool("composefs-info")
    dump = tmp_path / "simple.dump"
    dump.write_text(SIMPLE)
    image = tmp_path / "simple.img"
    subprocess.run([mkcomposefs, "--from-file", dump, image], check=True)
    out = subprocess.run([info, "dump", image], check=True, capture_output=True, text=True)
    assert out.stdout == SIMPLE.replace("/ 0 40755", "/ 4096 40755", 1)
