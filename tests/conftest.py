"""Fixtures shared by the test modules.

A module can override a fixture by defining one of the same name (pytest's rule); the
``repo`` fixture's hash algorithm comes from ``repo_algorithm`` for that purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tarfixtures import FIXED_MTIME, Profile, make_tree
from trio_composefs import Algorithm, Repository

#: A file of every tree whose mtime gets a nanosecond part (PAX headers carry it).
NSEC_FILE = "files/s511"
#: Its mtime, in nanoseconds.
NSEC_MTIME = FIXED_MTIME * 10**9 + 123_456_789


@pytest.fixture
def repo_algorithm() -> Algorithm:
    """The hash algorithm of :func:`repo`; a module overrides this fixture to change it."""
    return Algorithm.SHA256


@pytest.fixture
def repo(tmp_path: Path, repo_algorithm: Algorithm) -> Iterator[Repository]:
    """An insecure repository in ``tmp_path / "repo"``, closed after the test.

    Its lazily opened directory fds are opened up front, so that a test comparing
    ``open_fds()`` before and after an import sees only what the import leaked.
    """
    with Repository.init(tmp_path / "repo", algorithm=repo_algorithm, insecure=True) as r:
        r.begin_object().abort()
        yield r


@pytest.fixture(scope="session")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[Profile, Path]:
    """One file tree per tar profile, made by :func:`tarfixtures.make_tree` (once a session).

    :data:`NSEC_FILE` has a sub-second mtime (:data:`NSEC_MTIME`).
    """
    base = tmp_path_factory.mktemp("trees")
    result = {}
    for profile in Profile:
        tree = make_tree(base / profile.value, profile)
        os.utime(tree / NSEC_FILE, ns=(NSEC_MTIME, NSEC_MTIME))
        result[profile] = tree
    return result
