"""How much a composefs image adds to a pull: layer import vs tree build vs EROFS commit.

For each dataset of ``bench_import.py`` (same tars, same cache under
``/var/tmp/trio-composefs-bench``), a fresh child process imports the tar as one layer
into a new repository, then builds the image's tree from the layer splitstream
(``oci.layers_filesystem``: every entry read back, whiteouts, transform) and stores its
V1 EROFS (``repository.store_image``: written and hashed as it streams). It reports the
wall time of each phase, the image's size and the child's peak RSS (``VmHWM``), as
medians of ``--rounds`` runs.

    python benchmarks/bench_image.py --quick small million
    python benchmarks/bench_image.py upstream small million --rounds 3

``--compare OLD_SRC,NEW_SRC,...`` measures only the image build (tree + EROFS) of several
versions of the code: each argument is a ``src`` directory (e.g. ``git archive`` of an
older commit), put first on ``PYTHONPATH`` of the child. Each dataset is imported once
into a kept repository (``WORK_DIR/image-repos``, reused by later runs); the rounds
interleave the versions (round 1 of every version, round 2, ...), so that a load that
changes over time hits all of them alike. Peak RSS is then the build's alone (import
excluded); the whole pull's peak is the first mode's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_import import WORK_DIR, datasets, ensure_tar


def _peak_mib() -> float:
    """This process's peak RSS (``VmHWM``: ``ru_maxrss`` would keep, across ``exec``,
    the size of the process that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _import(name: str, quick: bool, repo_dir: Path) -> tuple[Any, float, str]:
    import trio

    from trio_composefs.formats import Algorithm
    from trio_composefs.importer import open_importer
    from trio_composefs.repository import Repository

    ds = datasets(quick)[name]
    meta = ensure_tar(ds)
    tar = ds.tar_path()
    repo = Repository.init(repo_dir, algorithm=Algorithm.SHA256, insecure=True)
    try:

        async def do_import() -> Any:
            fd = os.open(tar, os.O_RDONLY | os.O_CLOEXEC)
            try:
                async with open_importer(repo) as importer:
                    return await importer.import_layer(fd, meta["diff_id"])
            finally:
                os.close(fd)

        t0 = time.perf_counter()
        stats = trio.run(do_import)
        elapsed = time.perf_counter() - t0
    finally:
        repo.close()
    return stats.splitstream, elapsed, meta["diff_id"]


def _build(repo_dir: Path, diff_id: str, stream: Any) -> dict[str, Any]:
    from trio_composefs.oci._image_tree import layers_filesystem
    from trio_composefs.repository import Repository, store_image

    repo = Repository.open(repo_dir)
    try:
        t1 = time.perf_counter()
        fs = layers_filesystem(repo, [(diff_id, stream)])
        t2 = time.perf_counter()
        rss_tree = _peak_mib()
        image = store_image(repo, fs, version=1)
        t3 = time.perf_counter()
        size = repo.object_size(image)
    finally:
        repo.close()
    return {
        "tree": t2 - t1,
        "erofs": t3 - t2,
        "image_bytes": size,
        "image": str(image),
        "rss_tree_mib": rss_tree,
        "rss_peak_mib": _peak_mib(),
    }


def one(name: str, quick: bool, repo_dir: Path) -> dict[str, Any]:
    stream, elapsed, diff_id = _import(name, quick, repo_dir)
    rss_import = _peak_mib()
    result = _build(repo_dir, diff_id, stream)
    return {
        "import": elapsed,
        "rss_import_mib": rss_import,
        **result,
        "files": datasets(quick)[name].files,
    }


def kept_repo(name: str, quick: bool) -> tuple[Path, dict[str, Any]]:
    """A repository holding the dataset's layer, imported once (in a child) and kept."""
    base = WORK_DIR / "image-repos" / f"{name}-{'quick' if quick else 'full'}"
    meta_path = base.with_suffix(".json")
    if meta_path.exists():
        return base / "repo", json.loads(meta_path.read_text())
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    argv = [sys.executable, __file__, "--import-only", name, "--repo", str(base / "repo")]
    done = subprocess.run(argv + (["--quick"] if quick else []), check=True, capture_output=True)
    meta = json.loads(done.stdout.splitlines()[-1])
    meta_path.write_text(json.dumps(meta))
    return base / "repo", meta


def compare(names: list[str], sources: list[str], quick: bool, rounds: int) -> None:
    print(f"load average at start: {os.getloadavg()}")
    head = "dataset   version              tree s  erofs s  tree+erofs  image MiB  peak RSS MiB"
    print(head)
    for name in names:
        repo_dir, meta = kept_repo(name, quick)
        runs: dict[str, list[dict[str, Any]]] = {src: [] for src in sources}
        for _ in range(rounds):
            for src in sources:
                env = dict(os.environ, PYTHONPATH=src)
                argv = [
                    sys.executable,
                    __file__,
                    "--build-only",
                    name,
                    "--repo",
                    str(repo_dir),
                    "--stream",
                    meta["stream"],
                    "--diff-id",
                    meta["diff_id"],
                ]
                done = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
                last = done.stdout.splitlines()[-1]
                runs[src].append(json.loads(last))
                print(f"  {name} {src}: {last}", file=sys.stderr, flush=True)
        images = {r["image"] for rs in runs.values() for r in rs}
        if len(images) != 1:
            raise SystemExit(f"{name}: the versions built different images: {images}")
        for src, rs in runs.items():

            def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
                return float(statistics.median(r[key] for r in rs))

            label = src[-20:]
            each = ", ".join(f"{r['tree']:.2f}+{r['erofs']:.2f}" for r in rs)
            print(
                f"{name:9} {label:20} {med('tree'):7.2f} {med('erofs'):8.2f}"
                f" {med('tree') + med('erofs'):11.2f}"
                f" {med('image_bytes') / 2**20:10.1f} {max(r['rss_peak_mib'] for r in rs):13.0f}"
                f"   (runs: {each})"
            )
    print(f"load average at end: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", default=["upstream", "small", "million"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", metavar="SRC,SRC,...", help="src directories to compare")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--import-only", help=argparse.SUPPRESS)
    parser.add_argument("--build-only", help=argparse.SUPPRESS)
    parser.add_argument("--repo", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    parser.add_argument("--diff-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(dir=WORK_DIR) as tmp:
            print(json.dumps(one(args.one, args.quick, Path(tmp) / "repo")))
        return
    if args.import_only:
        stream, elapsed, diff_id = _import(args.import_only, args.quick, Path(args.repo))
        out = {"stream": str(stream), "diff_id": diff_id, "import": elapsed}
        print(json.dumps(out | {"rss_import_mib": _peak_mib()}))
        return
    if args.build_only:
        from trio_composefs.formats import Digest

        stream = Digest.from_hex(args.stream)
        print(json.dumps(_build(Path(args.repo), args.diff_id, stream)))
        return
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    if args.compare:
        compare(
            args.datasets,
            [os.path.abspath(s) for s in args.compare.split(",")],
            args.quick,
            args.rounds,
        )
        return
    print("dataset   files     import s  tree s  erofs s  image/pull  image MiB  peak RSS MiB")
    for name in args.datasets:
        ensure_tar(datasets(args.quick)[name])
        runs = []
        for _ in range(args.rounds):
            argv = [sys.executable, __file__, "--one", name] + (["--quick"] if args.quick else [])
            done = subprocess.run(argv, check=True, capture_output=True, text=True)
            runs.append(json.loads(done.stdout.splitlines()[-1]))

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return float(statistics.median(r[key] for r in runs))

        build = med("tree") + med("erofs")
        print(
            f"{name:9} {runs[0]['files']:>9,} {med('import'):9.2f} {med('tree'):7.2f}"
            f" {med('erofs'):8.2f} {build / (med('import') + build):10.0%}"
            f" {med('image_bytes') / 2**20:10.1f} {max(r['rss_peak_mib'] for r in runs):13.0f}"
        )
    shutil.rmtree(WORK_DIR / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
