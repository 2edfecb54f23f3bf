"""Every public function, class, method and property of backfill_lib has a docstring that
documents each of its parameters (numpy style, checked with numpydoc's validator), so the API
reference appendix (book/api.md) tells an engineer how to call everything."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

numpydoc_validate = pytest.importorskip("numpydoc.validate", reason="numpydoc is in requirements.txt")

import backfill_lib  # noqa: E402

# GL08: no docstring; PR01: a parameter is not documented; PR02: a documented parameter does not
# exist. (Style checks such as line length or punctuation are left to review.)
CHECKS = {"GL08", "PR01", "PR02"}


def public_objects() -> list[str]:
    """Dotted names of the functions and classes each module defines (not imports), and of the
    methods and properties those classes define."""
    modules = ["backfill_lib"] + sorted(
        m.name for m in pkgutil.walk_packages(backfill_lib.__path__, "backfill_lib.")
        if not any(part.startswith("_") for part in m.name.split(".")))
    names = []
    for modname in modules:
        module = importlib.import_module(modname)
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


def test_the_library_has_public_objects():
    names = public_objects()
    assert "backfill_lib.metrics.mean_average_precision" in names
    assert "backfill_lib.backfill.Strategy" in names


@pytest.mark.parametrize("name", public_objects())
def test_docstring_documents_every_parameter(name):
    problems = [f"{code}: {message}" for code, message in numpydoc_validate.validate(name)["errors"]
                if code in CHECKS]
    assert not problems, f"{name}:\n" + "\n".join(problems)
