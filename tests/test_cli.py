"""The ``backfill`` command, run as a user runs it: in subprocesses, on generated data.

A faiss index file of old vectors (and a single-vector Qdrant collection in local path mode)
is migrated with a ψ + ρ bridge fitted by ``backfill fit``; the job is killed with SIGKILL and
resumed, paused and resumed, verified (and caught on a planted wrong vector), rolled back (the
original vectors bit for bit) and finalized. The job's pause and its rate/ETA bookkeeping
(``backfill_lib.backfill_job``) are tested in-process at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from backfill_lib.backfill_job import job_status, run_backfill
from backfill_lib.validation import normalize_rows

D_OLD, D_NEW, N = 8, 16, 240
IDS = np.arange(N, dtype=np.int64) * 3 + 5  # not 0..n-1: ids come from the file's id map
CLI = [sys.executable, "-m", "backfill_lib.cli"]
SCRIPT = shutil.which("backfill", path=os.path.dirname(sys.executable)) or shutil.which("backfill")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

# The 'models': item i has a class (i % 4) and a latent vector; the new model sees all 16
# coordinates, the old one a noisy view of 8. Deterministic per id, so a re-embedding matches.
MODEL = textwrap.dedent("""
    import numpy as np

    def _latent(ids):
        rows = []
        for i in np.asarray(ids, dtype=np.int64):
            rng = np.random.default_rng(int(i))
            centre = np.random.default_rng(1000 + int(i) % 4).normal(size=16)
            rows.append(2.0 * centre + rng.normal(size=16))
        return np.array(rows).reshape(-1, 16)

    def _unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def embed(ids):
        return _unit(_latent(ids))

    def embed_old(ids):
        x = _latent(ids)
        return _unit(x[:, :8] + 0.5 * np.random.default_rng(7).normal(size=(len(x), 8)))

    def not_unit(ids):
        return 3.0 * embed(ids)
""")


def run(*args, script: bool = False, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``backfill ARGS`` (the installed script) or ``python -m backfill_lib.cli ARGS``."""
    cmd = [SCRIPT] if script else CLI
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def ok(result: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == code, \
        f"exit {result.returncode}, not {code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def status(workdir) -> dict:
    return json.loads(ok(run("status", workdir, "--json")).stdout)


def wait_for_progress(workdir, at_least: int, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """The job's state once it records at least ``at_least`` items written (the process still running)."""
    state = os.path.join(workdir, "job.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the job ended early: {proc.communicate()}"
        try:
            with open(state) as f:
                stats = json.load(f).get("stats", {})
        except (OSError, ValueError):
            stats = {}
        if stats.get("written", 0) >= at_least:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the job did not reach {at_least} items in {timeout} s")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """model.py, gallery.faiss (IndexIDMap2 over IndexFlatIP of the old vectors), sample.npz and psi_rho.pt."""
    import faiss

    folder = tmp_path_factory.mktemp("cli")
    (folder / "model.py").write_text(MODEL)
    spec = importlib.util.spec_from_file_location("cli_test_model", folder / "model.py")
    model = importlib.util.module_from_spec(spec)  # the file the CLI imports, imported here to build the data
    spec.loader.exec_module(model)
    old = model.embed_old(IDS)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(D_OLD))
    index.add_with_ids(old, IDS)
    faiss.write_index(index, str(folder / "gallery.faiss"))
    sample = np.arange(10_000, 10_400)
    np.savez(folder / "sample.npz", old=model.embed_old(sample), new=model.embed(sample), labels=sample % 4)
    ok(run("fit", folder / "sample.npz", "--method", "psi_rho", "--out", folder / "psi_rho.pt", "--steps", "30"))
    return {"dir": folder, "model": model, "old": old, "embed": f"{folder / 'model.py'}:embed"}


def copy_gallery(world, tmp_path):
    path = tmp_path / "gallery.faiss"
    shutil.copyfile(world["dir"] / "gallery.faiss", path)
    return path


def migrate_args(world, tmp_path, *extra):
    return ("migrate", tmp_path / "work", "--faiss", copy_gallery(world, tmp_path), "--embed", world["embed"],
            "--bridge", world["dir"] / "psi_rho.pt", "--batch-size", "20", *extra)


def expected_new(world, ids) -> np.ndarray:
    """What a migration with the ψ + ρ bridge stores: ρ̂(φ_n(x))."""
    from backfill_lib.transforms import ReverseTransform

    psi = ReverseTransform.load(world["dir"] / "psi_rho.pt", device="cpu")
    return psi.new_embedding(world["model"].embed(ids))


def check_every_item_new_once(world, workdir):
    """The live index holds every id once, stored new, each with exactly its ρ̂(φ_n) vector."""
    from backfill_lib.live_index import OnlineBackfillIndex

    index = OnlineBackfillIndex.load(os.path.join(workdir, "index.obi"))
    assert index.ntotal == N and index.n_old == 0
    np.testing.assert_array_equal(np.sort(index.new_ids()), IDS)
    want = expected_new(world, IDS)
    index.psi = None  # search with the stored vectors themselves (the bridge would apply ρ̂ to a query)
    scores, found = index.search(want, 1)
    np.testing.assert_array_equal(found[:, 0], IDS)  # each item is the best match of its own vector,
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)  # with score 1: it holds exactly that vector
    _, everything = index.search(want[:2], N)
    for row in everything:  # a merged search sees every item exactly once
        np.testing.assert_array_equal(np.sort(row), IDS)


# ---- the command line itself -----------------------------------------------------------------------

def test_help_of_the_installed_script_lists_every_command_and_the_exit_codes():
    assert SCRIPT is not None, "the console script `backfill` is not installed: pip install -e ."
    out = ok(run("--help", script=True)).stdout
    commands = ["probe", "fit", "migrate", "status", "pause", "resume", "verify", "rollback", "finalize"]
    listed = out.split("Commands:")[1]
    assert [line.split()[0] for line in listed.strip().splitlines()] == commands  # in the order of a migration
    for code, meaning in [("0", "done"), ("1", "error"), ("2", "usage"), ("3", "paused"), ("4", "verify")]:
        assert any(line.strip().startswith(f"{code}  {meaning}") for line in out.splitlines()), (code, out)
    for command in commands:
        assert ok(run(command, "--help")).stdout.startswith(f"Usage: backfill {command}")


@pytest.mark.parametrize("args, code, names", [
    (["migrate", "w", "--faiss", "g.faiss", "--embed", "m.py:f", "--batch-size", "0"], 2, "--batch-size"),
    (["migrate", "w", "--faiss", "g.faiss", "--embed", "m.py:f", "--rate-limit", "-3"], 2, "--rate-limit"),
    (["migrate", "w", "--faiss", "g.faiss"], 2, "--embed"),
    (["fit", "s.npz", "--method", "magic", "--out", "b.pt"], 2, "--method"),
    (["verify", "w", "--sample", "many"], 2, "--sample"),
    (["nonsense"], 2, "nonsense"),
    (["status", "{tmp}/nowhere"], 1, "holds no migration"),
    (["migrate", "{tmp}/w", "--faiss", "{gallery}", "--qdrant-path", "{tmp}", "--embed", "{embed}"], 1,
     "exactly one target"),
    (["migrate", "{tmp}/w", "--faiss", "{gallery}", "--embed", "{model}:nope", "--dim-new", "16"], 1,
     "no function 'nope'"),
    (["migrate", "{tmp}/w", "--faiss", "{gallery}", "--embed", "{model}"], 1, "FILE.py:FUNC"),
    (["migrate", "{tmp}/w", "--faiss", "{gallery}", "--embed", "{embed}"], 1, "--dim-new"),
    (["migrate", "{tmp}/w", "--faiss", "{tmp}/missing.faiss", "--embed", "{embed}", "--dim-new", "16"], 1, "--faiss"),
    (["migrate", "{tmp}/w", "--faiss", "{gallery}", "--embed", "{model}:not_unit", "--dim-new", "16"], 1, "unit"),
    (["migrate", "{tmp}/w", "--faiss", "{gallery}", "--embed", "{embed}", "--dim-new", "16", "--bridge", "{model}"], 1,
     "--bridge"),
    (["probe", "{tmp}/bad.npz"], 1, "'labels'"),
    (["fit", "{sample}", "--method", "psi", "--out", "{tmp}/no/such/dir/psi.pt"], 2, "--out"),
])
def test_bad_arguments_give_one_line_naming_the_argument_and_the_exit_code(world, tmp_path, args, code, names):
    np.savez(tmp_path / "bad.npz", old=np.eye(4), new=np.eye(4))
    fill = {"tmp": tmp_path, "gallery": world["dir"] / "gallery.faiss", "embed": world["embed"],
            "model": world["dir"] / "model.py", "sample": world["dir"] / "sample.npz"}
    result = run(*[a.format(**fill) for a in args])
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and names in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()  # nothing half-made


def test_probe_json_and_fit_of_every_method(world, tmp_path):
    from backfill_lib.adapters import ClosedFormAdapter
    from backfill_lib.probe import DECISIONS
    from backfill_lib.transforms import ReverseTransform

    report = json.loads(ok(run("probe", world["dir"] / "sample.npz", "--json", "--n-boot", "20",
                               "--bridge", world["dir"] / "psi_rho.pt")).stdout)
    assert report["decision"] in DECISIONS and report["n_fit"] + report["n_eval"] == 400
    assert report["new_map"] > report["old_map"]  # the new model sees the class structure better
    names = {b["name"] for b in report["bridges"]}
    assert {"procrustes", "reverse_transform", "rank_merge_calibrated"} <= names
    psi = ReverseTransform.load(world["dir"] / "psi_rho.pt", device="cpu")
    assert psi.learn_rho and psi.objective == "mc" and (psi.dim_in_, psi.dim_out_) == (D_NEW, D_OLD)
    for method in ("procrustes", "low_rank_affine"):
        ok(run("fit", world["dir"] / "sample.npz", "--method", method, "--out", tmp_path / f"{method}.npz"))
        adapter = ClosedFormAdapter.load(tmp_path / f"{method}.npz")
        assert (adapter.d_in_, adapter.d_out_) == (D_NEW, D_OLD)


# ---- faiss: kill, pause, resume, verify, rollback, finalize ---------------------------------------

def test_sigkill_mid_job_then_resume_ends_with_every_item_stored_new_exactly_once(world, tmp_path):
    work = tmp_path / "work"
    job = subprocess.Popen([SCRIPT, *map(str, migrate_args(world, tmp_path, "--rate-limit", "100"))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        wait_for_progress(work, 60, job)
        job.send_signal(signal.SIGKILL)
        assert job.wait(timeout=30) == -signal.SIGKILL
    finally:
        if job.poll() is None:
            job.kill()
    s = status(work)
    assert s["job"]["status"] == "killed" and not s["job"]["running"]
    assert 60 <= s["stored_new"] < N and s["stored_new"] + s["stored_old"] == N
    resumed = ok(run("resume", work, script=True))
    assert "done" in resumed.stdout
    check_every_item_new_once(world, work)
    s = status(work)
    # Items written after the killed run's last record are counted once by the resumed run, or not
    # at all if the kill fell between the checkpoint and the record: at most one batch (20) is lost.
    assert s["job"]["status"] == "finished" and s["progress"] == 1.0 and N - 20 <= s["job"]["written"] <= N
    ok(run("verify", work, "--sample", N))


def test_pause_stops_the_running_job_with_exit_3_and_resume_finishes(world, tmp_path):
    work = tmp_path / "work"
    job = start(*migrate_args(world, tmp_path, "--rate-limit", "100"))
    try:
        wait_for_progress(work, 40, job)
        s = status(work)
        assert s["job"]["status"] == "running" and s["job"]["running"] and s["job"]["pid"] == job.pid
        assert 0 < s["job"]["rate"] <= 105 and s["job"]["eta_seconds"] > 0  # about the rate limit, 100 items/s
        paused = ok(run("pause", work))
        assert "paused" in paused.stdout
        out, err = job.communicate(timeout=30)
        assert job.returncode == 3 and "paused" in err and "backfill resume" in err, (out, err)
    finally:
        if job.poll() is None:
            job.kill()
    s = status(work)
    assert s["job"]["status"] == "paused" and 40 <= s["stored_new"] < N and not s["pause_requested"]
    assert "nothing to pause" in ok(run("pause", work)).stdout  # no job running now
    ok(run("resume", work))
    check_every_item_new_once(world, work)


def test_sigterm_stops_the_job_at_a_batch_boundary_like_a_pause(world, tmp_path):
    work = tmp_path / "work"
    job = start(*migrate_args(world, tmp_path, "--rate-limit", "100"))
    try:
        wait_for_progress(work, 20, job)
        job.send_signal(signal.SIGTERM)
        job.communicate(timeout=30)
        assert job.returncode == 3
    finally:
        if job.poll() is None:
            job.kill()
    assert status(work)["job"]["status"] == "paused"


def test_status_json_fields(world, tmp_path):
    work = tmp_path / "work"
    ok(run(*migrate_args(world, tmp_path, "--max-items", "100", "--rate-limit", "400", "--order", "sequential")))
    np.testing.assert_array_equal(np.load(work / "job.json.order.npy"), IDS)  # ascending ids
    s = status(work)
    assert s["phase"] == "migrating" and s["backend"] == "faiss" and s["items"] == N
    assert (s["dim_old"], s["dim_new"]) == (D_OLD, D_NEW)
    assert s["stored_new"] == 100 and s["stored_old"] == N - 100 and s["progress"] == pytest.approx(100 / N)
    job = s["job"]
    assert job["status"] == "stopped" and job["written"] == 100 and not job["running"]
    assert 0 < job["rate"] <= 400 * 1.05  # the rate limit holds
    assert job["eta_seconds"] == pytest.approx((N - 100) / job["rate"])
    assert s["bridge"]["kind"] == "psi_rho" and (s["bridge"]["dim_new"], s["bridge"]["dim_old"]) == (D_NEW, D_OLD)
    assert s["rollback"]["possible"] and s["rollback"]["bytes"] == os.path.getsize(tmp_path / "gallery.faiss")
    assert s["settings"]["batch_size"] == 20 and s["settings"]["rate_limit"] == 400
    assert s["live_index"]["bytes"] == os.path.getsize(work / "index.obi")
    text = ok(run("status", work)).stdout
    assert "stored new 100" in text and "rollback: keeps the original file" in text and "psi_rho" in text


def test_calibration_is_fitted_without_labels_saved_and_served(world, tmp_path):
    from backfill_lib.calibration import fit_score_map
    from backfill_lib.live_index import OnlineBackfillIndex
    from backfill_lib.migration import Migration

    work = tmp_path / "work"
    ok(run(*migrate_args(world, tmp_path, "--max-items", "100", "--calibration", "znorm")))
    s = status(work)
    assert s["calibration"]["method"] == "znorm" and s["calibration"]["n_items"] == N  # every item: fewer than 2000
    maps = s["calibration"]["score_maps"]
    # The maps are those of the index's own vectors: old stored, new = ρ̂(φ_n) of the same items.
    expect_old = fit_score_map(world["old"], method="znorm", seed=0)
    expect_new = fit_score_map(expected_new(world, IDS), method="znorm", seed=0)
    assert maps["old"]["scale"] == pytest.approx(expect_old.scale, rel=1e-5)
    assert maps["new"]["offset"] == pytest.approx(expect_new.offset, rel=1e-5, abs=1e-6)
    assert maps["old"]["scale"] != pytest.approx(maps["new"]["scale"])  # two spaces, two scales
    # Saved with the live index (a service loading it serves the calibrated merge) and re-attached.
    assert OnlineBackfillIndex.load(work / "index.obi").score_maps["old"].scale == pytest.approx(maps["old"]["scale"])
    index = Migration.open(work).open_index()
    assert index.score_maps["new"].method == "znorm"
    assert "znorm (label-free)" in ok(run("status", work)).stdout
    ok(run("migrate", tmp_path / "work2", "--faiss", copy_gallery(world, tmp_path), "--embed", world["embed"],
           "--dim-new", D_NEW, "--calibration", "platt"), 2)


def test_verify_names_a_planted_wrong_vector_and_exits_4(world, tmp_path):
    from backfill_lib.live_index import OnlineBackfillIndex

    work = tmp_path / "work"
    ok(run(*migrate_args(world, tmp_path)))
    ok(run("verify", work, "--sample", N))
    path = str(work / "index.obi")
    index = OnlineBackfillIndex.load(path)
    planted = int(IDS[17])
    wrong = normalize_rows(np.random.default_rng(3).normal(size=(1, D_NEW)))
    index.remove([planted])
    index.add([planted], wrong)
    index.save(path)
    result = run("verify", work, "--sample", N)
    assert result.returncode == 4, result
    assert f"id {planted}:" in result.stdout and "PROBLEM" in result.stdout
    assert sum(line.startswith("PROBLEM") for line in result.stdout.splitlines()) == 1  # only that one


def test_rollback_leaves_the_original_file_bit_for_bit_and_refuses_a_changed_one(world, tmp_path):
    import faiss

    work = tmp_path / "work"
    ok(run(*migrate_args(world, tmp_path, "--max-items", "100")))
    gallery = tmp_path / "gallery.faiss"
    before = gallery.read_bytes()
    assert before == (world["dir"] / "gallery.faiss").read_bytes()
    assert status(work)["stored_new"] == 100
    said = ok(run("rollback", work)).stdout
    assert "rolled back" in said and "SHA-256 checked" in said
    assert gallery.read_bytes() == before
    back = faiss.read_index(str(gallery))
    np.testing.assert_array_equal(faiss.vector_to_array(back.id_map), IDS)
    stored = faiss.downcast_index(back.index).reconstruct_n(0, N)
    np.testing.assert_array_equal(stored, world["old"])  # the original vectors, bit for bit
    assert os.listdir(work) == ["migration.json"]  # the live index and the job are gone
    s = status(work)
    assert s["phase"] == "rolled_back" and not s["rollback"]["possible"]
    result = run("resume", work)
    assert result.returncode == 1 and "rolled back" in result.stderr

    # A file changed after adoption cannot be the rollback point: refused, named.
    other = tmp_path / "other"
    other.mkdir()
    ok(run(*migrate_args(world, other, "--max-items", "20")))
    with open(other / "gallery.faiss", "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))  # one bit pattern changed: a file rewritten since adoption
    result = run("rollback", other / "work")
    assert result.returncode == 1 and "changed since it was adopted" in result.stderr


def test_finalize_refuses_before_the_end_then_writes_the_new_only_index(world, tmp_path):
    import faiss

    work = tmp_path / "work"
    ok(run(*migrate_args(world, tmp_path, "--max-items", "100")))
    result = run("finalize", work, "--out", tmp_path / "new.faiss")
    assert result.returncode == 1 and "still stored old" in result.stderr and not (tmp_path / "new.faiss").exists()
    ok(run("resume", work))
    result = run("finalize", work)
    assert result.returncode == 1 and "--out" in result.stderr
    said = ok(run("finalize", work, "--out", tmp_path / "new.faiss")).stdout
    assert "removed" in said and not (tmp_path / "gallery.faiss").exists()  # what rollback needed is gone
    new_only = faiss.read_index(str(tmp_path / "new.faiss"))
    assert new_only.d == D_NEW and new_only.ntotal == N
    order = np.argsort(faiss.vector_to_array(new_only.id_map))
    np.testing.assert_array_equal(faiss.vector_to_array(new_only.id_map)[order], IDS)
    stored = faiss.downcast_index(new_only.index).reconstruct_n(0, N)[order]
    np.testing.assert_allclose(stored, expected_new(world, IDS), atol=1e-6)
    assert os.listdir(work) == ["migration.json"]
    s = status(work)
    assert s["phase"] == "finalized" and s["bridge"] is None and s["progress"] == 1.0
    assert run("rollback", work).returncode == 1


# ---- Qdrant, local path mode ----------------------------------------------------------------------

def make_collection(world, path) -> dict:
    """A single-vector (unnamed, dot) collection of the old vectors; its points as read back."""
    qdrant_client = pytest.importorskip("qdrant_client")
    from qdrant_client import models

    client = qdrant_client.QdrantClient(path=str(path))
    try:
        client.create_collection("gallery", vectors_config=models.VectorParams(size=D_OLD,
                                                                               distance=models.Distance.DOT))
        client.upsert("gallery", points=[models.PointStruct(id=int(i), vector=v.tolist(), payload={"n": int(i)})
                                         for i, v in zip(IDS, world["old"])])
        return read_collection(client)
    finally:
        client.close()


def read_collection(client) -> dict:
    points, _ = client.scroll("gallery", limit=10 * N, with_vectors=True, with_payload=True)
    return {"config": client.get_collection("gallery").config.params.vectors,
            "points": {p.id: (np.asarray(p.vector if not isinstance(p.vector, dict) else p.vector[""],
                                         dtype=np.float32), p.payload) for p in points},
            "vectors": points[0].vector if points else None}


def test_qdrant_migrate_kill_resume_verify_rollback_bit_for_bit(world, tmp_path):
    import qdrant_client

    store = tmp_path / "qdrant"
    before = make_collection(world, store)
    work = tmp_path / "work"
    args = ("migrate", work, "--qdrant-path", store, "--collection", "gallery", "--embed", world["embed"],
            "--bridge", world["dir"] / "psi_rho.pt", "--batch-size", "20")
    job = start(*args, "--rate-limit", "100")
    try:
        wait_for_progress(work, 40, job)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    s = status(work)
    assert s["job"]["status"] == "killed" and s["backend"] == "qdrant"
    assert s["rollback"]["possible"] and s["rollback"]["bytes"] == s["rollback"]["points_kept"] * D_OLD * 4 > 0
    ok(run("resume", work))
    ok(run("verify", work, "--sample", N))
    said = ok(run("rollback", work)).stdout
    assert "rolled back" in said
    client = qdrant_client.QdrantClient(path=str(store))
    try:
        after = read_collection(client)
        names = after["vectors"] if isinstance(after["vectors"], dict) else {"": None}
        assert "new" not in names  # the new vector is gone from the points
    finally:
        client.close()
    assert sorted(after["points"]) == sorted(before["points"]) == sorted(IDS.tolist())
    for pid, (vector, payload) in before["points"].items():
        np.testing.assert_array_equal(after["points"][pid][0], vector)  # bit for bit
        assert after["points"][pid][1] == payload


def test_qdrant_verify_catches_a_planted_vector_and_finalize_drops_the_old_vectors(world, tmp_path):
    import qdrant_client

    store = tmp_path / "qdrant"
    make_collection(world, store)
    work = tmp_path / "work"
    ok(run("migrate", work, "--qdrant-path", store, "--collection", "gallery", "--embed", world["embed"],
           "--bridge", world["dir"] / "psi_rho.pt", "--batch-size", "40"))
    planted = int(IDS[5])
    client = qdrant_client.QdrantClient(path=str(store))
    try:
        from qdrant_client import models

        wrong = normalize_rows(np.random.default_rng(4).normal(size=(1, D_NEW)))[0]
        client.update_vectors("gallery", points=[models.PointVectors(id=planted, vector={"new": wrong.tolist()})])
    finally:
        client.close()
    result = run("verify", work, "--sample", N)
    assert result.returncode == 4 and f"id {planted}:" in result.stdout, result
    result = run("finalize", work, "--out", tmp_path / "x.faiss")
    assert result.returncode == 1 and "--out is for faiss" in result.stderr
    said = ok(run("finalize", work)).stdout
    assert "finalized" in said
    client = qdrant_client.QdrantClient(path=str(store))
    try:
        vectors = client.get_collection("gallery").config.params.vectors
        assert set(vectors) == {"new"}  # the old vector is dropped
    finally:
        client.close()
    assert status(work)["phase"] == "finalized"


# ---- the job's pause and bookkeeping (backfill_lib.backfill_job), in-process ------------------------

def small_index(n=50):
    from backfill_lib.live_index import OnlineBackfillIndex

    index = OnlineBackfillIndex(4, 4)
    index.add_old(np.arange(n), normalize_rows(np.random.default_rng(0).normal(size=(n, 4))))
    return index


def test_stop_when_stops_at_a_batch_boundary_after_the_commit(tmp_path):
    index, state = small_index(), str(tmp_path / "job.json")
    asked = []

    def stop():
        asked.append(index.n_new)
        return index.n_new >= 20

    embed = lambda ids: normalize_rows(np.ones((len(ids), 4)))  # noqa: E731
    run = run_backfill(index, embed, state, batch_size=10, show_progress=False, stop_when=stop)
    assert run.stopped and run.written == 20 and run.remaining == 30 and asked == [0, 10, 20]
    s = job_status(state)
    assert s.status == "paused" and s.cursor == 20 and s.written == 20 and s.remaining == 30 and not s.running
    run = run_backfill(index, embed, state, batch_size=10, show_progress=False)
    assert not run.stopped and run.written == 30 and index.progress == 1.0
    s = job_status(state)
    assert s.status == "finished" and s.written == 50 and s.eta_seconds == 0.0
    with pytest.raises(TypeError, match="stop_when"):
        run_backfill(small_index(), embed, str(tmp_path / "other.json"), stop_when=True)


def test_job_status_rate_and_eta_follow_the_rate_limit(tmp_path):
    index, state = small_index(), str(tmp_path / "job.json")
    embed = lambda ids: normalize_rows(np.ones((len(ids), 4)))  # noqa: E731
    run_backfill(index, embed, state, batch_size=5, rate_limit=100, max_items=20, show_progress=False)
    s = job_status(state)
    assert s.status == "stopped" and s.written == 20 and s.remaining == 30
    assert 50 < s.rate <= 105  # about the limit: 20 items in about 0.2 s
    assert s.eta_seconds == pytest.approx(30 / s.rate)
    with pytest.raises(FileNotFoundError, match="no backfill job state"):
        job_status(tmp_path / "none.json")
