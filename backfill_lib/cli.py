"""The ``backfill`` command: probe, fit, migrate, status, pause, resume, verify, rollback, finalize.

A thin layer over :mod:`backfill_lib.migration` built on ``click``; run ``backfill --help`` (or
``python -m backfill_lib.cli --help``) for the commands and ``backfill COMMAND --help`` for
each one's options. Errors are one line on standard error, ``Error: ...``, and the exit code
says what happened, for a scheduler to read:

====  =====================================================================
code  meaning
====  =====================================================================
0     done (or stopped at ``--max-items``; nothing to pause)
1     error (the message says what to do)
2     usage error (a bad option or argument)
3     paused: the job stopped at a batch boundary (``backfill pause`` or
      ``SIGTERM``); ``backfill resume`` goes on
4     ``verify`` found problems (each named on standard output)
====  =====================================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import click

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PAUSED, EXIT_VERIFY = 0, 1, 2, 3, 4


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _jsonable(value):
    """Dataclasses, tuples and NaN made JSON-ready (NaN and infinities become null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _duration(seconds) -> str:
    if seconds is None:
        return "unknown"
    seconds = float(seconds)
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _progress_option(f):
    return click.option("--progress/--no-progress", default=None,
                        help="Show a progress bar on standard error (default: when it is a terminal).")(f)


def _show_progress(progress) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


class _InOrder(click.Group):
    """Commands listed in the order of a migration, not alphabetically."""

    order = ("probe", "fit", "migrate", "status", "pause", "resume", "verify", "rollback", "finalize")

    def list_commands(self, ctx):
        def rank(name):
            return (self.order.index(name) if name in self.order else len(self.order)), name

        return sorted(self.commands, key=rank)


@click.group(cls=_InOrder, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Migrate a serving index to a new embedding model, online: probe, fit, migrate, and operate it.

    \b
    A typical migration:
      backfill probe sample.npz                   # is the upgrade worth it; is a bridge enough?
      backfill fit sample.npz --method psi_rho --out psi.pt
      backfill migrate work --faiss gallery.faiss --embed model.py:embed --bridge psi.pt
      backfill status work                        # progress, rate, ETA, rollback cost
      backfill pause work / backfill resume work
      backfill verify work
      backfill finalize work --out new.faiss      # or: backfill rollback work

    \b
    Exit codes:
      0  done (or stopped at --max-items; nothing to pause)
      1  error (one line on standard error: Error: ...)
      2  usage error (a bad option or argument)
      3  paused: the job stopped at a batch boundary (pause or SIGTERM); resume goes on
      4  verify found problems (each named on standard output)
    """


# ---- probe and fit -------------------------------------------------------------------------------

@cli.command()
@click.argument("sample", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the split, the half-backfilled set and the bootstrap.")
@click.option("--gallery-size", type=click.IntRange(min=1), default=None,
              help="Items to migrate (with --seconds-per-item: the projected backfill time).")
@click.option("--seconds-per-item", type=click.FloatRange(min=0), default=None,
              help="Seconds the new model takes per item.")
@click.option("--n-boot", type=click.IntRange(min=1), default=500, show_default=True,
              help="Bootstrap resamples of the gain's interval.")
@click.option("--bridge", type=click.Path(dir_okay=False), default=None,
              help="A bridge file of `backfill fit`, measured beside the closed-form bridges.")
def probe(sample, as_json, seed, gallery_size, seconds_per_item, n_boot, bridge):
    """Is the upgrade worth it, and is a bridge enough? SAMPLE.npz holds old (n, d_o), new (n, d_n), labels (n,)."""
    from .migration import load_bridge, read_sample
    from .probe import probe_upgrade

    old, new, labels = read_sample(sample)
    psi = None if bridge is None else load_bridge(bridge)
    report = probe_upgrade(old, new, labels, psi=psi, seed=seed, gallery_size=gallery_size,
                           seconds_per_item=seconds_per_item, n_boot=n_boot)
    click.echo(json.dumps(_jsonable(report), indent=1) if as_json else str(report))


@cli.command()
@click.argument("sample", type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(["procrustes", "low_rank_affine", "psi", "psi_rho"]), required=True,
              help="procrustes / low_rank_affine: closed-form adapters; psi: ψ with L_rt; psi_rho: the "
                   "metric-compatible ψ with the learnable ρ (the book's recommended method).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The bridge file to write.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of ψ's training.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimiser steps of ψ (default: the library's).")
@click.option("--tau", type=click.FloatRange(min=0, min_open=True), default=0.2, show_default=True,
              help="Temperature of L_mc (psi_rho).")
@click.option("--lam-rt", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of L_rt in the mc objective (psi_rho).")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Rank of low_rank_affine (default full).")
def fit(sample, method, out, seed, steps, tau, lam_rt, rank):
    """Fit a bridge new → old on SAMPLE.npz and write it to --out (for migrate --bridge)."""
    import numpy as np

    from .migration import fit_bridge, read_sample

    old, new, labels = read_sample(sample)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise click.BadParameter(f"the directory {folder!r} does not exist", param_hint="--out")
    bridge = fit_bridge(old, new, labels, method, seed=seed, steps=steps, tau=tau, lam_rt=lam_rt, rank=rank)
    bridge.save(out)
    said = f"fitted {method} on {len(old)} items: new {new.shape[1]} d → old {old.shape[1]} d; written to {out}"
    if method != "psi_rho":  # what these fit; L_mc fits rankings, not the cosine: measure it with the probe
        mapped = np.asarray(bridge.transform(new), dtype=np.float64)
        cos = float(np.mean(np.sum(mapped * old, axis=1) / np.maximum(np.linalg.norm(mapped, axis=1), 1e-12)))
        said += f"; mean cosine of the mapped new vectors with the old ones on the sample {cos:.3f}"
    click.echo(said + f". Measure it: backfill probe {sample} --bridge {out}")


# ---- the migration -------------------------------------------------------------------------------

def _run_and_report(migration, max_items, progress) -> int:
    run = migration.run(max_items=max_items, show_progress=_show_progress(progress))
    where = migration.workdir
    s = migration.status()
    line = (f"{run.written:,} items written in {run.seconds:.1f} s; {s['stored_new']:,} of {s['items']:,} stored new "
            f"({s['progress']:.0%})")
    if run.stopped:
        click.echo(f"paused: {line}; `backfill resume {where}` goes on", err=True)
        return EXIT_PAUSED
    if run.remaining:
        click.echo(f"stopped at --max-items: {line}; `backfill resume {where}` goes on")
        return EXIT_OK
    click.echo(f"done: {line}. Check it with `backfill verify {where}`, then `backfill finalize {where}"
               f"{' --out NEW.faiss' if migration.backend == 'faiss' else ''}` (or `backfill rollback {where}`)")
    return EXIT_OK


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False))
@click.option("--faiss", "faiss_path", type=click.Path(dir_okay=False), help="A faiss index file of old vectors.")
@click.option("--qdrant-path", type=click.Path(file_okay=False), help="The folder of a local Qdrant.")
@click.option("--qdrant-url", help="A Qdrant server's URL.")
@click.option("--collection", help="The Qdrant collection (single-vector).")
@click.option("--embed", required=True, metavar="FILE.py:FUNC",
              help="FUNC(ids: int64 array) -> (len(ids), d_new) unit-norm embeddings of the new model.")
@click.option("--bridge", type=click.Path(dir_okay=False),
              help="A bridge file of `backfill fit` (ψ, ψ + ρ or an adapter).")
@click.option("--dim-new", type=click.IntRange(min=1), default=None,
              help="The new model's dimension (default: the bridge's; required without --bridge).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Items per batch.")
@click.option("--rate-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="At most this many items per second (default: no limit).")
@click.option("--order", type=click.Choice(["random", "sequential"]), default="random", show_default=True,
              help="Backfill order: random (seeded) or ascending ids.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random order.")
@click.option("--max-items", type=click.IntRange(min=1), default=None,
              help="Stop after about this many items (whole batches); resume goes on.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="faiss: save the live index every this many batches (each save writes the whole index).")
@click.option("--new-vector", default="new", show_default=True, help="Qdrant: the name of the new vector.")
@click.option("--calibration", type=click.Choice(["none", "znorm", "neighbours"]), default="none", show_default=True,
              help="Serve the calibrated merge: a label-free score map per space, fitted on a sample of the index.")
@_progress_option
def migrate(workdir, faiss_path, qdrant_path, qdrant_url, collection, embed, bridge, dim_new, batch_size, rate_limit,
            order, seed, max_items, checkpoint_every, new_vector, calibration, progress):
    """Adopt the index that serves and run the resumable backfill job; its files go to WORKDIR.

    The faiss file is never written (it is the rollback point); a Qdrant collection gets the
    new named vector in place. Exit 3 when paused.
    """
    from .migration import Migration

    migration = Migration.create(workdir, embed, faiss_path=faiss_path, qdrant_path=qdrant_path,
                                 qdrant_url=qdrant_url, collection=collection, bridge=bridge, dim_new=dim_new,
                                 batch_size=batch_size, rate_limit=rate_limit, order=order, seed=seed,
                                 checkpoint_every=checkpoint_every, new_vector=new_vector, calibration=calibration)
    return _run_and_report(migration, max_items, progress)


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False))
@click.option("--max-items", type=click.IntRange(min=1), default=None,
              help="Stop after about this many items (whole batches).")
@_progress_option
def resume(workdir, max_items, progress):
    """Go on with the job of WORKDIR after a pause, a kill or --max-items. Exit 3 when paused again."""
    from .migration import Migration

    return _run_and_report(Migration.open(workdir), max_items, progress)


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False))
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the job has stopped.")
@click.option("--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Seconds to wait at most.")
def pause(workdir, wait, timeout):
    """Ask the running job of WORKDIR to stop at its next batch boundary (that job exits with 3)."""
    from .migration import Migration

    migration = Migration.open(workdir)
    if not migration.request_pause(wait=wait, timeout=timeout):
        click.echo(f"no job is running on {migration.workdir}: nothing to pause")
        return EXIT_OK
    s = migration.status()
    click.echo(f"{'paused' if wait else 'pause asked'}: {s['stored_new']:,} of {s['items']:,} items stored new "
               f"({s['progress']:.0%}); `backfill resume {migration.workdir}` goes on")
    return EXIT_OK


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(workdir, as_json):
    """Progress, items, rate, ETA, the bridge and calibration attached, and what rollback costs."""
    from .migration import Migration

    s = Migration.open(workdir).status()
    if as_json:
        click.echo(json.dumps(_jsonable(s), indent=1))
        return EXIT_OK
    target = s["target"].get("faiss") or (f"collection {s['target']['collection']!r} at "
                                          f"{s['target']['qdrant_path'] or s['target']['qdrant_url']}")
    lines = [f"migration {s['workdir']} ({s['backend']}: {target}): {s['phase'].replace('_', ' ')}",
             f"  items: {s['items']:,}; stored new {s['stored_new']:,}, stored old {s['stored_old']:,} "
             f"({s['progress']:.1%})"]
    job = s["job"]
    if job is not None:
        rate = "unknown" if job["rate"] is None else f"{job['rate']:.1f} items/s"
        lines.append(f"  job: {job['status']}; {job['written']:,} written in {_duration(job['seconds'])}; rate {rate}; "
                     f"ETA {_duration(job['eta_seconds'])}" + (f"; error: {job['error']}" if job["error"] else ""))
    elif s["phase"] == "migrating":
        lines.append("  job: not started")
    if s["pause_requested"]:
        lines.append("  a pause is requested")
    b = s["bridge"]
    if s["phase"] != "migrating":
        lines.append("  bridge: none (dropped)" if s["phase"] == "finalized" else "  bridge: none")
    elif b is None:
        lines.append("  bridge: none (queries for the items stored old must come from the old model)")
    else:
        lines.append(f"  bridge: {b['kind']} ({b['dim_new']} d → {b['dim_old']} d, {b['file']}): {b['serves']}")
    lines.append(f"  calibration: {s['calibration']['text']}")
    text = s["rollback"]["text"]
    lines.append(f"  {text}" if text.startswith(("rollback", "no rollback")) else f"  rollback: {text}")
    if s.get("live_index"):
        lines.append(f"  live index: {s['live_index']['file']} ({s['live_index']['bytes']:,} bytes)")
    if s.get("finalized"):
        lines.append(f"  {s['finalized']['text']}")
    click.echo("\n".join(lines))
    return EXIT_OK


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False))
@click.option("--sample", type=click.IntRange(min=0), default=100, show_default=True,
              help="Items stored new re-embedded and compared (and items stored old compared with the original).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the samples.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest 1 - cosine accepted between a stored new vector and its re-embedding.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(workdir, sample, seed, tolerance, as_json):
    """Every id exactly once and in the right part; a sample re-embedded and compared. Exit 4 on a problem."""
    from .migration import Migration

    report = Migration.open(workdir).verify(sample=sample, seed=seed, tolerance=tolerance)
    if as_json:
        click.echo(json.dumps(_jsonable({"ok": report.ok, **dataclasses.asdict(report)}), indent=1))
    else:
        checked = ", ".join(f"{k} {v}" for k, v in report.checked.items())
        click.echo(f"checked: {checked}")
        for problem in report.problems:
            click.echo(f"PROBLEM: {problem}")
        click.echo("ok: no problem found" if report.ok else f"{len(report.problems)} problem(s) found")
    return EXIT_OK if report.ok else EXIT_VERIFY


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False))
def rollback(workdir):
    """Back to before the migration: the faiss file untouched / the Qdrant new vector dropped."""
    from .migration import Migration

    click.echo(Migration.open(workdir).rollback())
    return EXIT_OK


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="faiss: where to write the new-only index (required; must not exist).")
@click.option("--keep-original", is_flag=True, help="faiss: keep the original file (default: removed).")
def finalize(workdir, out, keep_original):
    """Drop the bridge and the old part once every item is stored new; rollback is then no longer possible."""
    from .migration import Migration

    click.echo(Migration.open(workdir).finalize(out=out, keep_original=keep_original))
    return EXIT_OK


# ---- the entry point -----------------------------------------------------------------------------

def _command_of(argv) -> str:
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words and words[0] in cli.commands else ""


def main(argv=None) -> None:
    """Run the ``backfill`` command (the console script) and exit with its code.

    Parameters
    ----------
    argv : list of str, optional
        The arguments; default ``sys.argv[1:]``.

    Raises
    ------
    SystemExit
        Always, with the exit code (see the module docstring). Set ``BACKFILL_DEBUG=1`` to
        see the traceback of an unexpected error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = cli.main(args=argv, prog_name="backfill", standalone_mode=False)
    except click.UsageError as exc:
        command = _command_of(argv)
        click.echo(f"Error: {_one_line(exc.format_message())} (see `backfill {command + ' ' if command else ''}"
                   "--help`)", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"Error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code if exc.exit_code not in (0, None) else EXIT_ERROR)
    except click.Abort:
        click.echo("Error: interrupted", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # one line, never a trace from deep inside faiss, torch or qdrant
        if os.environ.get("BACKFILL_DEBUG"):
            raise
        from .migration import MigrationError

        known = isinstance(exc, (MigrationError, ValueError, TypeError, RuntimeError, OSError))
        message = _one_line(exc) if known else f"{type(exc).__name__}: {_one_line(exc)}"
        click.echo(f"Error: {message or type(exc).__name__}", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
