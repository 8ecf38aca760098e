"""The progress display, seen as a person sees it: in a real terminal (tmux), from a slow
source; and as a plain log when standard error is not a terminal."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trio_composefs.testing import sample_layers, write_sample_layout

HERE = Path(__file__).parent
CLI = [sys.executable, "-m", "trio_composefs"]
RATE = 1_500_000  # bytes per second: the 4.4 MiB sample takes about 3 s


def prepare(tmp_path: Path) -> tuple[Path, str, list[str]]:
    """A repository holding the sample's first layer (so the pull skips it), and the layout."""
    repo = tmp_path / "r"
    subprocess.run([*CLI, "--repo", str(repo), "init", "--insecure"], check=True, timeout=60)
    layers = sample_layers()
    subprocess.run(
        [*CLI, "--repo", str(repo), "oci", "import-layer", "--no-progress", layers[0].diff_id],
        input=layers[0].tar,
        check=True,
        capture_output=True,
        timeout=120,
    )
    reference = write_sample_layout(str(tmp_path / "layout"))
    return repo, reference, [layer.diff_id.removeprefix("sha256:")[:12] for layer in layers]


def throttled(repo: Path, *args: str) -> list[str]:
    return [sys.executable, str(HERE / "throttled_cli.py"), str(RATE), "--repo", str(repo), *args]


def test_live_lines_in_a_real_terminal(tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux (Debian package tmux) is not installed")
    repo, reference, short = prepare(tmp_path)
    session = f"cli2-progress-{tmp_path.name}"[:60]
    command = " ".join(throttled(repo, "oci", "pull", reference, "demo"))
    done_flag = tmp_path / "finished"
    subprocess.run(
        [
            tmux,
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "150",
            "-y",
            "30",
            f"{command}; touch {done_flag}; sleep 60",
        ],
        check=True,
    )
    screens: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not done_flag.exists() and time.monotonic() < deadline:
            screens.append(
                subprocess.run(
                    [tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True
                ).stdout
            )
            time.sleep(0.2)
        final = subprocess.run(
            [tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True
        ).stdout
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)
    assert done_flag.exists(), final
    live = [s for s in screens if "total (" in s]
    # Time-driven: several different live screens while ~3 s of bytes trickle in.
    assert len(set(live)) >= 4, screens
    # A total line and a line per layer in flight: bytes against the blob size, rate, ETA.
    total = re.compile(
        r"total \(\d/3 layers\).* [\d.]+ [KM]iB/4\.41 MiB +[\d.]+ [KM]iB/s +\d:\d\d:\d\d"
    )
    layer = re.compile(r"^[0-9a-f]{12} .* [\d.]+ [KM]iB/[\d.]+ [KM]iB")
    assert any(total.search(s) for s in live), live
    assert any(layer.search(line) for s in live for line in s.splitlines()), live
    # Each layer ends once: the first one was present, the others were imported.
    assert final.count(f"{short[0]}  skipped: already present") == 1, final
    for s in short[1:]:
        assert final.count(f"{s}  done:") == 1, final
    assert "[0/" not in final
    assert "tagged   demo" in final
    assert "objects  " in final
    assert "total (" not in final  # the live lines are gone once the pull ends


def test_plain_log_when_not_a_terminal(tmp_path: Path) -> None:
    repo, reference, short = prepare(tmp_path)
    done = subprocess.run(
        throttled(repo, "oci", "pull", reference, "demo"), capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr.decode()
    assert "\x1b" not in err  # no escape sequences in a log
    lines = err.splitlines()
    assert [line for line in lines if short[0] in line] == [f"{short[0]}  skipped: already present"]
    for s in short[1:]:
        mine = [line for line in lines if line.startswith(s)]
        assert len(mine) == 1, err
        assert "done:" in mine[0]
    assert lines[-1].startswith("3 layers (2 imported, 1 already present)")
    # fsck uses the same renderer: one line per finished phase.
    check = subprocess.run([*CLI, "--repo", str(repo), "fsck"], capture_output=True, timeout=120)
    assert check.returncode == 0, check.stdout
    phases = [line.split(":")[1].strip() for line in check.stderr.decode().splitlines()]
    assert phases == ["objects", "images", "streams"]
    quiet = subprocess.run(
        [*CLI, "--repo", str(repo), "fsck", "--no-progress"], capture_output=True, timeout=120
    )
    assert quiet.stderr == b""


async def test_image_progress_events_carry_totals_and_skips(tmp_path: Path) -> None:
    """What a trio application needs to draw its own display, checked against the manifest."""
    import json

    from trio_composefs import Algorithm, open_importer, open_source, parse_source, pull_image
    from trio_composefs.oci import ImageProgress
    from trio_composefs.repository import Repository

    reference = write_sample_layout(str(tmp_path / "layout"))
    layout = Path(reference.removeprefix("oci:").rsplit(":", 1)[0])
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    sizes = [layer["size"] for layer in manifest["layers"]]
    layers = sample_layers()
    events: list[ImageProgress] = []
    with Repository.init(tmp_path / "r", algorithm=Algorithm.SHA256, insecure=True) as repo:
        async with open_importer(repo) as importer:
            await importer.import_layer(layers[0].tar, layers[0].diff_id)
            async with open_source(parse_source(reference)) as source:
                await pull_image(importer, source, tag="t", progress=events.append)
    assert {e.bytes_total for e in events} == {sum(sizes)}
    assert events[-1].bytes_done == sum(sizes)
    skipped = [e for e in events if e.skipped]
    assert len(skipped) == 1
    assert skipped[0].layer is not None
    assert skipped[0].layer.diff_id == layers[0].diff_id
    assert skipped[0].layer_size == sizes[0]
    done = [e for e in events if e.layer is not None and e.layer.done and not e.skipped]
    assert {e.layer.diff_id for e in done if e.layer} == {lay.diff_id for lay in layers[1:]}
    for e in done:
        assert e.layer_read == e.layer_size
    assert all(a.bytes_done <= b.bytes_done for a, b in itertools.pairwise(events))
