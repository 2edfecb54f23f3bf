"""The backfill job: order, batches, rate limit, resume after a kill, Qdrant and Ray Data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from backfill_lib.backfill import backfill_order
from backfill_lib.backfill_job import run_backfill, run_backfill_ray
from backfill_lib.live_index import OnlineBackfillIndex
from backfill_lib.validation import normalize_rows

TESTS = os.path.dirname(os.path.abspath(__file__))
N, D = 500, 8


def new_vector(ids) -> np.ndarray:
    """The 'new model': a fixed random unit vector per id (drawn with the id as seed), so a wrong
    or repeated write shows."""
    return normalize_rows(np.stack([np.random.default_rng(int(i)).normal(size=D) for i in np.asarray(ids)]))


def make_index(n=N) -> tuple[OnlineBackfillIndex, np.ndarray]:
    ids = np.arange(n) * 7 + 3
    index = OnlineBackfillIndex(D, D)
    index.add_old(ids, normalize_rows(np.random.default_rng(0).normal(size=(n, D))))
    return index, ids


class Recorder:
    """An embed function that records every batch it is asked for."""

    def __init__(self):
        self.batches = []

    def __call__(self, ids):
        self.batches.append(np.asarray(ids).copy())
        return new_vector(ids)


def check_done(index, ids):
    """Every item stored new exactly once (ids, parts), each with its own new vector."""
    ids = np.sort(np.asarray(ids))
    assert index.progress == 1.0 and index.n_old == 0 and index.ntotal == len(ids)
    assert len(index.old_ids()) == 0
    np.testing.assert_array_equal(index.new_ids(), ids)
    scores, got = index.search(new_vector(ids), 1)
    np.testing.assert_array_equal(got[:, 0], ids)  # each item is the best match of its own new vector,
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)  # with score 1: it holds exactly that vector
    _, everything = index.search(new_vector(ids[:2]), len(ids))
    for row in everything:  # a merged search sees every item exactly once
        np.testing.assert_array_equal(np.sort(row), ids)


def test_writes_everything_once_in_the_given_order_and_batch_size(tmp_path):
    index, ids = make_index()
    order = ids[backfill_order(N, seed=3, policy="uncertain_first", uncertainty=np.sin(ids))]
    embed = Recorder()
    run = run_backfill(index, embed, tmp_path / "job.json", order=order, batch_size=64, show_progress=False)
    assert run.written == N and run.remaining == 0 and run.skipped == 0
    np.testing.assert_array_equal(np.concatenate(embed.batches), order)
    assert [len(b) for b in embed.batches] == [64] * 7 + [N - 7 * 64]
    check_done(index, ids)
    assert json.loads((tmp_path / "job.json").read_text())["cursor"] == N


def test_default_order_is_random_with_its_seed(tmp_path):
    firsts = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        index, ids = make_index()
        embed = Recorder()
        run_backfill(index, embed, tmp_path / f"{name}.json", seed=seed, batch_size=50, show_progress=False)
        firsts.append(np.concatenate(embed.batches))
    np.testing.assert_array_equal(firsts[0], firsts[1])
    assert not np.array_equal(firsts[0], firsts[2])
    assert not np.array_equal(firsts[0], np.sort(firsts[0]))


def test_stopped_at_40_percent_resumes_without_losing_or_rewriting(tmp_path):
    index, ids = make_index()
    state, ckpt = tmp_path / "job.json", tmp_path / "index.obi"
    first = Recorder()
    run = run_backfill(index, first, state, batch_size=50, checkpoint_path=ckpt, max_items=200, show_progress=False)
    assert run.written == 200 and index.progress == 0.4
    # The process 'dies': only the checkpoint and the state survive.
    index = OnlineBackfillIndex.load(ckpt)
    assert index.progress == 0.4
    second = Recorder()
    run = run_backfill(index, second, state, batch_size=50, checkpoint_path=ckpt, show_progress=False)
    assert run.written == 300 and run.skipped == 0
    done = np.concatenate(first.batches + second.batches)
    assert len(np.unique(done)) == N == len(done)
    check_done(index, ids)


# ---- a child process killed with SIGKILL during a batch ------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    import backfill_lib.backfill_job as job
    from test_backfill_job import make_index, new_vector
    state, ckpt, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    index, ids = make_index()
    log = open(state + ".embedded", "a")
    def stall():
        open(state + ".marker", "w").close()
        time.sleep(120)
    def embed(batch):
        log.write(" ".join(map(str, batch)) + "\\n"); log.flush()
        if mode == "embedding" and index.n_new >= 200:
            stall()  # killed while the 5th batch is being embedded
        return new_vector(batch)
    if mode == "between":
        real_write_state = job._write_state
        def write_state(path, order, cursor, *args, **extra):
            if cursor >= 250:
                stall()  # killed after the checkpoint of batch 5 is saved, before its position is
            real_write_state(path, order, cursor, *args, **extra)
        job._write_state = write_state
    job.run_backfill(index, embed, state, batch_size=50, checkpoint_path=ckpt, show_progress=False)
""")


@pytest.mark.parametrize("mode, progress_at_kill", [("embedding", 0.4), ("between", 0.5)])
def test_job_killed_during_a_batch_resumes_from_the_state_before_or_after(tmp_path, mode, progress_at_kill):
    state, ckpt = str(tmp_path / "job.json"), str(tmp_path / "index.obi")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=TESTS))
    child = subprocess.Popen([sys.executable, str(script), state, ckpt, mode], env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(state + ".marker"):
            assert child.poll() is None, "the child process ended before the kill"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    index = OnlineBackfillIndex.load(ckpt)
    assert index.progress == progress_at_kill
    assert json.loads(open(state).read())["cursor"] == 200  # the position never runs ahead of the index
    done_before = index.new_ids()
    writes = []
    real_backfill = index.backfill
    index.backfill = lambda ids, vectors: (writes.append(np.asarray(ids)), real_backfill(ids, vectors))
    run = run_backfill(index, new_vector, state, batch_size=50, checkpoint_path=ckpt, show_progress=False)
    written = np.concatenate(writes)
    assert run.skipped == (50 if mode == "between" else 0)
    assert not np.isin(written, done_before).any()  # nothing durable is written twice
    assert len(written) + len(done_before) == N == len(np.union1d(written, done_before))
    check_done(index, np.arange(N) * 7 + 3)
    check_done(OnlineBackfillIndex.load(ckpt), np.arange(N) * 7 + 3)


def test_rate_limit_slows_the_job_down(tmp_path):
    index, _ = make_index(60)
    run = run_backfill(index, new_vector, tmp_path / "job.json", batch_size=10, rate_limit=200, show_progress=False)
    assert run.written == 60 and run.seconds >= 60 / 200 - 0.01


def test_bad_embed_output_leaves_the_batch_unwritten(tmp_path):
    index, ids = make_index(20)
    with pytest.raises(ValueError, match="dimension"):
        run_backfill(index, lambda b: np.ones((len(b), D + 1)), tmp_path / "job.json", show_progress=False)
    assert index.progress == 0.0
    with pytest.raises(ValueError, match="unit-norm"):
        run_backfill(index, lambda b: 2 * new_vector(b), tmp_path / "job.json", show_progress=False)
    run = run_backfill(index, new_vector, tmp_path / "job.json", show_progress=False)  # fixed: resumes
    assert run.written == 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(rate_limit=-1), "rate_limit"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(max_items=0), "max_items"),
    (dict(order=np.arange(3)), "misses"),
    (dict(order=np.array([3, 3, 10, 17, 24])), r"order must not repeat: each item is backfilled once \(\[3\]"),
])
def test_bad_job_arguments(tmp_path, kwargs, match):
    index, _ = make_index(5)
    with pytest.raises(ValueError, match=match):
        run_backfill(index, new_vector, tmp_path / "job.json", show_progress=False, **kwargs)


def test_a_state_file_of_another_order_or_damaged_is_refused(tmp_path):
    index, ids = make_index(20)
    state = tmp_path / "job.json"
    run_backfill(index, new_vector, state, order=ids, max_items=5, batch_size=5, show_progress=False)
    with pytest.raises(ValueError, match="another order"):
        run_backfill(index, new_vector, state, order=ids[::-1], show_progress=False)
    state.write_text("{not json")
    with pytest.raises(ValueError, match="not a backfill job state"):
        run_backfill(index, new_vector, state, show_progress=False)
    with pytest.raises(TypeError, match="old_ids"):
        run_backfill(object(), new_vector, tmp_path / "other.json", show_progress=False)


def test_the_same_job_on_qdrant_resumes_from_the_collection(tmp_path):
    qdrant_client = pytest.importorskip("qdrant_client", reason="qdrant-client is not installed")
    from backfill_lib.qdrant_index import QdrantBackfillIndex

    ids = np.arange(120) * 5
    index = QdrantBackfillIndex(qdrant_client.QdrantClient(":memory:"), "g", D, D)
    index.add_old(ids, normalize_rows(np.random.default_rng(0).normal(size=(120, D))))
    first, second = Recorder(), Recorder()
    run_backfill(index, first, tmp_path / "job.json", batch_size=16, max_items=48, show_progress=False)
    assert index.progress == 0.4
    run = run_backfill(index, second, tmp_path / "job.json", batch_size=16, show_progress=False)
    done = np.concatenate(first.batches + second.batches)
    assert run.written == 72 and len(np.unique(done)) == 120 == len(done)
    assert index.progress == 1.0
    _, got = index.search(new_vector(ids[:5]), 1)
    np.testing.assert_array_equal(got[:, 0], ids[:5])


def make_embedder():
    return new_vector


def test_the_job_on_ray_data_local(tmp_path):
    # ray[data] is in requirements.txt, so the test command installs it. Skipped only where ray
    # is absent (an install without it); with ray present, a broken Ray Data fails here.
    ray = pytest.importorskip("ray", reason="ray is not installed (requirements.txt has it: pip install 'ray[data]')")
    import ray.data  # noqa: F401
    index, ids = make_index(300)
    state = tmp_path / "job.json"
    run_backfill(index, new_vector, state, batch_size=40, max_items=120, show_progress=False)
    # The actors import this test module (make_embedder) by name: put tests/ on their path.
    path = os.pathsep.join([TESTS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        run = run_backfill_ray(index, make_embedder, state, batch_size=40, show_progress=False)
    finally:
        ray.shutdown()
    assert run.written == 180 and run.skipped == 0
    check_done(index, ids)
