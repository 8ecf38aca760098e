"""Where the C composefs 1.0.8 oracle tools are: ``mkcomposefs``, ``composefs-info``,
``mount.composefs`` and ``composefs-dump``.

``.ci/build-composefs`` builds them from Debian's source package into
``/var/cache/trio-composefs/composefs-1.0.8/bin``; the environment variable
``TRIO_COMPOSEFS_C_TOOLS`` names another directory. Tests call :func:`need_c_tool`, which skips
the test with the command to run when the tool is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

C_TOOLS_DIR = Path(
    os.environ.get("TRIO_COMPOSEFS_C_TOOLS", "/var/cache/trio-composefs/composefs-1.0.8/bin")
)


def c_tool(name: str) -> str | None:
    """The path of the C composefs tool ``name``: in :data:`C_TOOLS_DIR` first, else on PATH."""
    return shutil.which(name, path=str(C_TOOLS_DIR)) or shutil.which(name)


def need_c_tool(name: str) -> str:
    """The path of the C composefs tool ``name``; skip the calling test when it is absent."""
    path = c_tool(name)
    if path is None:
        pytest.skip(f"C composefs {name} not found: run .ci/build-composefs")
    return path
