"""The public API is fully typed and ships ``py.typed``."""

from __future__ import annotations

import importlib.resources
import os
import pkgutil
import subprocess
import sys

import pytest
from versions import needs_typed_torch

import gradnorm_func

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_py_typed_marker_ships_with_the_package():
    assert importlib.resources.files("gradnorm_func").joinpath("py.typed").is_file()


ESSENTIAL = ["GradNorm", "GradNormAux", "GradNormState", "SkippedUpdateWarning", "gradnorm_loss",
             "init_state", "state_from_dict", "state_to_dict", "step", "update"]
ADVANCED = ["check_same_tasks", "fork", "fork_gradients", "fork_probe", "step_from_gradients",
            "step_from_norms", "sync_task_gradients", "task_gradients"]


def test_public_names_are_pinned():
    """The export list is exactly the two documented tiers, each name defined in a private module."""
    assert gradnorm_func.__all__ == ESSENTIAL + ADVANCED
    for name in gradnorm_func.__all__:
        module = getattr(gradnorm_func, name).__module__
        assert module.startswith("gradnorm_func._"), (name, module)
    public_modules = [m.name for m in pkgutil.iter_modules(gradnorm_func.__path__)
                      if not m.name.startswith("_")]
    assert public_modules == ["repro"]


def test_every_public_name_is_documented_in_the_api_reference():
    reference = open(os.path.join(ROOT, "docs", "api.md")).read()
    for name in gradnorm_func.__all__:
        assert f"`{name}" in reference, name


@needs_typed_torch
def test_package_passes_mypy_strict():
    pytest.importorskip("mypy")
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "gradnorm_func"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
