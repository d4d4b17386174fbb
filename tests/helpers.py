"""Helpers shared by the test files (import as ``from helpers import ...``: pytest puts tests/ on the path)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""

HAVE_TOOLS = shutil.which("flite") is not None and shutil.which("espeak-ng") is not None
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="flite / espeak-ng not installed (apt-get install flite espeak-ng)")


def load_script(relpath, name=None):
    """Import a script of the repository that is not in a package (recipes/, benchmarks/) by its path
    relative to the root; the module is named after the file unless ``name`` is given."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
