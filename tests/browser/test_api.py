"""The API reference appendix (book/api.md and its pages book/api/*.md, one per module) documents
every public module, function, class, method and property of backfill_lib: a module added to the
library but not to the API pages, or a member autodoc left out, fails here."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import backfill_lib

from .book_site import toc_files

API_PAGES = [p for p in toc_files() if p == "book/api" or p.startswith("book/api/")]


def public_modules() -> list[str]:
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


@pytest.fixture(scope="module")
def documented(site_dir) -> set[str]:
    assert API_PAGES, "_toc.yml has no api page (book/api.md)"
    found = set()
    for page in API_PAGES:
        html = (site_dir / f"{page}.html").read_text()
        found |= set(re.findall(r'<dt class="sig sig-object py[^"]*" id="([^"]+)"', html))
        found |= set(re.findall(r'id="module-([^"]+)"', html))
    return found


@pytest.mark.parametrize("modname", public_modules())
def test_module_is_in_the_api_reference(documented, modname):
    assert modname in documented, f"{modname} is missing from the API reference: add a page book/api/<module>.md with its automodule (and list it in _toc.yml and book/api.md)"
    missing = [name for name in public_objects(modname) if name not in documented]
    assert not missing, f"not in the API reference: {missing}"
