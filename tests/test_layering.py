"""The package's layers, enforced (trio's ``test_exports`` idea, with an import graph).

Each sub-package of ``trio_composefs`` sits on a layer and imports only from its own layer
and the layers below::

    L0  formats, fs                  pure: no trio, no os, no threads/sockets/subprocesses;
                                     the standard library's pure modules, attrs, zstandard
    L1  hashing, repository          blocking I/O, never trio
    L2  importer, oci, maintenance, mount    the trio shell; never the CLI
    L3  cli, testing                 presentation and public test support

The walk reads every module's AST (imports inside functions and ``TYPE_CHECKING`` blocks
count too), so a violation fails here before anyone imports the module. The root
``__init__`` is the façade: only its run-time imports (outside ``TYPE_CHECKING``) are held
to L0. A second test imports every L0 module in a fresh interpreter and checks that trio
was not loaded.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import trio_composefs

PACKAGE = "trio_composefs"
SRC = Path(trio_composefs.__file__).resolve().parent

#: The layer of each top-level part of the package (sub-package or private module).
LAYERS: dict[str, int] = {
    "_errors": 0,
    "_version": 0,
    "_lazy": 0,
    "formats": 0,
    "fs": 0,
    "hashing": 1,
    "repository": 1,
    "importer": 2,
    "oci": 2,
    "maintenance": 2,
    "mount": 2,
    "images": 2,
    "fuse": 2,
    "cli": 3,
    "__main__": 3,
    "testing": 3,
}

#: Standard-library modules that do I/O or concurrency: never in L0.
IMPURE = frozenset(
    {
        "os",
        "posix",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "socket",
        "select",
        "selectors",
        "subprocess",
        "signal",
        "fcntl",
        "ctypes",
        "threading",
        "_thread",
        "multiprocessing",
        "concurrent",
        "asyncio",
        "time",
        "trio",
    }
)
#: Third-party distributions L0 may use.
L0_THIRD_PARTY = frozenset({"attrs", "attr", "zstandard"})
#: What never appears below the trio shell.
ASYNC = frozenset({"trio", "anyio", "asyncio", "sniffio", "outcome"})


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str, source: str, *, is_package: bool) -> Iterator[tuple[str, bool]]:
    """Every module ``source`` imports, absolute, with whether it is under ``TYPE_CHECKING``.

    ``from X import a`` yields ``X`` and also ``X.a`` (``a`` may be a submodule);
    ``from .. import a`` yields only ``PARENT.a``.
    """
    package = module if is_package or "." not in module else module.rpartition(".")[0]

    def walk(node: ast.AST, typing_only: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                yield from walk(stmt, True)
            for stmt in node.orelse:
                yield from walk(stmt, typing_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, typing_only
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if node.module:  # `from .. import x` imports x, not the package's names
                yield target, typing_only
            for alias in node.names:
                yield f"{target}.{alias.name}", typing_only
        for grandchild in ast.iter_child_nodes(node):
            yield from walk(grandchild, typing_only)

    yield from walk(ast.parse(source), False)


def layer_of(module: str) -> int | None:
    """The layer of a ``trio_composefs`` module, ``None`` for the root package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return LAYERS.get(parts[1])


def violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """What ``module`` (given as its source) imports that its layer does not allow."""
    mine = layer_of(module)
    found: list[str] = []
    if mine is None and module != PACKAGE:
        return [f"{module}: not in any layer (add it to LAYERS)"]
    for target, typing_only in imports(module, source, is_package=is_package):
        top = target.partition(".")[0]
        if top == PACKAGE:
            theirs = layer_of(target)
            if module == PACKAGE:
                # The façade: names for type checkers may come from anywhere; what runs
                # when `import trio_composefs` runs must be L0.
                if not typing_only and theirs is not None and theirs > 0:
                    found.append(f"{module}: imports {target} at run time (L{theirs})")
                continue
            if target == PACKAGE:
                found.append(f"{module}: imports the package root (import the sub-package)")
            elif theirs is None:
                if target.count(".") == 1:  # a name from the root, e.g. `from .. import x`
                    found.append(f"{module}: imports {target}, which is in no layer")
            elif mine is not None and theirs > mine:
                found.append(f"{module} (L{mine}) imports {target} (L{theirs})")
            continue
        if mine == 0 or module == PACKAGE:
            if top in IMPURE:
                found.append(f"{module} (L0) imports {target}")
            elif top not in sys.stdlib_module_names and top not in L0_THIRD_PARTY:
                found.append(f"{module} (L0) imports {target} (not stdlib, attrs or zstandard)")
        elif mine is not None and mine < 2 and top in ASYNC:
            found.append(f"{module} (L{mine}) imports {target}")
    # One message per offending line is enough; `from X import a, b` yields X.a and X.b.
    return sorted(set(found))


def sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_module_respects_its_layer(path: Path) -> None:
    module = module_name(path)
    assert violations(module, path.read_text(), is_package=path.name == "__init__.py") == []


def test_every_top_level_part_has_a_layer() -> None:
    parts = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in sources()}
    assert parts - {"__init__", "py.typed"} <= set(LAYERS)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("trio_composefs.formats._x", "import trio", "(L0) imports trio"),
        ("trio_composefs.formats._x", "import os.path", "(L0) imports os.path"),
        ("trio_composefs.fs._x", "from socket import socketpair", "(L0) imports socket"),
        ("trio_composefs.fs._x", "def f():\n    import subprocess", "(L0) imports subprocess"),
        ("trio_composefs.fs._x", "import threading", "(L0) imports threading"),
        ("trio_composefs.fs._x", "import requests", "not stdlib, attrs or zstandard"),
        ("trio_composefs.formats._x", "from ..hashing import HashPool", "imports trio_composefs"),
        ("trio_composefs.fs._x", "from ..repository import Repository", "imports trio_composefs"),
        (
            "trio_composefs.hashing._x",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio",
            "(L1) imports trio",
        ),
        ("trio_composefs.repository._x", "import trio.lowlevel", "(L1) imports trio"),
        ("trio_composefs.repository._x", "from ..importer import Importer", "(L1) imports"),
        ("trio_composefs.importer._x", "from ..cli import run", "(L2) imports"),
        ("trio_composefs.oci.sources._x", "from ...cli._app import run", "(L2) imports"),
        ("trio_composefs.maintenance._x", "from trio_composefs.cli import main", "(L2) imports"),
        ("trio_composefs.mount._x", "from ..cli import run", "(L2) imports"),
        ("trio_composefs.mount._x", "from .. import Repository", "in no layer"),
        ("trio_composefs.oci._x", "import trio_composefs", "imports the package root"),
        ("trio_composefs.newthing", "", "not in any layer"),
        ("trio_composefs", "from .importer import Importer", "at run time (L2)"),
        ("trio_composefs", "import trio", "(L0) imports trio"),
    ],
)
def test_a_violation_is_caught(module: str, source: str, expected: str) -> None:
    found = violations(module, source)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("trio_composefs.formats._x", "import struct, hashlib, enum\nimport attrs, zstandard"),
        ("trio_composefs.formats._x", "from .._errors import TarError\nfrom ._y import z"),
        ("trio_composefs.fs._x", "from ..formats._fsverity import Digest"),
        ("trio_composefs.hashing._x", "import os, subprocess, threading"),
        ("trio_composefs.mount._x", "import trio\nfrom ..repository import Repository"),
        ("trio_composefs.cli._x", "from ..oci import pull_image\nfrom ..testing import x"),
        (
            "trio_composefs",
            "from typing import TYPE_CHECKING\nfrom . import _lazy\n"
            "if TYPE_CHECKING:\n    from .oci import pull_image as pull_image",
        ),
    ],
)
def test_allowed_imports_pass(module: str, source: str) -> None:
    assert violations(module, source) == []


def _pure_modules() -> list[str]:
    return sorted(
        module_name(p)
        for part in ("formats", "fs")
        for p in (SRC / part).rglob("*.py")
        if "__pycache__" not in p.parts
    )


def test_pure_packages_do_not_load_trio_at_run_time() -> None:
    modules = _pure_modules()
    assert "trio_composefs.formats" in modules
    assert "trio_composefs.fs" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(*sorted(sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-P", "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert [m for m in loaded if m.partition(".")[0] in ASYNC] == []
    ours = {m for m in loaded if m.partition(".")[0] == PACKAGE}
    assert {m for m in ours if layer_of(m) not in (0, None)} == set()


def test_package_root_does_not_load_trio() -> None:
    code = "import sys, trio_composefs; print('trio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.split() == ["False"]


def _type_checking_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                assert isinstance(child, ast.ImportFrom)
                names.update(alias.asname or alias.name for alias in child.names)
    return names


@pytest.mark.parametrize(
    "package",
    [
        "trio_composefs",
        "trio_composefs.formats",
        "trio_composefs.hashing",
        "trio_composefs.testing",
        "trio_composefs.fuse",
    ],
)
def test_lazy_init_is_consistent(package: str) -> None:
    """``__all__``, the ``TYPE_CHECKING`` imports and ``_LAZY`` agree; every name loads."""
    mod = importlib.import_module(package)
    lazy: dict[str, str] = vars(mod)["_LAZY"]
    public = set(mod.__all__)
    assert set(lazy) <= public
    init = Path(mod.__file__ or "")
    assert _type_checking_names(init) == set(lazy)
    for name in sorted(public):
        assert getattr(mod, name) is not None, name
    assert public <= set(dir(mod))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = mod.nonexistent
