"""pytest fixtures for testing code that embeds trio-composefs.

Installed as the ``trio_composefs`` entry point of the ``pytest11`` group. The
plugin defines fixtures and nothing else (no hooks, options or autouse
fixtures), so while pytest loads it wherever trio-composefs is installed, it
changes nothing until a test asks for one of its fixtures by name, and a
``conftest.py`` fixture of the same name takes precedence. To load it
explicitly (with plugin autoloading disabled: ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``)
pass ``-p trio_composefs``, or write ``pytest_plugins = ["trio_composefs.testing.pytest_plugin"]``
in the top-level ``conftest.py``; to keep it out, ``-p no:trio_composefs``.

Fixtures (function scope; async tests need pytest-trio, e.g. ``trio_mode = true``):

``tmp_repository``
    a fresh insecure :class:`~trio_composefs.Repository` in ``tmp_path``, closed afterwards.
``faulty_repository``
    a :class:`~trio_composefs.testing.FaultyRepository` around ``tmp_repository``.
``sample_layout``
    the built-in sample image written as an OCI layout in ``tmp_path``; its
    reference, ``oci:PATH:latest`` (three layers: gzip, zstd and plain).
``import_checker``
    an :class:`~trio_composefs.testing.ImportChecker` for ``tmp_repository``
    (call ``baseline()`` after a first import); at teardown it fails the test if
    file descriptors, threads or child processes leaked since the baseline.
``local_registry``
    a :class:`~trio_composefs.testing.LocalRegistry` (``docker-registry`` on a
    free loopback port, temporary storage), stopped afterwards; the test is
    skipped when the registry or skopeo is not installed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ..repository import Repository
    from . import FaultyRepository, ImportChecker, LocalRegistry

__all__ = [
    "faulty_repository",
    "import_checker",
    "local_registry",
    "sample_layout",
    "tmp_repository",
]


@pytest.fixture
def tmp_repository(tmp_path: Path) -> Iterator[Repository]:
    """A fresh insecure repository in ``tmp_path / "repository"``, closed after the test."""
    from ..repository import Repository

    with Repository.init(tmp_path / "repository", insecure=True) as repo:
        repo.begin_object().abort()  # open its lazily opened directories now
        yield repo


@pytest.fixture
def faulty_repository(tmp_repository: Repository) -> FaultyRepository:
    """``tmp_repository`` wrapped to fail, pause or kill where the test asks."""
    from . import FaultyRepository

    return FaultyRepository(tmp_repository)


@pytest.fixture
def sample_layout(tmp_path: Path) -> str:
    """The sample image as an OCI layout; its reference ``oci:PATH:latest``."""
    from . import write_sample_layout

    return write_sample_layout(tmp_path / "sample-layout")


@pytest.fixture
def import_checker(tmp_repository: Repository) -> Iterator[ImportChecker]:
    """Baselines of the process and of ``tmp_repository``; leaks fail the test at teardown."""
    from . import ImportChecker

    checker = ImportChecker(tmp_repository)
    yield checker
    checker.assert_no_leaks()


@pytest.fixture
def local_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A registry on 127.0.0.1 (plain HTTP: pull with ``tls_verify=False``), stopped after."""
    from . import LocalRegistry, RegistryUnavailable, find_registry

    try:
        find_registry()
    except RegistryUnavailable as e:
        pytest.skip(str(e))
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    with LocalRegistry(tmp_path / "registry") as registry:
        yield registry
