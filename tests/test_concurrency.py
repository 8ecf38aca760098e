"""Concurrent and interrupted imports leave a repository that fsck passes.

Imports run in child processes (real ``fork``/``exec``, real ``SIGKILL``) with
the real pipeline; the parent checks the repository with :func:`fsck`.
"""

from __future__ import annotations

import errno
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from test_gc import objects
from trio_composefs.formats import Algorithm
from trio_composefs.importer import open_importer
from trio_composefs.maintenance import FsckReport, fsck, gc
from trio_composefs.repository import Repository
from trio_composefs.testing import FaultPoint, FaultyRepository, sample_layers

ALG = Algorithm.SHA256

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import trio
    from trio_composefs.importer._importer import open_importer
    from trio_composefs.repository._repository import Repository
    from trio_composefs.testing._sample import sample_layers
    from trio_composefs.testing._faults import FaultyRepository

    path, go, delay, named, gate_point = sys.argv[1:6]
    repo = Repository.open(path)
    repo.force_named_tmpfile = named == "1"
    target = FaultyRepository(repo, write_delay=float(delay))
    gate = None
    if gate_point != "-":
        gate = target.pause(gate_point, nth=2 if gate_point == "finish" else 1)
    layers = sample_layers()
    print("ready", flush=True)
    while go != "-" and not os.path.exists(go):
        time.sleep(0.001)

    async def tell_at_gate():
        await gate.wait_reached()
        print("at-gate", flush=True)

    async def main():
        async with trio.open_nursery() as nursery:
            if gate is not None:
                nursery.start_soon(tell_at_gate)
            async with open_importer(target, jobs=4) as importer:
                for i, layer in enumerate(layers):
                    await importer.import_layer(layer.tar, layer.diff_id, name=f"sample/{i}")

    trio.run(main)
    print("done", flush=True)
    """
)


def start_child(
    tmp_path: Path,
    repo: Path,
    *,
    go: str = "-",
    delay: float = 0.0,
    named: bool = False,
    gate: str = "-",
) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(repo), go, str(delay), "1" if named else "0", gate],
        stdout=subprocess.PIPE,
        text=True,
    )


def expect_line(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdout is not None
    assert child.stdout.readline().strip() == line


async def check(path: Path) -> FsckReport:
    with Repository.open(path) as repo:
        report = await fsck(repo)
    assert report.ok, report.summary()
    return report


async def import_sample(path: Path) -> None:
    with Repository.open(path) as repo:
        async with open_importer(repo) as importer:
            for i, layer in enumerate(sample_layers()):
                await importer.import_layer(layer.tar, layer.diff_id, name=f"sample/{i}")


def new_repo(path: Path) -> Path:
    Repository.init(path, algorithm=ALG, insecure=True).close()
    return path


async def test_two_processes_import_the_same_layers(tmp_path: Path) -> None:
    path = new_repo(tmp_path / "repo")
    go = tmp_path / "go"
    children = [start_child(tmp_path, path, go=str(go)) for _ in range(2)]
    try:
        for child in children:
            expect_line(child, "ready")
        go.touch()  # both start at the same moment
        for child in children:
            out, _ = await trio.to_thread.run_sync(child.communicate)
            assert child.returncode == 0
            assert out.strip() == "done"
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    report = await check(path)
    assert report.contents_checked == 3  # every layer reassembles to its diff_id
    oracle = new_repo(tmp_path / "oracle")
    await import_sample(oracle)
    assert objects(path) == objects(oracle)


async def sample_objects(tmp_path: Path) -> set[str]:
    """The oracle: the objects of a clean import of the sample layers into a new repository."""
    oracle = new_repo(tmp_path / "oracle")
    await import_sample(oracle)
    return objects(oracle)


async def kill_then_recover(
    path: Path, child: subprocess.Popen[str], oracle: set[str], *, complete: bool = True
) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()
    if child.stdout is not None:
        child.stdout.close()
    if not complete:  # killed mid-import: some objects written, not every stream named
        assert objects(path)
        assert len(list((path / "streams").glob("oci-layer-*"))) < 3
    report = await check(path)  # orphans and leftover temporary files are allowed
    assert all(".tmp-" in p or ".symlink-" in p for p in report.stray_tmpfiles)
    await import_sample(path)  # the same import now succeeds
    # gc then leaves exactly what a clean import writes, and fsck passes.
    with Repository.open(path) as repo:
        result = gc(repo)
    assert objects(path) == oracle, result
    report = await check(path)
    assert report.contents_checked == 3
    assert report.stray_tmpfiles == ()


@pytest.mark.parametrize(("gate", "named"), [("finish", True), ("sync", False), ("publish", True)])
async def test_sigkill_at_chosen_points(tmp_path: Path, gate: str, named: bool) -> None:
    """Killed at an object link, before the syncfs, and between syncfs and publication."""
    path = new_repo(tmp_path / "repo")
    child = start_child(tmp_path, path, named=named, gate=gate)
    expect_line(child, "ready")
    expect_line(child, "at-gate")
    await kill_then_recover(path, child, await sample_objects(tmp_path), complete=False)


async def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    # Calibrate: how long a (slowed) import takes from "ready" to "done".
    calib = new_repo(tmp_path / "calib")
    child = start_child(tmp_path, calib, delay=0.01)
    expect_line(child, "ready")
    start = time.monotonic()
    expect_line(child, "done")
    duration = time.monotonic() - start
    child.wait()
    assert child.stdout is not None
    child.stdout.close()
    oracle = await sample_objects(tmp_path)
    for run in range(3):
        path = new_repo(tmp_path / f"repo{run}")
        child = start_child(tmp_path, path, delay=0.01, named=run % 2 == 1)
        expect_line(child, "ready")
        moment = rng.uniform(0, duration)
        await trio.sleep(moment)
        print(f"seed {seed}: run {run} killed {moment:.3f} s of {duration:.3f} s in")
        await kill_then_recover(path, child, oracle)


@pytest.mark.parametrize(
    ("point", "nth"), [("write", 2), ("write", 6), ("finish", 4), ("sync", 1), ("publish", 1)]
)
async def test_full_disk_during_import(tmp_path: Path, point: FaultPoint, nth: int) -> None:
    path = new_repo(tmp_path / "repo")
    with Repository.open(path) as repo:
        faulty = FaultyRepository(repo).fail(point, nth=nth, errno=errno.ENOSPC)
        with pytest.RaisesGroup(
            pytest.RaisesExc(OSError, check=lambda e: e.errno == errno.ENOSPC),
            flatten_subgroups=True,
            allow_unwrapped=True,
        ):
            async with open_importer(faulty) as importer:
                for i, layer in enumerate(sample_layers()):
                    await importer.import_layer(layer.tar, layer.diff_id, name=f"sample/{i}")
    await check(path)
    await import_sample(path)
    assert (await check(path)).contents_checked == 3
