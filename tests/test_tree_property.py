"""Random layer stacks: our tree from layers equals ``umoci unpack`` of the same image.

When the C tools are built, :func:`scan_directory` of each unpacked tree is also
checked against C ``mkcomposefs`` (``composefs-info dump``) on the same directory.

Hypothesis writes layers (Python's :mod:`tarfile`) of random operations on a small name
space so that names collide often: directories (also over directories and files), files
of 0/1/64/65/300 bytes, symlinks, fifos, devices, hard links (within and across
layers, also to symlinks), whiteouts of lower entries and opaque markers, with PAX
nanosecond mtimes, owners and ``user.*`` xattrs. The generator keeps to what upstream
and the OCI rules agree on (no whiteout of an entry of its own layer: issue #8, tested
in ``test_tree_oracle.py``); everything else is decided by umoci, not by us.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from test_scan import C_BIN
from test_tree_oracle import UMOCI, hash_fd, pull_and_build, python_tar
from treecompare import assert_same_tree, tree_from_c_dump
from trio_composefs.images._scan import scan_directory

_C_PATH = f"{C_BIN}:{os.environ.get('PATH', '')}"
MKCOMPOSEFS = shutil.which("mkcomposefs", path=_C_PATH)
COMPOSEFS_INFO = shutil.which("composefs-info", path=_C_PATH)

pytestmark = [
    pytest.mark.skipif(UMOCI is None, reason="umoci is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (devices, owners)"),
]

NAMES = ("a", "b", "c")
OPS = (
    "dir",
    "dir",
    "file",
    "file",
    "file",
    "symlink",
    "link",
    "whiteout",
    "whiteout",
    "whiteout",
    "opaque",
    "fifo",
    "chr",
)
Member = tuple[tarfile.TarInfo, bytes]


class Model:
    """Which paths exist (and their kinds): only to generate valid operations."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}

    def dirs(self) -> list[str]:
        return ["", *sorted(p for p, k in self.kinds.items() if k == "dir")]

    def remove_below(self, path: str) -> None:
        for p in [p for p in self.kinds if p.startswith(path + "/")]:
            del self.kinds[p]

    def put(self, path: str, kind: str) -> None:
        if self.kinds.get(path) == "dir" and kind != "dir":
            self.remove_below(path)
        self.kinds[path] = kind


def meta(
    draw: st.DrawFn, ti: tarfile.TarInfo, modes: tuple[int, ...], *, xattrs: bool = True
) -> tarfile.TarInfo:
    ti.mode = draw(st.sampled_from(modes))
    ti.uid = draw(st.sampled_from((0, 1000, 70000)))
    ti.gid = draw(st.sampled_from((0, 50)))
    sec = draw(st.integers(1_600_000_000, 1_700_000_000))
    nsec = draw(st.sampled_from((0, 1, 500_000_000, 999_999_999)))
    ti.mtime = sec
    pax = {"mtime": f"{sec}.{nsec:09d}"}
    # user.* xattrs exist only on files and directories (Linux); an empty value is
    # left out: PAX reads an empty record as "unset", and readers disagree there
    if xattrs and draw(st.booleans()):
        pax["SCHILY.xattr.user.k"] = draw(st.sampled_from(("v", "w x=y")))
    ti.pax_headers = pax
    return ti


class Stack:
    """Layers of tar members, shown one line per member when hypothesis reports."""

    def __init__(self) -> None:
        self.layers: list[list[Member]] = []

    def tars(self) -> list[bytes]:
        return [python_tar(members) for members in self.layers]

    def __repr__(self) -> str:
        lines = []
        for number, members in enumerate(self.layers, 1):
            for ti, data in members:
                lines.append(
                    f"L{number} {ti.name!r} type={ti.type!r} link={ti.linkname!r} "
                    f"mode={ti.mode:o} {ti.uid}:{ti.gid} size={len(data)} pax={ti.pax_headers}"
                )
        return "\n".join(lines)


@st.composite
def layer_stack(draw: st.DrawFn) -> Stack:
    model = Model()
    stack = Stack()
    for _ in range(draw(st.integers(1, 4))):
        touched: set[str] = set()
        members: list[Member] = []
        for _ in range(draw(st.integers(1, 12))):
            op = draw(st.sampled_from(OPS))
            parent = draw(st.sampled_from(model.dirs()))
            path = f"{parent}/{draw(st.sampled_from(NAMES))}".lstrip("/")
            member = _operation(draw, op, path, parent, model, touched)
            if member is not None:
                event(f"op {op}")
                members.append(member)
        stack.layers.append(members)
    return stack


def _operation(
    draw: st.DrawFn, op: str, path: str, parent: str, model: Model, touched: set[str]
) -> Member | None:
    ti = tarfile.TarInfo(path)
    if op == "dir":
        ti.type = tarfile.DIRTYPE
        model.put(path, "dir")
        touched.add(path)
        return meta(draw, ti, (0o755, 0o700, 0o1777)), b""
    if op == "file":
        data = bytes([draw(st.integers(0, 255))]) * draw(st.sampled_from((0, 1, 64, 65, 300)))
        ti.size = len(data)
        model.put(path, "file")
        touched.add(path)
        return meta(draw, ti, (0o644, 0o600, 0o4755, 0o2750)), data
    if op in ("symlink", "fifo", "chr"):
        ti.type = {"symlink": tarfile.SYMTYPE, "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[op]
        ti.linkname = draw(st.sampled_from(("a", "../b", "/abs/c"))) if op == "symlink" else ""
        ti.devmajor, ti.devminor = (1, draw(st.sampled_from((3, 5)))) if op == "chr" else (0, 0)
        model.put(path, op)
        touched.add(path)
        modes = (0o777,) if op == "symlink" else (0o644, 0o600)
        return meta(draw, ti, modes, xattrs=False), b""
    if op == "link":
        leaves = sorted(p for p, k in model.kinds.items() if k != "dir")
        targets = [t for t in leaves if t != path and not t.startswith(path + "/")]
        if not targets:
            return None
        target = draw(st.sampled_from(targets))
        ti.type = tarfile.LNKTYPE
        ti.linkname = target
        model.put(path, model.kinds[target])
        touched.add(path)
        return meta(draw, ti, (0o644,), xattrs=False), b""
    if op == "whiteout":
        lower = sorted(
            p
            for p in model.kinds
            if p not in touched and not any(t.startswith(p + "/") for t in touched)
        )
        if not lower:
            return None
        victim = draw(st.sampled_from(lower))
        head, _, name = victim.rpartition("/")
        del model.kinds[victim]
        model.remove_below(victim)
        return tarfile.TarInfo(f"{head}/.wh.{name}".lstrip("/")), b""
    # opaque: only for a directory nothing of this layer was put in yet
    if not parent or any(t.startswith(parent + "/") for t in touched):
        return None
    model.remove_below(parent)
    return tarfile.TarInfo(f"{parent}/.wh..wh..opq"), b""


@settings(
    max_examples=int(os.environ.get("TREE_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(layer_stack())
def test_random_layers_match_umoci(stack: Stack) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = trio.run(pull_and_build, Path(tmp), stack.tars())
        assert_same_tree(ours, theirs, ignore_root=True)
        # and the scanner on the same random tree against C mkcomposefs, when built
        if MKCOMPOSEFS is not None and COMPOSEFS_INFO is not None:
            rootfs = Path(tmp) / "bundle" / "rootfs"
            image = Path(tmp) / "image"
            subprocess.run([MKCOMPOSEFS, str(rootfs), str(image)], check=True)
            dump = subprocess.run(
                [COMPOSEFS_INFO, "dump", str(image)], check=True, capture_output=True
            ).stdout
            scanned = scan_directory(rootfs, digest_file=hash_fd, hardlinks=False)
            assert_same_tree(tree_from_c_dump(dump), scanned)
