"""The README's fault-injection example is real code: run it as a pytest-trio module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

FIXTURES = """

import hashlib

@pytest.fixture
def repo(tmp_path):
    from trio_composefs import Algorithm, Repository
    with Repository.init(tmp_path / "r", algorithm=Algorithm.SHA256, insecure=True) as r:
        yield r

@pytest.fixture
def tar():
    from trio_composefs.testing._sample import sample_layers
    return sample_layers()[0].tar

@pytest.fixture
def diff_id(tar):
    return "sha256:" + hashlib.sha256(tar).hexdigest()
"""


def test_fault_injection_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Testing your own application") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```\n", start)]
    if "tmp_repository" in code:
        # the pytest plugin's example: the very module test_pytest_plugin.py runs
        user_module = Path(__file__).resolve().parent / "plugin_user_module.py"
        assert code == user_module.read_text()
    else:
        code += FIXTURES
    module = tmp_path / "test_readme_example.py"
    module.write_text(code)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "trio_mode=true",
            "--rootdir",
            str(tmp_path),
            str(module),
        ],
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    tests = code.count("\ndef test_") + code.count("\nasync def test_")
    assert f"{tests} passed".encode() in done.stdout
