"""trio-cfsctl image commands, run as a user would (subprocesses), against the C tools.

Oracles: C composefs 1.0.8 ``mkcomposefs`` and ``composefs-info`` (``tests/oracles.py``)
on the same input — images byte for byte, printed digests, and the text of
``composefs-info dump/ls/objects`` — and the ``fsverity digest`` tool for stored objects.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fstree import dumpfile, filesystems, have_c_tools
from fstree import mkcomposefs as c_mkcomposefs
from ocifixtures import Layout, make_tar
from oracles import need_c_tool
from test_erofs_reader import c_dump_as_rs
from trio_composefs.cli import run as cli_run
from trio_composefs.fs import FileSystem

CLI = [sys.executable, "-m", "trio_composefs"]
DATA = Path(__file__).parent / "data" / "composefs-c"
C_IMAGES = sorted(DATA.glob("*.cfs"))
T0 = 1_700_000_000_123_456_789

needs_c = pytest.mark.skipif(not have_c_tools(), reason="C composefs 1.0.8 tools not built")


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, input=stdin, timeout=300)


def ok(*args: str, stdin: bytes | None = None) -> bytes:
    done = run(*args, stdin=stdin)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def c_run(tool: str, *args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(
        [need_c_tool(tool), *args], capture_output=True, input=stdin, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def assert_one_line_error(done: subprocess.CompletedProcess[bytes], *needles: str) -> None:
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 1, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err


def in_process(*args: str) -> bytes:
    """The CLI run in this process (for hypothesis loops); its standard output."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, write_through=True)
    assert cli_run(list(args), out) == 0
    out.flush()
    return raw.getvalue()


def make_source_tree(root: Path, *, usr: bool = True, hardlinks: bool = True) -> Path:
    """A directory with every kind of entry composefs cares about (root needed for devices)."""
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "small").write_bytes(b"hello\n")
    (root / "etc" / "empty").write_bytes(b"")
    (root / "etc" / "x64").write_bytes(b"6" * 64)
    (root / "etc" / "x65").write_bytes(b"5" * 65)
    (root / "etc" / "big").write_bytes(bytes(range(256)) * 40)
    (root / "dup").write_bytes(bytes(range(256)) * 40)  # same content: one object
    if usr:
        (root / "usr" / "bin").mkdir(parents=True)
        (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\n" + b"x" * 5000)
        (root / "usr" / "bin" / "tool").chmod(0o4755)
        (root / "run" / "junk").mkdir(parents=True)
        (root / "run" / "junk" / "f").write_bytes(b"gone")
    if hardlinks:
        os.link(root / "etc" / "big", root / "etc" / "big-link")
    os.symlink("../etc/small", root / "etc" / "sym")
    os.symlink("x" * 300, root / "longsym")
    os.mkfifo(root / "fifo")
    (root / "name with space=eq\\").write_bytes(b"odd")
    os.setxattr(root / "etc" / "small", "user.note", b"a=b c")
    os.setxattr(root / "etc" / "big", "user.big", b"\x00\xff" * 40)
    os.setxattr(root / "etc", "trusted.overlay.opaque", b"y")
    if os.geteuid() == 0:
        os.mknod(root / "null", 0o20666, os.makedev(1, 3))
        os.mknod(root / "whiteout", 0o20000, os.makedev(0, 0))
        os.mknod(root / "blk", 0o60600, os.makedev(8, 1))
        os.chown(root / "etc" / "small", 1234, 70000, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(T0, T0), follow_symlinks=False)
    os.utime(root, ns=(T0 + 5, T0 + 5))
    return root


# -- mkcomposefs --------------------------------------------------------------------------


MK_OPTIONS = [
    [],
    ["--min-version=1", "--max-version=1"],
    ["--min-version=1"],
    ["--max-version=0"],
    ["--min-version=0", "--max-version=0"],
    ["--use-epoch"],
    ["--skip-xattrs"],
    ["--user-xattrs"],
    ["--skip-devices"],
]


@needs_c
@pytest.mark.parametrize("options", MK_OPTIONS, ids=lambda o: " ".join(o) or "default")
def test_mkcomposefs_directory_is_c_byte_for_byte(tmp_path: Path, options: list[str]) -> None:
    src = make_source_tree(tmp_path / "src")
    c_digest = c_run("mkcomposefs", *options, "--print-digest", str(src), str(tmp_path / "c.cfs"))
    ours = ok("mkcomposefs", *options, "--print-digest", str(src), str(tmp_path / "o.cfs"))
    assert (tmp_path / "o.cfs").read_bytes() == (tmp_path / "c.cfs").read_bytes()
    assert ours == c_digest
    assert len(ours.strip()) == 64
    only = ok("mkcomposefs", *options, "--print-digest-only", str(src))
    assert only == c_run("mkcomposefs", *options, "--print-digest-only", str(src)) == c_digest


@needs_c
def test_mkcomposefs_digest_store_as_c(tmp_path: Path) -> None:
    src = make_source_tree(tmp_path / "src")
    c_run("mkcomposefs", f"--digest-store={tmp_path / 'cstore'}", str(src), str(tmp_path / "c"))
    ok("mkcomposefs", f"--digest-store={tmp_path / 'ostore'}", str(src), str(tmp_path / "o"))
    assert (tmp_path / "o").read_bytes() == (tmp_path / "c").read_bytes()

    def listing(store: Path) -> dict[str, bytes]:
        return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}

    ours = listing(tmp_path / "ostore")
    assert ours == listing(tmp_path / "cstore")
    assert len(ours) == 3  # etc/big = dup (and its link), etc/x65, usr/bin/tool
    fsverity = shutil.which("fsverity")
    if fsverity is None:
        pytest.skip("fsverity tool not installed")
    for rel in ours:
        out = subprocess.run(
            [fsverity, "digest", str(tmp_path / "ostore" / rel)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        assert out.split()[0] == "sha256:" + rel.replace("/", "")
        assert (tmp_path / "ostore" / rel).stat().st_mode & 0o777 == 0o644


@needs_c
def test_mkcomposefs_from_file_stdin_stdout(tmp_path: Path) -> None:
    src = make_source_tree(tmp_path / "src")
    text = ok("create-dumpfile", "--no-propagate-usr-to-root", str(src))
    for options in (["--min-version=1", "--max-version=1"], []):
        c_image = c_run("mkcomposefs", *options, "--from-file", "-", "-", stdin=text)
        ours = ok("mkcomposefs", *options, "--from-file", "-", "-", stdin=text)
        assert ours == c_image
        (tmp_path / "d").write_bytes(text)
        ok("mkcomposefs", *options, "--from-file", str(tmp_path / "d"), str(tmp_path / "i"))
        assert (tmp_path / "i").read_bytes() == c_image


@needs_c
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=filesystems(), version=st.sampled_from([None, 0, 1]))
def test_mkcomposefs_from_file_random_trees(
    fs: FileSystem, version: int | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("mk")
    text = dumpfile(fs)
    (tmp / "d").write_bytes(text)
    options = [] if version is None else [f"--min-version={version}", f"--max-version={version}"]
    c_digest = c_run(
        "mkcomposefs", *options, "--print-digest", "--from-file", str(tmp / "d"), str(tmp / "c")
    )
    ours = in_process(
        "mkcomposefs", *options, "--print-digest", "--from-file", str(tmp / "d"), str(tmp / "o")
    )
    assert (tmp / "o").read_bytes() == (tmp / "c").read_bytes()
    assert ours == c_digest


def test_mkcomposefs_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert_one_line_error(run("mkcomposefs", str(tmp_path / "d")), "destination")
    assert_one_line_error(
        run("mkcomposefs", "--print-digest-only", str(tmp_path / "d"), str(tmp_path / "x")),
        "--print-digest-only",
    )
    assert_one_line_error(
        run("mkcomposefs", "--max-version=2", str(tmp_path / "d"), str(tmp_path / "x")), "2"
    )
    assert_one_line_error(
        run("mkcomposefs", "--from-file", str(tmp_path / "nope"), str(tmp_path / "x")), "nope"
    )
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n/x 1 100644 1 0 0 0 zz - y -\n")
    assert_one_line_error(run("mkcomposefs", "--from-file", str(bad), str(tmp_path / "x")))
    assert not (tmp_path / "x").exists() or (tmp_path / "x").stat().st_size == 0


# -- composefs-info -----------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("command", ["dump", "ls", "objects"])
def test_composefs_info_equals_c_on_c_images(command: str) -> None:
    for image in C_IMAGES:
        assert ok("composefs-info", command, str(image)) == c_run(
            "composefs-info", command, str(image)
        ), image.name
    # several images at once (objects merges and sorts them)
    names = [str(i) for i in C_IMAGES]
    assert ok("composefs-info", command, *names) == c_run("composefs-info", command, *names)


@needs_c
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=filesystems(), version=st.sampled_from([0, 1]))
def test_composefs_info_equals_c_on_random_images(
    fs: FileSystem, version: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("info")
    image = tmp / "i.cfs"
    image.write_bytes(c_mkcomposefs(dumpfile(fs), version=version))
    for command in ("dump", "ls", "objects"):
        assert in_process("composefs-info", command, str(image)) == c_run(
            "composefs-info", command, str(image)
        ), command


@needs_c
def test_composefs_info_on_our_images_and_missing_objects(tmp_path: Path) -> None:
    src = make_source_tree(tmp_path / "src")
    ok("mkcomposefs", f"--digest-store={tmp_path / 'store'}", str(src), str(tmp_path / "o"))
    for command in ("dump", "ls", "objects"):
        assert ok("composefs-info", command, str(tmp_path / "o")) == c_run(
            "composefs-info", command, str(tmp_path / "o")
        )
    objects = ok("composefs-info", "objects", str(tmp_path / "o")).splitlines()
    victim = tmp_path / "store" / objects[0].decode()
    victim.unlink()
    args = ["missing-objects", f"--basedir={tmp_path / 'store'}", str(tmp_path / "o")]
    assert ok("composefs-info", *args) == c_run("composefs-info", *args) == objects[0] + b"\n"


@needs_c
def test_composefs_info_measure_file(tmp_path: Path) -> None:
    files = []
    for size in (0, 1, 4096, 4097, 100_000):
        p = tmp_path / f"f{size}"
        p.write_bytes(bytes((i * 7) % 251 for i in range(size)))
        files.append(str(p))
    ours = ok("composefs-info", "measure-file", *files)
    assert ours == c_run("composefs-info", "measure-file", *files)
    fsverity = shutil.which("fsverity")
    if fsverity is not None:
        # C 1.0.8 hashes an empty file differently from fs-verity (a zero block as the
        # root); every other size is the fs-verity digest
        tool = subprocess.run([fsverity, "digest", *files[1:]], capture_output=True, text=True)
        assert [line.split()[0].removeprefix("sha256:") for line in tool.stdout.splitlines()] == (
            ours.decode().split()[1:]
        )


def test_composefs_info_errors(tmp_path: Path) -> None:
    assert_one_line_error(run("composefs-info", "dump", str(tmp_path / "nope")), "nope")
    (tmp_path / "junk").write_bytes(b"\0" * 8192)
    assert_one_line_error(run("composefs-info", "dump", str(tmp_path / "junk")), "magic")


# -- repository images --------------------------------------------------------------------


def init_repo(tmp_path: Path, algorithm: str = "fsverity-sha256-12") -> list[str]:
    repo = tmp_path / "repo"
    ok("--repo", str(repo), "init", "--insecure", "--algorithm", algorithm)
    return ["--repo", str(repo)]


@needs_c
@pytest.mark.parametrize("transform", [True, False])
def test_create_image_equals_c_and_lists(tmp_path: Path, transform: bool) -> None:
    src = make_source_tree(tmp_path / "src")
    r = init_repo(tmp_path)
    flag = [] if transform else ["--no-propagate-usr-to-root"]
    image_id = ok(*r, "create-image", *flag, str(src), "mine").decode().strip()
    assert ok(*r, "compute-id", *flag, str(src)).decode().strip() == image_id
    # our create-dumpfile, built by C, gives the same ID
    text = ok(*r, "create-dumpfile", *flag, str(src))
    c_id = c_run(
        "mkcomposefs",
        "--min-version=1",
        "--max-version=1",
        "--print-digest-only",
        "--from-file",
        "-",
        stdin=text,
    )
    assert c_id.decode().strip() == image_id
    stored = tmp_path / "repo" / "images" / image_id
    assert stored.is_symlink()
    # composefs-info dump of the stored image is our dumpfile (documented differences aside)
    assert c_dump_as_rs(c_run("composefs-info", "dump", str(stored))) == text
    if not transform:
        # without the transform and without hard links, C on the directory agrees too
        plain = make_source_tree(tmp_path / "plain", hardlinks=False)
        plain_id = ok(*r, "create-image", "--no-propagate-usr-to-root", str(plain))
        c_plain = c_run(
            "mkcomposefs", "--min-version=1", "--max-version=1", "--print-digest-only", str(plain)
        )
        assert plain_id == c_plain
    # images, image-objects
    listing = ok(*r, "images").decode()
    assert f"{image_id}  mine" in listing
    doc = json.loads(ok(*r, "images", "--json"))
    assert {"id": image_id, "refs": ["mine"], "present": True} in doc["images"]
    objects = ok(*r, "image-objects", "mine").decode().split()
    c_objects = c_run("composefs-info", "objects", str(stored)).decode().split()
    assert sorted(objects) == sorted(p.replace("/", "") for p in c_objects)
    assert objects == sorted(objects)
    for hex_ in objects:
        obj = tmp_path / "repo" / "objects" / hex_[:2] / hex_[2:]
        assert obj.is_file()
    assert ok(*r, "image-objects", image_id) == ok(*r, "image-objects", "refs/mine")


@needs_c
def test_stored_objects_are_named_by_fsverity_digest(tmp_path: Path) -> None:
    fsverity = shutil.which("fsverity")
    if fsverity is None:
        pytest.skip("fsverity tool not installed")
    src = make_source_tree(tmp_path / "src")
    r = init_repo(tmp_path)
    ok(*r, "create-image", str(src), "x")
    for hex_ in ok(*r, "image-objects", "x").decode().split():
        obj = tmp_path / "repo" / "objects" / hex_[:2] / hex_[2:]
        out = subprocess.run([fsverity, "digest", str(obj)], capture_output=True, text=True)
        assert out.stdout.split()[0] == f"sha256:{hex_}"


def test_dump_files(tmp_path: Path) -> None:
    src = make_source_tree(tmp_path / "src")
    r = init_repo(tmp_path)
    ok(*r, "create-image", str(src), "x")
    whole = ok(*r, "create-dumpfile", str(src)).splitlines(keepends=True)
    etc = ok(*r, "dump-files", "x", "/etc")
    assert etc == b"".join(line for line in whole if line.startswith(b"/etc"))
    one = ok(*r, "dump-files", "x", "etc/small", "/usr/bin/tool")
    assert one.splitlines(keepends=True) == [
        next(line for line in whole if line.startswith(b"/etc/small ")),
        next(line for line in whole if line.startswith(b"/usr/bin/tool ")),
    ]
    backing = ok(*r, "dump-files", "--backing-path-only", "x", "/etc/small", "/etc/big")
    first, second = backing.decode().splitlines()
    assert first == "/etc/small inline"
    big_line = next(line for line in whole if line.startswith(b"/etc/big "))
    assert second == "/etc/big " + big_line.split()[8].decode()
    assert_one_line_error(run(*r, "dump-files", "x", "/nope"), "/nope")
    assert_one_line_error(run(*r, "dump-files", "--backing-path-only", "x", "/etc"), "directory")
    assert_one_line_error(run(*r, "dump-files", "nope", "/etc"), "nope")


@needs_c
def test_create_image_without_usr(tmp_path: Path) -> None:
    """Where cfsctl refuses a tree without /usr, the transform keeps the root's own
    metadata (main's documented deviation); the xattr allowlist still applies."""
    src = make_source_tree(tmp_path / "src", usr=False)
    r = init_repo(tmp_path)
    image_id = ok(*r, "create-image", str(src), "x").decode().strip()
    text = ok(*r, "create-dumpfile", str(src))
    assert text.startswith(b"/ 0 40755 ")
    assert b"user." not in text
    c_id = c_run(
        "mkcomposefs",
        "--min-version=1",
        "--max-version=1",
        "--print-digest-only",
        "--from-file",
        "-",
        stdin=text,
    )
    assert c_id.decode().strip() == image_id
    assert_one_line_error(run(*r, "image-objects", "nope"), "nope")
    assert_one_line_error(run(*r, "create-image", str(tmp_path / "nope")), "nope")


def test_compute_id_follows_the_repository_algorithm(tmp_path: Path) -> None:
    src = make_source_tree(tmp_path / "src")
    no_repo = ok("--repo", str(tmp_path / "none"), "compute-id", str(src)).strip()
    assert len(no_repo) == 128  # cfsctl: SHA-512 without a repository
    r = init_repo(tmp_path, "fsverity-sha512-12")
    assert ok(*r, "compute-id", str(src)).strip() == no_repo
    assert ok(*r, "create-image", str(src)).strip() == no_repo


# -- OCI images ---------------------------------------------------------------------------


def oci_layout(tmp_path: Path) -> Path:
    layout = Layout(tmp_path / "layout")

    def tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for info, data in entries:
                t.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()

    def entry(
        name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object
    ) -> tuple[tarfile.TarInfo, bytes | None]:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        info.mtime = 1_600_000_000
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        for k, v in kw.items():
            setattr(info, k, v)
        return info, (data if kind == tarfile.REGTYPE else None)

    first = tar(
        [
            entry("usr/", tarfile.DIRTYPE),
            entry("usr/bin/", tarfile.DIRTYPE),
            entry("usr/bin/a", data=b"A" * 1000),
            entry("usr/bin/b", tarfile.LNKTYPE, linkname="usr/bin/a"),
            entry("usr/bin/s", data=b"small"),
            entry("usr/lib", tarfile.SYMTYPE, linkname="bin"),
            entry("etc/", tarfile.DIRTYPE),
            entry("etc/gone", data=b"x" * 100),
            entry("etc/name with space", data=b"y"),
            entry("run/", tarfile.DIRTYPE),
            entry("run/x", data=b"z"),
        ]
    )
    second = tar(
        [
            entry("etc/.wh.gone"),
            entry("usr/bin/c", data=b"C" * 70, pax_headers={"SCHILY.xattr.user.k": "v"}),
        ]
    )
    layout.add_image([first, make_tar([("usr/share/x", b"S" * 4097)]), second], tag="t")
    return layout.write_index()


@needs_c
def test_oci_dump_and_compute_id(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path)
    r = init_repo(tmp_path)
    ok(*r, "oci", "pull", f"oci:{layout}:t", "t")
    dump = ok(*r, "oci", "dump", "t")
    image_id = ok(*r, "oci", "compute-id", "t").decode().strip()
    # C mkcomposefs on our dump gives our image ID ...
    c_id = c_run(
        "mkcomposefs",
        "--min-version=1",
        "--max-version=1",
        "--print-digest-only",
        "--from-file",
        "-",
        stdin=dump,
    )
    assert c_id.decode().strip() == image_id
    # ... and composefs-info dump of C's image is our dump, up to the documented differences
    (tmp_path / "c.cfs").write_bytes(c_mkcomposefs(dump, version=1))
    assert c_dump_as_rs(c_run("composefs-info", "dump", str(tmp_path / "c.cfs"))) == dump
    assert b"/etc/gone" not in dump
    assert b"/run/x" not in dump
    assert b"/usr/bin/b 0 @120000 - - - - 0.0 /usr/bin/a - -\n" in dump
    # the image the pull stored is that one, and `images` lists it
    inspect = json.loads(ok(*r, "oci", "inspect", "t"))
    assert inspect["composefs_erofs"] == image_id
    assert image_id in ok(*r, "images").decode()
    stored = tmp_path / "repo" / "images" / image_id
    assert c_run("composefs-info", "dump", str(stored)) == c_run(
        "composefs-info", "dump", str(tmp_path / "c.cfs")
    )
    assert_one_line_error(run(*r, "oci", "dump", "nope"), "nope")


@needs_c
def test_reached_by_argv0(tmp_path: Path) -> None:
    """Installed (symlinked) as ``mkcomposefs``/``composefs-info``, the console script
    behaves as those tools, as cfsctl does."""
    script = shutil.which("trio-cfsctl", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the trio-cfsctl console script is not installed next to this Python")
    for name in ("mkcomposefs", "composefs-info"):
        os.symlink(script, tmp_path / name)
    src = make_source_tree(tmp_path / "src")
    mk = subprocess.run(
        [str(tmp_path / "mkcomposefs"), "--print-digest", str(src), str(tmp_path / "o")],
        capture_output=True,
        check=True,
    )
    assert mk.stdout == c_run("mkcomposefs", "--print-digest-only", str(src))
    info = subprocess.run(
        [str(tmp_path / "composefs-info"), "ls", str(tmp_path / "o")],
        capture_output=True,
        check=True,
    )
    assert info.stdout == c_run("composefs-info", "ls", str(tmp_path / "o"))
