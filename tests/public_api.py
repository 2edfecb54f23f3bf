"""What counts as backfill_lib's public API, shared by the docstring check
(tests/test_docstrings.py) and the API-reference check of the built site
(tests/browser/test_api.py)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import backfill_lib


def public_modules() -> list[str]:
    """``backfill_lib`` and every sub-module whose dotted name has no part starting with ``_``."""
    found = [m.name for m in pkgutil.walk_packages(backfill_lib.__path__, "backfill_lib.")]
    return ["backfill_lib"] + sorted(m for m in found if not any(part.startswith("_") for part in m.split(".")))


def public_objects(modname: str) -> list[str]:
    """Functions and classes defined in the module (not imported into it), and the methods and
    properties their classes define, by full dotted name."""
    module = importlib.import_module(modname)
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            names.append(f"{modname}.{name}")
        if inspect.isclass(obj):
            names += [f"{modname}.{name}.{attr}" for attr, value in vars(obj).items()
                      if not attr.startswith("_")
                      and (inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod)))]
    return names
