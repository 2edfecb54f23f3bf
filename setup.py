"""The one thing pyproject.toml cannot say: the package list (everything else is in pyproject.toml).

``[tool.setuptools.packages.find]`` finds every package under ``backfill_lib/`` but cannot add
``backfill_lib._results``, a package whose folder is the repository's ``results/`` (mapped in
``[tool.setuptools.package-dir]``), and the two cannot be combined in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

# Namespace discovery: a subpackage without __init__.py is shipped too, not silently left out.
packages = find_namespace_packages(include=["backfill_lib", "backfill_lib.*"], exclude=["*.__pycache__"])
setup(packages=packages + ["backfill_lib._results"])
