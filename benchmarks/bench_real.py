"""Pull a real Debian image: ours against podman, skopeo, umoci, ostree and a C pipeline.

The image: Debian bookworm ``minbase`` made by ``debootstrap`` and turned into an OCI
layout of four gzip layers (``/usr``, ``/var``, ``/etc``, the rest; GNU tar and gzip), cached
under ``/var/cache/trio-composefs/bench`` (made once, not timed). Every run is a fresh
process writing to a fresh filesystem (a loop-mounted ext4 image made with ``mkfs.ext4``
without lazy init); the layout's blobs are read once before each run so that every run
reads them from the page cache. Runs are interleaved (round 1 of every mode, round 2, ...);
the table gives medians and the ratios are medians of per-round ratios.

Modes:

========== ==================================================================================
ours       ``pull_image`` with the defaults (what ``trio-cfsctl oci pull`` does): writers one per
           CPU but one, hash processes one per CPU, every layer at once
ours-seq   ``jobs=1, hash_processes=0, layer_jobs=1``: one layer at a time, digests in the
           writer thread
umoci      ``umoci unpack`` (a runtime bundle; no content store)
skopeo     ``skopeo copy oci:… containers-storage:[overlay@…]`` (graph root on the scratch fs)
podman     ``podman --root … pull oci:…`` (overlay driver, graph root on the scratch fs)
ostree     ``ostree commit --tree=tar=LAYER …`` of the four gzip layers into a ``bare-user``
           repository (libarchive decompresses; whiteouts are not applied)
shell      per layer ``gzip -dc | tee >(openssl dgst -sha256) | tar -x``, then ``fsverity digest``
           ``--hash-alg=sha512`` (our default, as cfsctl) over every file in two processes at once
========== ==================================================================================

Columns: wall (ours: until ``pull_image`` returns, syncfs included; peers: their command, then a
``syncfs`` that is counted in ``wall`` too, as ours syncs), CPU (user + sys of the process and
every descendant, from ``wait4``), per-object µs (wall / regular files of the image), busy CPUs
(mean over 100 ms samples of ``/proc/stat``, all processes of the machine, so it includes other
users' load; CPU / wall is the run's own), both-busy (share of samples with both CPUs ≥ 90 %
busy), and for ours the phases (layers imported, image built, total of the ``syncfs`` calls)
and the CPU of each thread (sampled from ``/proc/PID/task/*/stat``, hash workers summed).

Usage (root)::

    .venv/bin/python benchmarks/bench_real.py [--rounds 3] [--modes ours,ours-seq,...]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CACHE = Path("/var/cache/trio-composefs/bench")
#: name: (debootstrap --include packages, rootfs, layout, split into 4 layers)
IMAGES = {
    "debian": ("", CACHE / "rootfs", CACHE / "oci-bookworm-4layers", True),
    "big": (
        "build-essential,python3,python3-dev,golang-go,git",
        CACHE / "rootfs-big",
        CACHE / "oci-bookworm-big",
        False,
    ),
}
ROOTFS = IMAGES["debian"][1]
LAYOUT = IMAGES["debian"][2]
TAG = "bookworm"
WORK = Path("/var/tmp/trio-composefs-bench-real")
MODES = ("ours", "ours-seq", "umoci", "skopeo", "podman", "ostree", "shell")
#: ``--baseline SRC``: also run ``base`` and ``base-seq``, ours with the package in ``SRC``
#: (e.g. ``git archive <commit> src | tar -x -C /tmp/base``, then ``/tmp/base/src``).
BASELINE: str | None = None
IMAGE = "debian"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the image


def _run(*cmd: str | Path, **kw: Any) -> None:
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def prepare(image: str) -> None:
    """debootstrap the rootfs and build the OCI layout, unless cached."""
    include, rootfs, layout, split = IMAGES[image]
    CACHE.mkdir(parents=True, exist_ok=True)
    if not rootfs.exists():
        partial = rootfs.with_name(rootfs.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        extra = [f"--include={include}"] if include else []
        _run(
            "debootstrap", "--variant=minbase", *extra, "bookworm", partial,
            "http://deb.debian.org/debian",
        )  # fmt: skip
        partial.rename(rootfs)
    if layout.exists():
        return
    partial = layout.with_name(layout.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # ``umoci insert`` of /etc wrote a truncated tar here (umoci 0.4.7), so the layers are
    # made with GNU tar and gzip, as image builders do, and the layout is written directly.
    blobs = partial / "blobs/sha256"
    blobs.mkdir(parents=True)
    everything = sorted(e.name for e in rootfs.iterdir())
    groups = [everything]
    if split:
        groups = [
            ["usr"],
            ["var"],
            ["etc"],
            [n for n in everything if n not in ("usr", "var", "etc")],
        ]
    layers, diff_ids = [], []
    for group in groups:
        tar = subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "--sort=name", "--xattrs",
             "--exclude=dev/?*", "-cf", "-", *group],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        gz = subprocess.run(["gzip", "-n", "-6"], input=tar, check=True, capture_output=True)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        layers.append(_blob(blobs, gz.stdout, "application/vnd.oci.image.layer.v1.tar+gzip"))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _blob(
            blobs, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
        ),
        "layers": layers,
    }
    desc = _blob(blobs, json.dumps(manifest).encode(), str(manifest["mediaType"]))
    desc["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    (partial / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (partial / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    partial.rename(layout)


def _blob(blobs: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def layer_blobs() -> list[Path]:
    index = json.loads((LAYOUT / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((LAYOUT / "blobs/sha256" / digest).read_text())
    return [LAYOUT / "blobs/sha256" / layer["digest"].split(":")[1] for layer in manifest["layers"]]


def count_files() -> int:
    return sum(
        1
        for _root, _dirs, files in os.walk(ROOTFS)
        for f in files
        if not os.path.islink(os.path.join(_root, f))
    )


# --------------------------------------------------------------------------- sampling


def _busy_idle() -> tuple[list[int], list[int]]:
    """Per CPU: (busy ticks, total ticks)."""
    busy, total = [], []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:9]]
                total.append(sum(v))
                busy.append(sum(v) - v[3] - v[4])
    return busy, total


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                    out += kids
                    todo += kids
    return out


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, keyed ``tid:name``."""
    out = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
                name = head.partition("(")[2]
                fields = rest.split()
                out[f"{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


class Sampler:
    """Samples /proc/stat and, for ``pid``, per-thread CPU, every 100 ms in a thread."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.busy_cpus: list[float] = []
        self.both_busy: list[bool] = []
        self.threads: dict[str, float] = {}
        self.workers: dict[int, float] = {}
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _account(self, key: str, tid: str, name: str, cpu: float) -> None:
        """Credit the CPU a thread used since the last sample to its current name.

        (trio's worker threads take the name of the job they run, so a name is a job.)"""
        delta = cpu - self._last.get(key + tid, 0.0)
        self._last[key + tid] = cpu
        self.threads[name] = self.threads.get(name, 0.0) + delta

    def _run(self) -> None:
        b0, t0 = _busy_idle()
        while not self._stop.wait(0.1):
            b1, t1 = _busy_idle()
            shares = [
                (b - bb) / max(1, t - tt) for b, bb, t, tt in zip(b1, b0, t1, t0, strict=True)
            ]
            self.busy_cpus.append(sum(shares))
            self.both_busy.append(all(s >= 0.9 for s in shares))
            b0, t0 = b1, t1
            if self.pid is not None:
                for key, cpu in _thread_cpu(self.pid).items():
                    tid, _, name = key.partition(":")
                    self._account("", tid, name, cpu)
                for child in _descendants(self.pid):
                    cpu = sum(_thread_cpu(child).values())
                    if cpu:
                        self.workers[child] = cpu


# --------------------------------------------------------------------------- one run


def _syncfs(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.perf_counter()
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def child_ours(mode: str, repo_dir: Path) -> None:
    """In a fresh process: pull the image, print one JSON line of phases and stats."""
    import trio

    from trio_composefs.importer import open_importer
    from trio_composefs.oci import _build, open_source, parse_source, pull_image
    from trio_composefs.repository import Repository

    phases = {"sync": 0.0, "image": 0.0, "image_start": 0.0}
    real_sync = Repository.sync

    def timed_sync(self: Repository) -> None:
        t = time.perf_counter()
        real_sync(self)
        phases["sync"] += time.perf_counter() - t

    real_store = _build.store_oci_images

    def timed_store(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        phases["image_start"] = t
        try:
            return real_store(*a, **kw)
        finally:
            phases["image"] += time.perf_counter() - t

    Repository.sync = timed_sync  # type: ignore[method-assign]
    _build.store_oci_images = timed_store

    repo = Repository.init(repo_dir, insecure=True)
    seq = mode.endswith("-seq")

    async def main() -> Any:
        async with (
            open_importer(
                repo, jobs=1 if seq else None, hash_processes=0 if seq else None
            ) as importer,
            open_source(parse_source(f"oci:{LAYOUT}:{TAG}")) as source,
        ):
            return await pull_image(importer, source, tag="bench", layer_jobs=1 if seq else None)

    t0 = time.perf_counter()
    stats = trio.run(main)
    wall = time.perf_counter() - t0
    layers = (phases["image_start"] or t0 + wall) - t0
    objects = sum(layer.objects for layer in stats.layers)
    print(
        json.dumps(
            {
                "wall": wall,
                "layers_phase": layers,
                "image_phase": phases["image"],
                "sync_phase": phases["sync"],
                "objects": objects,
            }
        )
    )


def _peer_cmds(mode: str, mnt: Path) -> list[list[str]]:
    ref = f"oci:{LAYOUT}:{TAG}"
    if mode == "umoci":
        return [["umoci", "unpack", "--image", f"{LAYOUT}:{TAG}", str(mnt / "bundle")]]
    if mode == "skopeo":
        store = f"containers-storage:[overlay@{mnt}/root+{mnt}/run]localhost/bench:latest"
        return [["skopeo", "copy", "-q", ref, store]]
    if mode == "podman":
        return [
            ["podman", "--root", f"{mnt}/root", "--runroot", f"{mnt}/run",
             "--storage-driver", "overlay", "pull", "-q", ref]
        ]  # fmt: skip
    if mode == "ostree":
        repo = mnt / "ostree"
        trees = [f"--tree=tar={blob}" for blob in layer_blobs()]
        return [
            ["ostree", "init", f"--repo={repo}", "--mode=bare-user"],
            ["ostree", "commit", f"--repo={repo}", "--branch=bench", "--tar-autocreate-parents",
             *trees],
        ]  # fmt: skip
    if mode == "shell":
        dest = mnt / "rootfs"
        script = [f"mkdir -p {dest}"] + [
            f"gzip -dc {blob} | tee >(openssl dgst -sha256 >/dev/null) | tar -x -C {dest}"
            for blob in layer_blobs()
        ]
        # fsverity digest over every regular file, in two processes at once, with SHA-512
        # as our repositories (and cfsctl's) use by default
        script.append(
            f"find {dest} -type f -print0 | xargs -0 -P 2 -n 500"
            " fsverity digest --hash-alg=sha512 > /dev/null"
        )
        return [["bash", "-c", " && ".join(script)]]
    raise ValueError(mode)


def _wait_measured(proc: subprocess.Popen[bytes]) -> float:
    """Wait for ``proc``; its CPU seconds with every descendant it waited for."""
    _pid, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return ru.ru_utime + ru.ru_stime


def run_mode(mode: str, mnt: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"cpu": 0.0}
    if mode.startswith(("ours", "base")):
        cmd = [sys.executable, __file__, "--child", mode, "--repo", str(mnt / "repo")]
        cmd += ["--image", IMAGE]
        env = dict(os.environ)
        if mode.startswith("base"):
            env["PYTHONPATH"] = str(BASELINE)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        with Sampler(proc.pid) as sampler:
            out = proc.stdout.read() if proc.stdout else b""
            result["cpu"] = _wait_measured(proc)
        result["wall_outer"] = time.perf_counter() - t0
        result.update(json.loads(out.decode().strip().splitlines()[-1]))
        result["threads"] = sampler.threads
        result["workers_cpu"] = sum(sampler.workers.values())
    else:
        cmds = _peer_cmds(mode, mnt)
        with Sampler(None) as sampler:
            t0 = time.perf_counter()
            for cmd in cmds:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
                result["cpu"] += _wait_measured(proc)
            result["sync_phase"] = _syncfs(mnt)
            result["wall"] = time.perf_counter() - t0
    result["busy_cpus"] = statistics.fmean(sampler.busy_cpus) if sampler.busy_cpus else 0.0
    result["both_busy"] = (
        sum(sampler.both_busy) / len(sampler.both_busy) if sampler.both_busy else 0.0
    )
    return result


@contextlib.contextmanager
def fresh_ext4(size: int = 8 << 30) -> Iterator[Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    mnt, image = WORK / "mnt", WORK / "scratch.img"
    mnt.mkdir(exist_ok=True)
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", image)
    _run("mount", "-o", "loop", image, mnt)
    try:
        yield mnt
    finally:
        # podman/skopeo leave overlay mounts behind on some setups: unmount them first
        with open("/proc/mounts") as f:
            inner = [line.split()[1] for line in f if line.split()[1].startswith(f"{mnt}/")]
        for path in sorted(inner, reverse=True):
            subprocess.run(["umount", "-l", path], check=False)
        _run("umount", mnt)
        image.unlink(missing_ok=True)
        os.sync()


def _warm() -> None:
    for blob in LAYOUT.rglob("*"):
        if blob.is_file():
            with open(blob, "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass


def _available(mode: str) -> str | None:
    """Why ``mode`` cannot run here, or None."""
    tool = {"umoci": "umoci", "skopeo": "skopeo", "podman": "podman", "ostree": "ostree"}.get(mode)
    if tool and shutil.which(tool) is None:
        return f"{tool} is not installed"
    if mode == "shell" and shutil.which("fsverity") is None:
        return "fsverity is not installed"
    return None


# --------------------------------------------------------------------------- report


def _med(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def report(results: dict[str, list[dict[str, Any]]], files: int) -> str:
    lines = [
        f"image: {LAYOUT} ({len(layer_blobs())} gzip layers, "
        f"{sum(b.stat().st_size for b in layer_blobs()) / 2**20:.0f} MiB), {files} regular files",
        "",
        "| mode | runs | wall s | CPU s | CPU / wall | µs/file | busy CPUs (machine) | both busy"
        " | layers s | image s | syncfs s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for mode, rows in results.items():
        if not rows:
            continue
        wall = _med(rows, "wall")
        ours = mode.startswith(("ours", "base"))
        lines.append(
            f"| {mode} | {len(rows)} | {wall:.2f} | {_med(rows, 'cpu'):.2f} |"
            f" {statistics.median(r['cpu'] / r['wall'] for r in rows):.2f} |"
            f" {wall / files * 1e6:.0f} | {_med(rows, 'busy_cpus'):.2f} |"
            f" {100 * _med(rows, 'both_busy'):.0f} % |"
            f" {_med(rows, 'layers_phase') if ours else float('nan'):.2f} |"
            f" {_med(rows, 'image_phase') if ours else float('nan'):.2f} |"
            f" {_med(rows, 'sync_phase'):.2f} |"
        )
    lines += ["", "| ratio (median of per-round ratios) | value |", "|---|--:|"]
    base = results.get("ours") or []
    for mode, rows in results.items():
        if mode == "ours" or not rows or not base:
            continue
        n = min(len(rows), len(base))
        wall = statistics.median(rows[i]["wall"] / base[i]["wall"] for i in range(n))
        cpu = statistics.median(rows[i]["cpu"] / base[i]["cpu"] for i in range(n))
        lines.append(f"| {mode} wall / ours wall | {wall:.2f}x |")
        lines.append(f"| {mode} CPU / ours CPU | {cpu:.2f}x |")
    for mode in ("ours", "ours-seq", "base", "base-seq"):
        rows = results.get(mode) or []
        if not rows:
            continue
        last = rows[-1]
        groups: dict[str, float] = {}
        for name, cpu in last["threads"].items():
            name = "trio idle worker" if name.startswith("Trio thread") else name
            groups[name] = groups.get(name, 0.0) + cpu
        shares = ", ".join(f"{k} {v:.2f}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"\nper-thread CPU s, {mode}, last round: {shares}; hash workers"
            f" {last['workers_cpu']:.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--image", choices=sorted(IMAGES), default="debian")
    parser.add_argument("--baseline", help="also run base, base-seq: ours from this src dir")
    args = parser.parse_args(argv)
    global ROOTFS, LAYOUT
    global IMAGE
    IMAGE = args.image
    ROOTFS, LAYOUT = IMAGES[args.image][1], IMAGES[args.image][2]
    if args.child:
        child_ours(args.child, args.repo)
        return
    if os.geteuid() != 0:
        sys.exit("needs root (debootstrap, mkfs, mount)")
    prepare(args.image)
    if args.prepare_only:
        return
    files = count_files()
    modes = [m for m in args.modes.split(",") if m]
    if args.baseline:
        global BASELINE
        BASELINE = args.baseline
        modes[1:1] = ["base", "base-seq"]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for mode in modes:
        why = _available(mode)
        if why is not None:
            print(f"skipping {mode}: {why}", file=sys.stderr)
            results.pop(mode)
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().strip()}", file=sys.stderr)
    for rnd in range(args.rounds):
        for mode in results:
            with fresh_ext4() as mnt:
                _warm()
                try:
                    r = run_mode(mode, mnt)
                except (subprocess.CalledProcessError, OSError) as e:
                    print(f"round {rnd + 1} {mode}: failed: {e}", file=sys.stderr)
                    continue
            results[mode].append(r)
            print(
                f"round {rnd + 1} {mode}: wall {r['wall']:.2f} s, CPU {r['cpu']:.2f} s,"
                f" busy CPUs {r['busy_cpus']:.2f}",
                file=sys.stderr,
                flush=True,
            )
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().strip()}", file=sys.stderr)
    print(report(results, files))
    (WORK / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
