"""ruff is clean: the lint rules and the formatter configured in pyproject.toml ([tool.ruff])."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["src", "tests", "bench", "examples"]


def _ruff() -> str:
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_ruff(), *args, *[p for p in PATHS if (ROOT / p).exists()]], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_check_is_clean():
    result = _run("check", "--no-cache", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = _run("format", "--check", "--no-cache")
    assert result.returncode == 0, "run `ruff format src tests bench examples`:\n" + result.stdout + result.stderr
