"""Optional dependencies: imported on first use, or refused with the extra that installs them."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, needed_by: str, extra: str) -> ModuleType:
    """Import ``module``; without it, raise an ``ImportError`` that names what needs it and the fix
    (``pip install 'snopt-dyn[extra]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".", 1)[0]
        raise ImportError(f"{needed_by} needs {package}: pip install 'snopt-dyn[{extra}]'") from exc
