"""The README's practitioner example ("Use it in your own retrieval stack") runs as written and
prints what the text around it claims: ψ̂ identical after save/load, the gallery half backfilled,
and the half-migrated gallery ahead of the old model alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- practitioner-example:start -->", "<!-- practitioner-example:end -->"

# Run before the example: any attempt to open a network connection fails the run (offline).
NO_NETWORK = '''\
import socket
def _refuse(*args, **kwargs):
    raise RuntimeError("the README example tried to use the network")
socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
'''


def readme_example() -> str:
    """The one python block between the practitioner-example markers, under its heading."""
    text = README.read_text(encoding="utf-8")
    assert "### Use it in your own retrieval stack" in text, "README lost the practitioner section"
    assert text.count(START) == 1 and text.count(END) == 1, "README needs one pair of practitioner-example markers"
    section = text[text.index(START) + len(START):text.index(END)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block between the markers, found {len(blocks)}"
    return blocks[0]


def test_the_example_uses_the_fitted_transform_objects():
    code = readme_example()
    for needed in ("ReverseTransform(", ".fit(", ".save(", "ReverseTransform.load(", "MixedGallery(", ".backfill(",
                   ".search("):
        assert needed in code, f"the README example no longer shows {needed}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")            # no repository files: only what the example writes
    script = folder / "example.py"
    script.write_text(NO_NETWORK + readme_example(), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the README example failed:\n{proc.stderr[-3000:]}"
    return folder, proc.stdout


def test_the_example_runs_and_prints_what_it_claims(run):
    folder, out = run
    assert "loaded psi gives the same vectors: True" in out
    assert "backfilled: 50%" in out
    old = re.search(r"precision@10, old model only: ([0-9.]+)", out)
    half = re.search(r"precision@10, half backfilled, new queries through psi: ([0-9.]+)", out)
    assert old and half, f"the example did not print both precisions:\n{out}"
    old, half = float(old.group(1)), float(half.group(1))
    assert 0 <= old <= 1 and 0 <= half <= 1
    assert half > old, f"the README claims the half-migrated gallery beats the old model: {half} vs {old}"


def test_the_saved_file_is_a_transform_the_service_can_load(run):
    from backfill_lib.transforms import ReverseTransform
    folder, _ = run
    psi = ReverseTransform.load(folder / "psi.pt", device="cpu")
    assert (psi.dim_in_, psi.dim_out_) == (32, 16)
