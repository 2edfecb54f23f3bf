"""The API reference appendix (book/api.md and its pages book/api/*.md, one per module) documents
every public module, function, class, method and property of backfill_lib: a module added to the
library but not to the API pages, or a member autodoc left out, fails here."""

from __future__ import annotations

import re

import pytest

from public_api import public_modules, public_objects  # tests/public_api.py

from .book_site import toc_files

API_PAGES = [p for p in toc_files() if p == "book/api" or p.startswith("book/api/")]


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
