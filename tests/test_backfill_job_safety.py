"""The backfill job never loses an item (issue 16): the index is the source of truth.

Two jobs on one state file, a state file of another index or plan, ``add_old`` after the plan,
a damaged position, paths that overwrite each other, a real ``SIGKILL`` and a resume, and the
rest of the job's arguments. Every test here failed on the job before this change, except
where its docstring says it pins behaviour that already held.
"""

from __future__ import annotations

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

from backfill_lib.backfill_job import _RayEmbedder, run_backfill
from backfill_lib.live_index import OnlineBackfillIndex
from backfill_lib.validation import normalize_rows
from test_backfill_job import D, N, TESTS, Recorder, check_done, make_index, new_vector

quiet = dict(show_progress=False)


def state_of(path) -> dict:
    return json.loads(open(path).read())


def edit_state(path, **changes) -> None:
    state = state_of(path)
    for key, value in changes.items():
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
    with open(path, "w") as f:
        json.dump(state, f)


# ---- real processes: a running job holds its state file; a kill at any moment loses nothing ------

CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from backfill_lib.backfill_job import run_backfill
    from test_backfill_job import make_index, new_vector
    state, ckpt, stall_at, every, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    index, ids = make_index()
    def embed(batch):
        if stall_at and index.n_new >= stall_at:
            open(state + ".marker", "w").close()
            time.sleep(120)  # holds the job (and its lock) until the test kills it
        return new_vector(batch)
    run_backfill(index, embed, state, batch_size=25, checkpoint_path=ckpt, checkpoint_every=every,
                 rate_limit=rate if rate > 0 else None, show_progress=False)
""")


def start_child(tmp_path, state, ckpt, stall_at=0, every=1, rate=0.0):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=TESTS))
    return subprocess.Popen([sys.executable, str(script), str(state), str(ckpt), str(stall_at), str(every), str(rate)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(child, ready, what):
    deadline = time.monotonic() + 60
    while not ready():
        assert child.poll() is None, f"the child process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def kill(child):
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait()


def test_a_second_job_on_a_state_file_in_use_is_refused_until_the_first_is_killed(tmp_path):
    state, ckpt = tmp_path / "job.json", tmp_path / "index.obi"
    first = start_child(tmp_path, state, ckpt, stall_at=100)
    try:
        wait_for(first, (tmp_path / "job.json.marker").exists, "the first job stalled")
        # A second process on the same state file (another checkpoint): refused, nothing written.
        second = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import sys; sys.path.insert(0, {TESTS!r})
            from backfill_lib.backfill_job import run_backfill
            from test_backfill_job import make_index, new_vector
            index, ids = make_index()
            try:
                run_backfill(index, new_vector, {str(state)!r}, checkpoint_path={str(tmp_path / 'other.obi')!r},
                             show_progress=False)
            finally:
                print("progress", index.progress)
        """)], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=60)
        assert second.returncode != 0
        assert "RuntimeError: another backfill job is running on the state file" in second.stderr
        assert str(state) in second.stderr and "progress 0.0" in second.stdout
        assert not (tmp_path / "other.obi").exists()
        # This process too, by another spelling of the state file, or on the same checkpoint.
        index, ids = make_index()
        (tmp_path / "sub").mkdir()
        with pytest.raises(RuntimeError, match="another backfill job is running on the state file"):
            run_backfill(index, new_vector, tmp_path / "sub" / ".." / "job.json", **quiet)
        with pytest.raises(RuntimeError, match="another backfill job is running on the checkpoint .*index.obi"):
            run_backfill(index, new_vector, tmp_path / "mine.json", checkpoint_path=ckpt, **quiet)
        assert index.progress == 0.0 and not (tmp_path / "mine.json").exists()
        assert first.poll() is None  # the first job was not disturbed
    finally:
        kill(first)  # SIGKILL: no clean-up runs; the OS releases the lock
    index = OnlineBackfillIndex.load(ckpt)
    assert index.progress == 100 / N and state_of(state)["cursor"] == 100
    run = run_backfill(index, new_vector, state, checkpoint_path=ckpt, batch_size=25, **quiet)
    assert run.written == N - 100 and run.skipped == 0 and run.remaining == 0
    check_done(index, ids)
    check_done(OnlineBackfillIndex.load(ckpt), ids)


@pytest.mark.parametrize("every", [1, 3])
def test_sigkill_at_an_arbitrary_moment_then_resume_stores_every_item_new_once(tmp_path, every):
    """Pins what already held (the kill lands wherever the running job is, no stall)."""
    state, ckpt = tmp_path / "job.json", tmp_path / "index.obi"
    child = start_child(tmp_path, state, ckpt, every=every, rate=1500.0)
    try:
        wait_for(child, lambda: state.exists() and state_of(state)["cursor"] >= 150, "the job passed 150 items")
    finally:
        kill(child)
    index = OnlineBackfillIndex.load(ckpt)
    cursor = state_of(state)["cursor"]
    assert 150 <= cursor < N and index.n_new >= cursor  # the position is never ahead of the checkpoint
    before = index.new_ids()
    writes = []
    real = index.backfill
    index.backfill = lambda ids, vectors: (writes.append(np.asarray(ids)), real(ids, vectors))
    run = run_backfill(index, new_vector, state, checkpoint_path=ckpt, batch_size=25, **quiet)
    written = np.concatenate(writes)
    assert not np.isin(written, before).any() and len(written) == len(np.unique(written)) == run.written
    assert run.written + len(before) == N and run.remaining == 0
    ids = np.arange(N) * 7 + 3
    check_done(index, ids)
    check_done(OnlineBackfillIndex.load(ckpt), ids)


# ---- the index, not the position, says what is left ---------------------------------------------

def test_a_restart_on_an_index_older_than_the_position_writes_the_rest(tmp_path):
    # What two jobs on one state file and checkpoint left behind: a position at the end and a
    # checkpoint with most items still old. The old job reported remaining 0 and wrote nothing.
    index, ids = make_index()
    state, ckpt = tmp_path / "job.json", tmp_path / "index.obi"
    run_backfill(index, new_vector, state, batch_size=50, checkpoint_path=ckpt, max_items=150, **quiet)
    shutil.copy(ckpt, tmp_path / "at150.obi")
    run_backfill(index, new_vector, state, batch_size=50, checkpoint_path=ckpt, **quiet)
    assert state_of(state)["cursor"] == N
    older = OnlineBackfillIndex.load(tmp_path / "at150.obi")
    with pytest.warns(RuntimeWarning, match="350 item.* before the saved position .* still stored old"):
        run = run_backfill(older, new_vector, state, batch_size=50, **quiet)
    assert run.written == N - 150 and run.remaining == 0
    check_done(older, ids)


def test_a_hand_edited_position_at_the_end_does_not_skip_items(tmp_path):
    index, ids = make_index(100)
    state = tmp_path / "job.json"
    run_backfill(index, new_vector, state, batch_size=10, max_items=30, **quiet)
    edit_state(state, cursor=100)
    with pytest.warns(RuntimeWarning, match="70 item"):
        run = run_backfill(index, new_vector, state, batch_size=10, **quiet)
    assert run.written == 70 and run.remaining == 0 and state_of(state)["cursor"] == 100
    check_done(index, ids)


def test_remaining_is_counted_in_the_index(tmp_path):
    # An item written early is put back old (removed and re-added) while the job runs: the run
    # must not report remaining 0. A second run writes it.
    index, ids = make_index(60)
    state = tmp_path / "job.json"
    first_batch = []

    def embed(batch):
        if not first_batch:
            first_batch.extend(batch)
        elif index.n_new == 40:
            index.remove([first_batch[0]])
            index.add_old([first_batch[0]], normalize_rows(np.ones((1, D))))
        return new_vector(batch)

    run = run_backfill(index, embed, state, batch_size=10, **quiet)
    assert run.remaining == 1 and index.old_ids().tolist() == [first_batch[0]]
    with pytest.warns(RuntimeWarning, match="1 item.* before the saved position"):
        run = run_backfill(index, new_vector, state, batch_size=10, **quiet)
    assert run.written == 1 and run.remaining == 0
    check_done(index, ids)


def test_an_item_removed_during_the_run_is_skipped(tmp_path):
    index, ids = make_index(60)
    order = ids[np.random.default_rng(1).permutation(60)]

    def embed(batch):
        if index.n_new == 20 and order[45] in index.old_ids():
            index.remove([order[45]])  # the service deletes an item the job has not reached yet
        return new_vector(batch)

    run = run_backfill(index, embed, tmp_path / "job.json", order=order, batch_size=10, **quiet)
    assert run.written == 59 and run.skipped == 1 and run.remaining == 0
    check_done(index, np.setdiff1d(ids, [order[45]]))


# ---- a state file that is not this job's ---------------------------------------------------------

def test_a_state_file_of_another_index_is_refused(tmp_path):
    index, ids = make_index(50)
    state = tmp_path / "job.json"
    run_backfill(index, new_vector, state, batch_size=10, max_items=20, **quiet)
    # Other items (the old job reported remaining 0 and left all 50 old).
    other = OnlineBackfillIndex(D, D)
    other.add_old(ids + 1, normalize_rows(np.random.default_rng(1).normal(size=(50, D))))
    with pytest.raises(ValueError, match=r"50 item\(s\) stored old are not in the plan .*delete .*job.json"):
        run_backfill(other, new_vector, state, **quiet)
    # The same ids, other dimensions or another kind of index (the old job wrote to them).
    small = OnlineBackfillIndex(4, 4)
    small.add_old(ids, normalize_rows(np.ones((50, 4))))
    with pytest.raises(ValueError, match=r"another index, OnlineBackfillIndex \(dim_old 8, dim_new 8\), not this "
                                         r"OnlineBackfillIndex \(dim_old 4"):
        run_backfill(small, lambda b: normalize_rows(np.ones((len(b), 4))), state, **quiet)

    class OtherIndex(OnlineBackfillIndex):
        pass

    same_ids = OtherIndex(D, D)
    same_ids.add_old(ids, normalize_rows(np.ones((50, D))))
    with pytest.raises(ValueError, match="another index.*not this OtherIndex"):
        run_backfill(same_ids, new_vector, state, **quiet)
    assert other.progress == small.progress == same_ids.progress == 0.0
    run = run_backfill(index, new_vector, state, **quiet)  # its own index resumes
    assert run.written == 30
    check_done(index, ids)


def test_items_added_old_after_the_plan_are_refused_with_what_to_do(tmp_path):
    index, ids = make_index(50)
    state = tmp_path / "job.json"
    run_backfill(index, new_vector, state, batch_size=10, max_items=20, **quiet)
    late = np.array([1000, 1001, 1002])
    index.add_old(late, normalize_rows(np.ones((3, D))))
    with pytest.raises(ValueError, match=r"3 item\(s\) stored old are not in the plan .*\[1000, 1001, 1002\].*"
                                         r"added \(add_old\) after the job was planned.*delete .*job.json.* and "
                                         r".*job.json.order.npy"):
        run_backfill(index, new_vector, state, **quiet)
    assert index.n_new == 20
    os.remove(state)  # what the message says: plan again; nothing done is written again
    os.remove(str(state) + ".order.npy")
    writes = []
    real = index.backfill
    index.backfill = lambda i, v: (writes.append(np.asarray(i)), real(i, v))
    run = run_backfill(index, new_vector, state, **quiet)
    assert run.written == 33 and len(np.unique(np.concatenate(writes))) == 33
    check_done(index, np.r_[ids, late])


def test_items_added_old_during_a_run_are_reported(tmp_path):
    index, ids = make_index(40)
    state = tmp_path / "job.json"

    def embed(batch):
        if index.n_new == 20 and 999 not in index.old_ids():
            index.add_old([999], normalize_rows(np.ones((1, D))))  # should have been index.add
        return new_vector(batch)

    with pytest.warns(RuntimeWarning, match=r"1 item\(s\) stored old are not in the plan .*add_old during the run"):
        run = run_backfill(index, embed, state, batch_size=10, **quiet)
    assert run.remaining == 0 and index.old_ids().tolist() == [999]
    with pytest.raises(ValueError, match=r"1 item\(s\) stored old are not in the plan"):
        run_backfill(index, new_vector, state, **quiet)


def test_a_state_file_written_by_the_previous_job_version_is_refused(tmp_path):
    index, _ = make_index(20)
    state = tmp_path / "job.json"
    run_backfill(index, new_vector, state, batch_size=5, max_items=5, **quiet)
    edit_state(state, version=1, job_id=KeyError, index=KeyError)
    with pytest.raises(ValueError, match="another version of the backfill job .*delete"):
        run_backfill(index, new_vector, state, **quiet)


DAMAGED = {
    "cursor a string": (dict(cursor="12"), "'cursor' must be a JSON int"),
    "cursor negative": (dict(cursor=-3), r"cursor' is -3, outside \[0, 20\]"),
    "cursor beyond the order": (dict(cursor=21), r"outside \[0, 20\]"),
    "cursor a float": (dict(cursor=2.5), "'cursor' must be a JSON int"),
    "cursor a bool": (dict(cursor=True), "'cursor' must be a JSON int"),
    "cursor missing": (dict(cursor=KeyError), "the key 'cursor' is missing"),
    "job id missing": (dict(job_id=KeyError), "the key 'job_id' is missing"),
    "index fingerprint not a dict": (dict(index="faiss"), "'index' must be a JSON dict"),
    "another order length": (dict(n_order=19), "does not match its order file"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_state_file_is_refused_before_any_write(tmp_path, case):
    changes, match = DAMAGED[case]
    index, _ = make_index(20)
    state = tmp_path / "job.json"
    run_backfill(index, new_vector, state, batch_size=5, max_items=5, **quiet)
    edit_state(state, **changes)
    with pytest.raises(ValueError, match=match):
        run_backfill(index, new_vector, state, **quiet)
    assert index.n_new == 5


@pytest.mark.parametrize("case", ["a JSON list", "an order of floats", "a 2-D order", "no order file",
                                  "an order file of text"])
def test_a_state_file_or_order_file_of_the_wrong_shape_is_refused(tmp_path, case):
    index, ids = make_index(20)
    state = tmp_path / "job.json"
    order_file = str(state) + ".order.npy"
    run_backfill(index, new_vector, state, batch_size=5, max_items=5, **quiet)
    order = np.load(order_file)
    if case == "a JSON list":
        state.write_text("[1, 2]")
    elif case == "an order of floats":
        np.save(order_file, order.astype(np.float64))
    elif case == "a 2-D order":
        np.save(order_file, order[None, :])
    elif case == "no order file":
        os.remove(order_file)
    else:
        open(order_file, "w").write("0 1 2")
    with pytest.raises(ValueError, match="not a backfill (job state|order).*delete"):
        run_backfill(index, new_vector, state, **quiet)
    assert index.n_new == 5


# ---- paths and backends, refused before any work -------------------------------------------------

@pytest.mark.parametrize("state, checkpoint, match", [
    ("job.json", "job.json", "state_path and checkpoint_path are the same file"),
    ("sub/../job.json", "job.json", "state_path and checkpoint_path are the same file"),
    ("job.json", "link.json", "state_path and checkpoint_path are the same file"),
    ("job.json", "job.json.order.npy", r"the order file \(state_path \+ '.order.npy'\) and checkpoint_path"),
    ("job.json", "job.json.lock", r"the lock file \(state_path \+ '.lock'\) and checkpoint_path"),
    ("x.obi.lock", "x.obi", "state_path and the checkpoint's lock file"),
    ("job.json", "sub", "checkpoint_path .* is a directory"),
    ("sub", None, "state_path .* is a directory"),
    ("nowhere/job.json", None, "the directory of state_path .* does not exist"),
    ("job.json", "nowhere/index.obi", "the directory of checkpoint_path .* does not exist"),
])
def test_paths_that_would_overwrite_each_other_are_refused_before_any_work(tmp_path, monkeypatch, state,
                                                                            checkpoint, match):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "job.json")
    index, _ = make_index(20)
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    with pytest.raises(ValueError, match=match):
        run_backfill(index, new_vector, state, checkpoint_path=checkpoint, **quiet)
    assert index.progress == 0.0
    assert sorted(os.listdir(tmp_path)) == ["link.json", "sub"]  # no file written


@pytest.mark.parametrize("value", [5, None, 2.0])
def test_a_state_path_that_is_not_a_path_is_refused(tmp_path, value):
    index, _ = make_index(5)
    with pytest.raises(TypeError, match="state_path must be a file path"):
        run_backfill(index, new_vector, value, **quiet)


def test_checkpoint_path_for_an_index_that_cannot_save_is_refused_up_front(tmp_path):
    qdrant_client = pytest.importorskip("qdrant_client", reason="qdrant-client is not installed")
    from backfill_lib.qdrant_index import QdrantBackfillIndex

    index = QdrantBackfillIndex(qdrant_client.QdrantClient(":memory:"), "g", D, D)
    index.add_old(np.arange(60), normalize_rows(np.random.default_rng(0).normal(size=(60, D))))
    with pytest.raises(ValueError, match=r"checkpoint_path is given but the index \(QdrantBackfillIndex\) cannot be "
                                         "saved .*leave checkpoint_path=None"):
        run_backfill(index, new_vector, tmp_path / "job.json", checkpoint_path=tmp_path / "q.obi", batch_size=10,
                     **quiet)
    assert index.progress == 0.0 and not (tmp_path / "job.json").exists()
    # A Qdrant state file is refused by a faiss index of the same ids and dimensions.
    run_backfill(index, new_vector, tmp_path / "job.json", batch_size=10, max_items=10, **quiet)
    faiss_index = OnlineBackfillIndex(D, D)
    faiss_index.add_old(np.arange(60), normalize_rows(np.ones((60, D))))
    with pytest.raises(ValueError, match="another index, QdrantBackfillIndex .*collection 'g'"):
        run_backfill(faiss_index, new_vector, tmp_path / "job.json", **quiet)


# ---- embed, order, seed ---------------------------------------------------------------------------

BAD_EMBED = {
    "one row short": (lambda b: new_vector(b)[:-1], ValueError, r"embed returned 9 vectors for a batch of 10 ids"),
    "one row too many": (lambda b: new_vector(np.r_[b, 1]), ValueError, r"embed returned 11 vectors for a batch of 10"),
    "a single vector": (lambda b: new_vector(b)[0], ValueError, r"the vectors embed\(ids\) returned must be a 2-D"),
    "None": (lambda b: None, TypeError, r"the vectors embed\(ids\) returned must be an array of numbers"),
    "NaN": (lambda b: np.full((len(b), D), np.nan), ValueError, "NaN"),
    "wrong width": (lambda b: normalize_rows(np.ones((len(b), D + 1))), ValueError, "dimension 9 but 8"),
    "not unit-norm": (lambda b: 2 * new_vector(b), ValueError, "unit-norm"),
}


@pytest.mark.parametrize("case", list(BAD_EMBED))
def test_wrong_embed_output_stops_the_run_with_the_state_consistent(tmp_path, case):
    embed, error, match = BAD_EMBED[case]
    index, ids = make_index(40)
    state, ckpt = tmp_path / "job.json", tmp_path / "index.obi"
    calls = []

    def sometimes_bad(batch):
        calls.append(1)
        return embed(batch) if len(calls) == 3 else new_vector(batch)  # the third batch is wrong

    with pytest.raises(error, match=match):
        run_backfill(index, sometimes_bad, state, batch_size=10, checkpoint_path=ckpt, **quiet)
    assert index.n_new == 20 == state_of(state)["cursor"] == OnlineBackfillIndex.load(ckpt).n_new
    run = run_backfill(OnlineBackfillIndex.load(ckpt), new_vector, state, batch_size=10, **quiet)
    assert run.written == 20 and run.remaining == 0


def test_embed_raising_mid_run_leaves_a_consistent_state_both_ways_of_resuming(tmp_path):
    """Pins what already held: the position stays at the last checkpoint."""
    index, ids = make_index(100)
    state, ckpt = tmp_path / "job.json", tmp_path / "index.obi"
    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("the GPU went away")
        return new_vector(batch)

    with pytest.raises(OSError, match="GPU"):
        run_backfill(index, flaky, state, batch_size=10, checkpoint_path=ckpt, checkpoint_every=3, **quiet)
    assert index.n_new == 40 and state_of(state)["cursor"] == 30 and OnlineBackfillIndex.load(ckpt).n_new == 30
    from_disk = OnlineBackfillIndex.load(ckpt)
    shutil.copy(ckpt, tmp_path / "copy.obi")
    run = run_backfill(index, new_vector, state, batch_size=10, **quiet)  # the same process, its index
    assert (run.written, run.skipped, run.remaining) == (60, 10, 0)
    check_done(index, ids)
    os.remove(state)  # a fresh plan on the checkpoint: the index says what is left
    run = run_backfill(from_disk, new_vector, state, batch_size=10, **quiet)
    assert run.written == 70
    check_done(from_disk, ids)


def test_embed_may_return_a_list_of_rows(tmp_path):
    """Pins what already held."""
    index, ids = make_index(30)
    run = run_backfill(index, lambda b: new_vector(b).tolist(), tmp_path / "job.json", batch_size=7, **quiet)
    assert run.written == 30
    check_done(index, ids)


@pytest.mark.parametrize("order, match", [
    (lambda ids: np.r_[ids, -4], r"order holds negative ids, e.g. \[-4\]"),
    (lambda ids: np.r_[ids.astype(np.uint64), np.uint64(2**64 - 1)], "order holds ids above 9223372036854775807"),
    (lambda ids: ids.astype(np.float64), "order must be a 1-D array of integer item ids"),
    (lambda ids: ids[None, :], "order must be a 1-D array of integer item ids"),
    (lambda ids: ids.astype(bool), "order must be a 1-D array of integer item ids"),
])
def test_an_order_of_ids_the_index_cannot_hold_is_refused(tmp_path, order, match):
    index, ids = make_index(20)
    with pytest.raises(ValueError, match=match):
        run_backfill(index, new_vector, tmp_path / "job.json", order=order(ids), **quiet)
    assert index.progress == 0.0 and not (tmp_path / "job.json").exists()


def test_an_order_of_uint64_or_a_list_works(tmp_path):
    """Pins what already held."""
    for name, order in (("a", lambda ids: ids.astype(np.uint64)), ("b", lambda ids: ids[::-1].tolist())):
        index, ids = make_index(20)
        embed = Recorder()
        run_backfill(index, embed, tmp_path / f"{name}.json", order=order(ids), batch_size=6, **quiet)
        np.testing.assert_array_equal(np.concatenate(embed.batches), np.asarray(order(ids), dtype=np.int64))
        check_done(index, ids)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2**32, ValueError), (1.5, TypeError), (None, TypeError),
                                         (True, TypeError), ("0", TypeError)])
def test_a_bad_seed_is_refused(tmp_path, seed, error):
    index, _ = make_index(5)
    with pytest.raises(error, match="^seed must be an integer seed in 0 .. 2\\*\\*32 - 1"):
        run_backfill(index, new_vector, tmp_path / "job.json", seed=seed, **quiet)
    assert not (tmp_path / "job.json").exists()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rate_limit=float("nan")), ValueError, "rate_limit"),
    (dict(rate_limit=True), ValueError, "rate_limit"),
    (dict(max_items=2.5), ValueError, "max_items"),
    (dict(checkpoint_every=1.0), ValueError, "checkpoint_every"),
    (dict(embed=None), TypeError, "embed must be a function"),
])
def test_more_bad_arguments(tmp_path, kwargs, error, match):
    index, _ = make_index(5)
    args = dict(embed=new_vector, **quiet)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        run_backfill(index, state_path=tmp_path / "job.json", **args)
    assert index.progress == 0.0


def test_max_items_stops_after_whole_batches_and_resumes(tmp_path):
    """Pins what already held (the book's chapter 8 relies on whole batches)."""
    index, ids = make_index(50)
    run = run_backfill(index, new_vector, tmp_path / "job.json", batch_size=8, max_items=10, **quiet)
    assert run.written == 16 and run.remaining == 34
    run = run_backfill(index, new_vector, tmp_path / "job.json", batch_size=8, **quiet)
    assert run.written == 34 and run.remaining == 0
    check_done(index, ids)


def test_the_ray_embedder_refuses_a_wrong_number_of_rows():
    actor = _RayEmbedder(lambda: (lambda ids: new_vector(ids)[:-1]))
    with pytest.raises(ValueError, match=r"embed returned an array of shape \(2, 8\) for a batch of 3 ids"):
        actor({"id": np.array([1, 2, 3])})
    out = _RayEmbedder(lambda: new_vector)({"id": np.array([1, 2, 3])})
    assert out["vector"].shape == (3, D) and out["vector"].dtype == np.float32


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    """Pins that a failed run leaves no lock behind in its own process."""
    index, ids = make_index(20)
    with pytest.raises(ValueError, match="unit-norm"):
        run_backfill(index, lambda b: 2 * new_vector(b), tmp_path / "job.json", checkpoint_path=tmp_path / "i.obi",
                     **quiet)
    run = run_backfill(index, new_vector, tmp_path / "job.json", checkpoint_path=tmp_path / "i.obi", **quiet)
    assert run.written == 20
    check_done(index, ids)
