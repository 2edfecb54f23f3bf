"""Every public function, class, method and property of backfill_lib has a docstring that
documents each of its parameters (numpy style, checked with numpydoc's validator), so the API
reference appendix (book/api.md) tells an engineer how to call everything."""

from __future__ import annotations

import pytest
from numpydoc import validate as numpydoc_validate  # in requirements.txt: a missing one fails, not skips
from public_api import public_modules, public_objects  # tests/public_api.py

# GL08: no docstring; PR01: a parameter is not documented; PR02: a documented parameter does not
# exist. (Style checks such as line length or punctuation are left to review.)
CHECKS = {"GL08", "PR01", "PR02"}


def all_public_objects() -> list[str]:
    return [name for modname in public_modules() for name in public_objects(modname)]


def test_the_library_has_public_objects():
    names = all_public_objects()
    assert "backfill_lib.metrics.mean_average_precision" in names
    assert "backfill_lib.backfill.Strategy" in names


@pytest.mark.parametrize("name", all_public_objects())
def test_docstring_documents_every_parameter(name):
    problems = [f"{code}: {message}" for code, message in numpydoc_validate.validate(name)["errors"]
                if code in CHECKS]
    assert not problems, f"{name}:\n" + "\n".join(problems)
