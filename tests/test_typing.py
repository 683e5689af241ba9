"""The public API is fully typed and ships ``py.typed``."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys

import pytest
from versions import needs_typed_torch

import gradnorm_func

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_py_typed_marker_ships_with_the_package():
    assert importlib.resources.files("gradnorm_func").joinpath("py.typed").is_file()


def test_public_names_are_exported():
    assert sorted(gradnorm_func.__all__) == sorted(set(gradnorm_func.__all__))
    for name in gradnorm_func.__all__:
        assert getattr(gradnorm_func, name).__module__.startswith("gradnorm_func")


@needs_typed_torch
def test_package_passes_mypy_strict():
    pytest.importorskip("mypy")
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "gradnorm_func"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
