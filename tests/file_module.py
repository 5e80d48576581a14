"""Load a script of the repository (``scripts/``, ``bench/``, ``jobs/``) as a module by its path:
those folders are not packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load(name: str, path: Path) -> ModuleType:
    """The module ``name`` executed from the file ``path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
