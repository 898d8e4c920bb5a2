"""`make test` runs the docstring examples of grpo/ and qlora/ (pyproject: --doctest-modules over
those packages), and collecting them imports every module without compiling or warning."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains, spawns processes, builds the kernel or drives a browser

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytest_runs_the_packages_docstring_examples():
    pyproject = (ROOT / "pyproject.toml").read_text()
    testpaths = re.search(r"^testpaths = \[(.*)\]$", pyproject, re.M).group(1)
    assert {"tests", "grpo", "qlora"} <= set(re.findall(r'"([^"]+)"', testpaths))
    addopts = re.search(r'^addopts = "(.*)"$', pyproject, re.M).group(1)
    assert "--doctest-modules" in addopts.split()  # the collection test below relies on it too


def test_collection_imports_every_module_without_building_or_warning(tmp_path):
    build_dir = tmp_path / "torch_extensions"
    build_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-W", "error",
         "-p", "no:cacheprovider", "grpo", "qlora"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(build_dir)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    items = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    modules = {ln.split("::")[0] for ln in items}
    # every module with a worked example is collected: the loss, the rewards, the tasks, ...
    assert {"grpo/loss.py", "grpo/rewards.py", "grpo/tasks/answers.py"} <= modules
    assert len(items) >= 20
    assert list(build_dir.iterdir()) == []  # the C++ kernel is built on first use, not at import
