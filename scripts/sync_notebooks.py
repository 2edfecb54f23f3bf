"""Keep every chapter's Colab badge and bootstrap cell, and the README's install line, in sync
with ``repository.url`` in ``_config.yml`` (the one place that names the repository).

    python scripts/sync_notebooks.py          # rewrite what is out of date
    python scripts/sync_notebooks.py --check  # exit 1 and list what is out of date

The badge is the notebook's first cell (id ``colab-badge``, tagged ``remove-cell``: the website shows
the theme's Colab launch button instead), the bootstrap its first code cell
(id ``colab-bootstrap``): in Colab only, it installs faiss and ``backfill_lib`` from the repository,
or, when the environment variable ``BACKFILL_INSTALL`` is set, faiss and that pip requirement (the
Colab-path test, ``scripts/test_colab_path.py``, points it at the wheel it built).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BADGE_ID, BOOT_ID = "colab-badge", "colab-bootstrap"
README_START, README_END = "<!-- install-line:start -->", "<!-- install-line:end -->"


def repository() -> tuple[str, str]:
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = cfg["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def github_path(url: str) -> str:
    m = re.match(r"https://github\.com/([^/]+/[^/]+?)(?:\.git)?$", url)
    if not m:
        raise SystemExit(f"repository.url must be https://github.com/ORG/REPO, got {url!r}")
    return m.group(1)


def colab_url(url: str, branch: str, notebook: str) -> str:
    return f"https://colab.research.google.com/github/{github_path(url)}/blob/{branch}/{notebook}"


def install_spec(url: str, branch: str) -> str:
    return f'"backfill_lib @ git+{url}@{branch}"'


def badge_source(url: str, branch: str, notebook: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(url, branch, notebook)})")


def bootstrap_source(url: str, branch: str) -> str:
    # BACKFILL_INSTALL is the switch scripts/test_colab_path.py uses to install the wheel it built.
    return ("# In Colab only: install faiss, qdrant-client (the live-index chapter) and backfill_lib\n"
            "# (Colab already has torch, matplotlib, seaborn, ipywidgets).\n"
            "# Set BACKFILL_INSTALL to a pip requirement (e.g. a wheel file) to install that instead.\n"
            "import os\n"
            "import sys\n"
            "\n"
            "if \"google.colab\" in sys.modules or os.environ.get(\"BACKFILL_INSTALL\"):\n"
            f"    spec = os.environ.get(\"BACKFILL_INSTALL\") or {install_spec(url, branch)}\n"
            "    %pip install -q faiss-cpu qdrant-client \"{spec}\"")


def chapters() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def _lines(source: str) -> list[str]:
    # Stored as a list of lines, as Jupyter and nbformat write them (diffs stay line by line).
    return source.splitlines(keepends=True)


def _cell(cell_type: str, cid: str, source: str) -> dict:
    cell = {"cell_type": cell_type, "id": cid, "metadata": {}, "source": _lines(source)}
    if cell_type == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def sync_notebook(path: Path, url: str, branch: str, check: bool) -> bool:
    """Return True if the notebook was (or, with check, would be) changed."""
    nb = json.loads(path.read_text())
    rel = path.relative_to(ROOT).as_posix()
    cells = nb["cells"]
    changed = False
    want_badge = badge_source(url, branch, rel)
    badge = next((c for c in cells if c.get("id") == BADGE_ID), None)
    if badge is None:
        badge = _cell("markdown", BADGE_ID, want_badge)
        cells.insert(0, badge)
        changed = True
    elif "".join(badge["source"]) != want_badge:
        badge["source"] = _lines(want_badge)
        changed = True
    # The website has its own Colab launch button; the badge image lives on Colab's servers and
    # would be a broken image (and a console error) on an offline copy of the site.
    tags = badge.setdefault("metadata", {}).setdefault("tags", [])
    if "remove-cell" not in tags:
        tags.append("remove-cell")
        changed = True
    want_boot = bootstrap_source(url, branch)
    boot = next((c for c in cells if c.get("id") == BOOT_ID), None)
    if boot is None:
        pos = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), len(cells))
        cells.insert(pos, _cell("code", BOOT_ID, want_boot))
        changed = True
    elif "".join(boot["source"]) != want_boot:
        boot["source"] = _lines(want_boot)
        changed = True
    if changed and not check:
        nb["nbformat_minor"] = max(nb.get("nbformat_minor", 5), 5)  # cell ids need 4.5
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


def sync_readme(url: str, branch: str, check: bool) -> bool:
    path = ROOT / "README.md"
    text = path.read_text()
    block = (f"{README_START}\n```bash\npip install faiss-cpu {install_spec(url, branch)}\n```\n{README_END}")
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the {README_START} ... {README_END} block")
    new = pattern.sub(lambda _: block, text)
    if new != text and not check:
        path.write_text(new)
    return new != text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if anything is out of date")
    args = ap.parse_args(argv)
    url, branch = repository()
    stale = [p.relative_to(ROOT).as_posix() for p in chapters() if sync_notebook(p, url, branch, args.check)]
    if sync_readme(url, branch, args.check):
        stale.append("README.md")
    verb = "out of date" if args.check else "updated"
    for s in stale:
        print(f"{verb}: {s}")
    if args.check and stale:
        print("run: python scripts/sync_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
