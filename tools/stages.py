"""Importing a stage script (``01_extract.py`` …) as a module, for tests and benchmarks.

Stage files start with digits, so ``import`` cannot name them. The module is registered in
``sys.modules`` so that worker processes can pickle its functions by name.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_stage(name: str) -> ModuleType:
    """Import stage script ``name`` (e.g. ``"01_extract"``) from the project root."""
    module_name = f"stage_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
