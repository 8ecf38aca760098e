"""Bounded memory of the image build, by design: a regression fails here, not in a pull.

A child process builds the tree of a synthetic layer (one directory of N files of 0 to
100 bytes, a third of them external objects with distinct digests: the shape of the
benchmarks' million-file layer, where the image build peaked at 1.1 GiB) with
``TreeBuilder``, then streams its EROFS image, and reports its resident memory: after
the imports, with the tree built, and the peak (``VmHWM``). The bounds are about
1.5 times what this design measured (2026-12-03, CPython 3.11: 300 bytes per entry for
the tree, 400 at the peak, of which the Digest objects the layer reader would make
anyway are about 45) and well under the 620 / 1,070 of the design before.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

ENTRIES = 100_000
TREE_BYTES_PER_ENTRY = 450
PEAK_BYTES_PER_ENTRY = 600

_CHILD = r"""
import gc, hashlib, json, random, sys
from trio_composefs.formats._chunks import ExternalChunk
from trio_composefs.formats._fsverity import Algorithm, Digest
from trio_composefs.formats._tarentries import EntryType, TarEntry
from trio_composefs.fs import TreeBuilder, transform_for_oci
from trio_composefs.fs.erofs import iter_erofs

def rss_mib(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no " + field)

def entries(n):
    rnd = random.Random(1)
    yield TarEntry("/usr", EntryType.DIRECTORY, 0o755, 0, 0, 1234567890, 0, None, 0, {}, b"")
    for i in range(n):
        size = rnd.randrange(101)
        if size > 64:
            digest = Digest(Algorithm.SHA256, hashlib.sha256(b"%d" % i).digest())
            content = ExternalChunk(digest, size)
        else:
            content = rnd.randbytes(size)
        yield TarEntry(
            f"/usr/file_{i:07d}.bin", EntryType.REGULAR, 0o644, 1000, 1000, 1234567890, 0,
            None, 0, {}, content,
        )

n = int(sys.argv[1])
gc.collect()
base = rss_mib()
builder = TreeBuilder()
builder.add_layer(entries(n))
transform_for_oci(builder.filesystem)
gc.collect()
tree = rss_mib()
size = sum(len(piece) for piece in iter_erofs(builder.filesystem))
peak = rss_mib("VmHWM")  # not ru_maxrss: it keeps the forked parent's size across exec
print(json.dumps({"base": base, "tree": tree, "peak": peak, "image": size}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_tree_and_image_memory_per_entry() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ENTRIES)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    mib = json.loads(done.stdout)
    tree = (mib["tree"] - mib["base"]) * 2**20 / ENTRIES
    peak = (mib["peak"] - mib["base"]) * 2**20 / ENTRIES
    assert mib["image"] > ENTRIES * 32  # every entry has an inode
    assert tree < TREE_BYTES_PER_ENTRY, f"the tree costs {tree:.0f} bytes per entry"
    assert peak < PEAK_BYTES_PER_ENTRY, (
        f"tree and image build peak at {peak:.0f} bytes per entry (tree {tree:.0f})"
    )
