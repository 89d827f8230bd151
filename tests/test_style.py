"""The code stays ruff-clean (PEP 8, lines up to 100): checked with the tests, so CI enforces it."""

import shutil
import subprocess

import pytest

from utils import REPO_ROOT


def test_ruff_clean():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(REPO_ROOT / ".venv" / "bin"))
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the dev group: uv sync)")
    result = subprocess.run([ruff, "check", str(REPO_ROOT)], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
