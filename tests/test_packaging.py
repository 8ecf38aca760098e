"""The wheel, built by pip with the project's backend (hatchling), and its metadata.

Checked against the wheel file itself (a zip), read with ``zipfile`` and the
standard library's e-mail parser (the METADATA format): what is inside, that
every file matches its RECORD hash, the licences, classifiers, dependencies and
the ``trio-cfsctl`` entry point.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib
import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

import pytest

import trio_composefs

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "trio_composefs"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    if not (ROOT / "pyproject.toml").is_file() or not PACKAGE.is_dir():
        pytest.skip("not run from a source checkout")
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 and "hatchling" in done.stderr and "No matching" in done.stderr:
        pytest.skip("pip cannot fetch the build backend (hatchling): offline?")
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("trio_composefs-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def dist_info(zf: zipfile.ZipFile) -> str:
    (name,) = {n.split("/")[0] for n in zf.namelist() if n.split("/")[0].endswith(".dist-info")}
    assert name == f"trio_composefs-{trio_composefs.__version__}.dist-info"
    return name


def metadata(zf: zipfile.ZipFile) -> Message:
    return HeaderParser().parsestr(zf.read(f"{dist_info(zf)}/METADATA").decode())


def test_contents_are_the_package_only(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    info = dist_info(wheel)
    assert all(n.startswith(("trio_composefs/", f"{info}/")) for n in names), names
    assert not [n for n in names if "tests/" in n or "benchmarks/" in n or n.endswith(".pyc")]
    # every source file of the package, and the typing marker
    ours = {
        "trio_composefs/" + p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {n for n in names if n.startswith("trio_composefs/")} == ours
    assert "trio_composefs/py.typed" in names
    assert "trio_composefs/__init__.py" in names


def test_record_hashes(wheel: zipfile.ZipFile) -> None:
    """RECORD (PEP 376/427): every other file listed once, with its sha256 and size."""
    info = dist_info(wheel)
    rows = list(csv.reader(io.StringIO(wheel.read(f"{info}/RECORD").decode())))
    listed = {row[0] for row in rows}
    assert listed == set(wheel.namelist())
    for name, digest, size in rows:
        if name == f"{info}/RECORD":
            assert (digest, size) == ("", "")
            continue
        data = wheel.read(name)
        expect = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (f"sha256={expect}", len(data)), name


def test_licences(wheel: zipfile.ZipFile) -> None:
    info = dist_info(wheel)
    meta = metadata(wheel)
    assert meta["License-Expression"] == "MIT OR Apache-2.0"
    assert sorted(meta.get_all("License-File") or []) == ["LICENSE-APACHE", "LICENSE-MIT"]
    for name in ("LICENSE-APACHE", "LICENSE-MIT"):
        assert wheel.read(f"{info}/licenses/{name}") == (ROOT / name).read_bytes()
    assert b"Apache License" in (ROOT / "LICENSE-APACHE").read_bytes()
    assert b"MIT License" in (ROOT / "LICENSE-MIT").read_bytes()


def test_metadata(wheel: zipfile.ZipFile) -> None:
    meta = metadata(wheel)
    assert meta["Name"] == "trio-composefs"
    assert meta["Version"] == trio_composefs.__version__
    assert "Linux only" in meta["Summary"]
    assert meta["Requires-Python"] == ">=3.11"
    classifiers = meta.get_all("Classifier") or []
    for wanted in (
        "Operating System :: POSIX :: Linux",
        "Framework :: Trio",
        "Typing :: Typed",
        "Programming Language :: Python :: 3 :: Only",
    ):
        assert wanted in classifiers
    assert not [c for c in classifiers if c.startswith("Operating System") and "Linux" not in c]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert urls["Upstream (composefs-rs)"] == "https://github.com/composefs/composefs-rs"
    requires = [r.replace(" ", "") for r in meta.get_all("Requires-Dist") or []]
    # the README's example uses pytest.RaisesGroup, new in pytest 8.4
    assert "pytest>=8.4;extra=='test'" in requires
    assert "pyfuse3>=3.5;extra=='fuse'" in requires  # mount --fuse
    assert "zstandard<0.26,>=0.25" in requires  # the pin: see tests/test_zstd_pin.py
    assert meta["Description-Content-Type"] == "text/markdown"


def test_entry_point(wheel: zipfile.ZipFile) -> None:
    text = wheel.read(f"{dist_info(wheel)}/entry_points.txt").decode()
    assert "[console_scripts]\ntrio-cfsctl = trio_composefs.cli:main\n" in text
    module, _, attr = "trio_composefs.cli:main".partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
