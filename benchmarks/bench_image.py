"""How much a composefs image adds to a pull: layer import vs tree build vs EROFS commit.

For each dataset of ``bench_import.py`` (same tars, same cache under
``/var/tmp/trio-composefs-bench``), a fresh child process imports the tar as one layer
into a new repository, then builds the image's tree from the layer splitstream
(``oci.layers_filesystem``: every entry read back, whiteouts, transform) and stores its
V1 EROFS (``repository.store_image``: written and hashed as it streams). It reports the
wall time of each phase, the image's size and the child's peak RSS (``ru_maxrss``), as
medians of ``--rounds`` runs.

    python benchmarks/bench_image.py --quick small million
    python benchmarks/bench_image.py upstream small million --rounds 3
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

import trio

sys.path.insert(0, str(Path(__file__).parent))
from bench_import import WORK_DIR, datasets, ensure_tar

from trio_composefs.formats import Algorithm
from trio_composefs.importer import open_importer
from trio_composefs.oci._image_tree import layers_filesystem
from trio_composefs.repository import Repository, store_image


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(name: str, quick: bool, repo_dir: Path) -> dict[str, Any]:
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
        t1 = time.perf_counter()
        rss_import = _peak_mib()
        fs = layers_filesystem(repo, [(meta["diff_id"], stats.splitstream)])
        t2 = time.perf_counter()
        rss_tree = _peak_mib()
        image = store_image(repo, fs, version=1)
        t3 = time.perf_counter()
        size = repo.object_size(image)
    finally:
        repo.close()
    return {
        "import": t1 - t0,
        "tree": t2 - t1,
        "erofs": t3 - t2,
        "image_bytes": size,
        "rss_import_mib": rss_import,
        "rss_tree_mib": rss_tree,
        "rss_peak_mib": _peak_mib(),
        "files": ds.files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", default=["upstream", "small", "million"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(dir=WORK_DIR) as tmp:
            print(json.dumps(one(args.one, args.quick, Path(tmp) / "repo")))
        return
    WORK_DIR.mkdir(parents=True, exist_ok=True)
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
