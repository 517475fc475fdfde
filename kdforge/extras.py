"""Optional dependencies: import one, or fail in one line naming the extra that installs it.

The base install stays small (torch, numpy, pyyaml ...); the field's heavier libraries live in
extras (`pip install 'kdforge[vl]'`). Every task package imports them through `require` so a
missing one is a clear `KdforgeError`, never an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kdforge.errors import KdforgeError

__all__ = ["require"]


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """`importlib.import_module(module)`, or one line: what needs it and `pip install 'kdforge[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        what = purpose or f"this feature needs {top}"
        raise KdforgeError(f"{what}: it needs the `{extra}` extra ({top}): pip install 'kdforge[{extra}]'") from None
