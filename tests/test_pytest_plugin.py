"""The pytest plugin: a user's test module, using only its fixtures, run by pytest itself.

``plugin_user_module.py`` is the README's testing example (a network fault, a hash worker
that dies, a full disk); it runs here in a child pytest with plugin autoloading off and the
plugin named explicitly, as a user who opts in would run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from trio_composefs.testing import pytest_plugin

HERE = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, module: Path, *args: str) -> subprocess.CompletedProcess[str]:
    target = tmp_path / "test_user_module.py"
    shutil.copy(module, target)
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "-o",
            "trio_mode=true",
            "--rootdir",
            str(tmp_path),
            *args,
            str(target),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


def test_user_module_runs_with_the_plugin(tmp_path: Path) -> None:
    done = run_pytest(
        tmp_path, HERE / "plugin_user_module.py", "-p", "trio", "-p", "trio_composefs"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_without_the_plugin_its_fixtures_are_unknown(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def test_it(tmp_repository):\n    pass\n")
    done = run_pytest(tmp_path, module, "-p", "trio")
    assert done.returncode == 1
    assert "fixture 'tmp_repository' not found" in done.stdout


def test_the_plugin_defines_fixtures_only() -> None:
    # Loaded wherever trio-composefs is installed (pytest11), so it must be inert:
    # no hooks, no options, nothing autouse.
    assert [name for name in vars(pytest_plugin) if name.startswith("pytest_")] == []
    for name in pytest_plugin.__all__:
        marker = getattr(pytest_plugin, name)._fixture_function_marker
        assert marker.scope == "function"
        assert not marker.autouse
