"""Paper scale: what a CIFAR-100 run costs, measured on THIS machine's CPU, and what it downloads.

Times one optimiser step (forward, backward, update) of the two CIFAR-100 recipes of
:data:`backfill_lib.context.PRESETS` on random CIFAR-shaped tensors (nothing is downloaded):

* ``cifar100`` (ours): CIFAR-stem ResNet-18, d = 128, linear classifier, 32-px images, SGD, batch 128;
* ``cifar100_bt2`` (BT²-like): ImageNet-stem ResNet-50, d = 128, normalised-feature classifier,
  224-px images, label smoothing 0.1, Adam, batch 128.

Each recipe runs a few warm-up steps, then a few timed steps, through the library's own training
loop (:func:`backfill_lib.training.train`, the recipe's optimiser, schedule and loss). ResNet-50 at
224 px is too slow on this CPU for its real batch of 128, so it is timed at small batches and the
seconds per step at the recipe's batch are extrapolated linearly in the batch size (the two
measured batches show how close to linear the cost is); the JSON says which numbers are measured
and which are extrapolated. Steps per epoch follow from CIFAR-100's 50,000 training images (25,000
for the old model on classes 0–49) and the training loop's dropping of the last partial batch.

No GPU number is measured here, and none is written.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/paper_scale.py [--quick]

writes ``results/paper_scale.json`` and ``results/paper_scale.md`` (about 5 minutes; ``--quick``:
one timed step each at small batches, a smoke test; ``--table results/paper_scale.json`` rebuilds
the Markdown without timing anything). ``--forward-maps`` adds the digits comparison of the two
forward maps (``MethodParams.forward_arch`` "mlp" and "fct", 3 seeds) to the JSON, keeping the
timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from backfill_lib.context import PRESETS  # noqa: E402
from backfill_lib.models import build_model  # noqa: E402
from backfill_lib.training import train  # noqa: E402

N_TRAIN = 50_000  # CIFAR-100 training images
N_OLD = 25_000  # training images of classes 0-49 (500 per class)
NUM_CLASSES = 100
#: recipe name -> (preset, image side in pixels)
RECIPES = {"cifar100": ("cifar100", 32), "cifar100_bt2": ("cifar100_bt2", 224)}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_steps(preset_name: str, image_size: int, batch: int, warmup: int, steps: int, seed: int = 0) -> dict:
    """Seconds per training step of ``preset_name``'s new model at ``batch``, on the CPU.

    Runs :func:`~backfill_lib.training.train` for one epoch over ``(warmup + steps) · batch``
    random images, timing each optimiser step through the loss function, and keeps the steps
    after the warm-up.
    """
    preset = PRESETS[preset_name]
    spec, config = preset.new, preset.train
    shape = (3, image_size, image_size)
    model = build_model(spec, shape, NUM_CLASSES, seed=seed)
    n = (warmup + steps) * batch
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
    stamps: list[float] = []
    cpu: list[float] = []

    from backfill_lib.training import cross_entropy_loss

    def loss_fn(m, x, y):  # the recipe's own objective (label smoothing included), with a time stamp per step
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        return cross_entropy_loss(m, x, y, label_smoothing=config.label_smoothing)

    from dataclasses import replace

    one_epoch = replace(config, epochs=1, batch_size=batch, warmup_epochs=0, label_smoothing=0.0)
    start = time.perf_counter()
    train(model, data, one_epoch, loss_fn=loss_fn, device="cpu", progress=False, desc=preset_name)
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    per_step, cpu_step = np.diff(stamps)[warmup:], np.diff(cpu)[warmup:]
    return {"batch": batch, "warmup_steps": warmup, "timed_steps": int(len(per_step)),
            "seconds_per_step": float(np.median(per_step)), "seconds_per_step_all": [round(float(t), 3) for t in per_step],
            "cpu_seconds_per_step": float(np.median(cpu_step)),
            "wall_seconds": round(time.perf_counter() - start, 1)}


def steps_per_epoch(n_items: int, batch: int) -> int:
    """Optimiser steps of one epoch: the training loop drops the last partial batch."""
    return n_items // batch if n_items > batch else 1


def recipe_summary(name: str, measured: list[dict]) -> dict:
    """Measured steps, the per-step cost at the recipe's batch (measured or extrapolated), epochs.

    Both clocks are carried through: wall-clock seconds (what a user of this shared CPU waits)
    and the process's CPU seconds (the compute of one thread, about what a quiet core needs).
    """
    preset_name, image_size = RECIPES[name]
    preset = PRESETS[preset_name]
    batch = preset.train.batch_size
    at_batch = [m for m in measured if m["batch"] == batch]
    if at_batch:
        wall, cpu = at_batch[0]["seconds_per_step"], at_batch[0]["cpu_seconds_per_step"]
        how = "measured at the recipe's batch"
    else:
        # per-image cost from the largest measured batch, scaled to the recipe's batch
        big = max(measured, key=lambda m: m["batch"])
        wall = big["seconds_per_step"] / big["batch"] * batch
        cpu = big["cpu_seconds_per_step"] / big["batch"] * batch
        how = f"extrapolated linearly from batch {big['batch']} (seconds per step × {batch}/{big['batch']})"
    spe_new, spe_old = steps_per_epoch(N_TRAIN, batch), steps_per_epoch(N_OLD, batch)
    epochs = preset.train.epochs
    return {
        "preset": preset_name,
        "model": preset.new.to_dict(),
        "image_size": image_size,
        "train": {k: v for k, v in vars(preset.train).items() if k != "seed"},
        "measured": measured,
        "per_image_seconds": {str(m["batch"]): round(m["seconds_per_step"] / m["batch"], 4) for m in measured},
        "batch_size": batch,
        "seconds_per_step_at_batch": {"wall": round(wall, 3), "cpu": round(cpu, 3)},
        "seconds_per_step_how": how,
        "steps_per_epoch": {"new": spe_new, "old": spe_old},
        "steps_per_epoch_note": "new: all 50,000 training images; old: the 25,000 of classes 0-49; last partial batch dropped",
        "epoch_hours_this_cpu": {"new": {"wall": round(wall * spe_new / 3600, 2), "cpu": round(cpu * spe_new / 3600, 2)},
                                 "old": {"wall": round(wall * spe_old / 3600, 2), "cpu": round(cpu * spe_old / 3600, 2)}},
        "epochs_in_preset": epochs,
        "old_plus_new_days_this_cpu": {"wall": round(wall * (spe_new + spe_old) * epochs / 86400, 1),
                                       "cpu": round(cpu * (spe_new + spe_old) * epochs / 86400, 1)},
    }


def cifar_download() -> dict:
    """What the cifar100 path downloads, from torchvision's own metadata (not downloaded here)."""
    import torchvision
    from torchvision import datasets

    return {
        "source": f"torchvision {torchvision.__version__}, datasets.CIFAR100 class attributes",
        "url": datasets.CIFAR100.url,
        "filename": datasets.CIFAR100.filename,
        "md5": datasets.CIFAR100.tgz_md5,
        "extracted_folder": datasets.CIFAR100.base_folder,
        "archive_size": "161 MB, as the CIFAR web page (https://www.cs.toronto.edu/~kriz/cifar.html) lists it "
                        "beside the same md5; torchvision's metadata holds no size, and this machine cannot "
                        "download it, so the size is not measured here",
        "pixels_bytes": (N_TRAIN + 10_000) * 3 * 32 * 32,
        "pixels_note": "60,000 images × 3,072 bytes = 184,320,000 bytes of pixels in the extracted pickles "
                       "(computed, not measured)",
        "one_variable": 'DATASET = "cifar100" in a chapter\'s first code cell (the library loads it with '
                        'load_dataset("cifar100"); the BT² recipe also needs image_size=224 and '
                        'preset=PRESETS["cifar100_bt2"])',
    }


def forward_maps(result: dict) -> str:
    """The Markdown section on the two forward maps (empty before ``--forward-maps`` ran)."""
    fm = result.get("forward_map_digits")
    if not fm:
        return ""
    rows = []
    for key, r in fm["results"].items():
        setting, arch = key.split("/")
        g, f = r["relative_gain"], r["max_negative_flip"]
        rows.append(f"| {setting} | `{arch}` | {g['mean']:.3f} ± {g['std']:.3f} | {100 * f['mean']:.1f} % ± {100 * f['std']:.1f} |")
    return f"""
## The forward map at paper scale: `MethodParams(forward_arch="fct")`

`forward_arch="fct"` replaces our forward map (an MLP) by ml-fct's two-branch transformation,
the old feature feeding both branches (no side information): pass
`ExperimentContext(..., params=MethodParams(forward_arch="fct"))`. On digits (`{fm['command']}`,
seeds {', '.join(map(str, fm['seeds']))}; ours, not the paper's):

| setting | forward map | relative gain | worst negative-flip rate |
|---|---|---|---|
""" + "\n".join(rows) + "\n"


def markdown(result: dict) -> str:
    """The Markdown note for chapter 7 (see results/paper_scale.md)."""
    m = result["machine"]
    ours, bt2 = result["recipes"]["cifar100"], result["recipes"]["cifar100_bt2"]
    dl = result["download"]
    bt2_per_image = " and ".join(f"{x['cpu_seconds_per_step'] / x['batch']:.2f} (batch {x['batch']})"
                                 for x in bt2["measured"])

    def row(name, r):
        measured = ", ".join(f"batch {x['batch']}: {x['seconds_per_step']:.2f} s (CPU {x['cpu_seconds_per_step']:.2f} s)"
                             for x in r["measured"])
        at, ep, days = r["seconds_per_step_at_batch"], r["epoch_hours_this_cpu"]["new"], r["old_plus_new_days_this_cpu"]
        kind = "measured" if r["seconds_per_step_how"].startswith("measured") else "extrapolated"
        return (f"| {name} | {r['image_size']} px | {r['batch_size']} | {measured} | "
                f"{at['wall']:.1f} s (CPU {at['cpu']:.1f} s), {kind} | {r['steps_per_epoch']['new']} | "
                f"{ep['wall']:.1f} h (CPU {ep['cpu']:.1f} h) | {r['epochs_in_preset']} | "
                f"{days['wall']:.0f} days (CPU {days['cpu']:.0f} days) |")

    return f"""# Paper scale: running CIFAR-100 (notes for chapter 7)

Made by `{result['command']}` on {result['date_utc']}. **Every time below was measured on this
project's CPU** ({m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), load average
{m['load_average_before']} before the run, shared with other jobs), with random CIFAR-shaped tensors,
never on a GPU. No GPU time is given here because none was measured; on a GPU expect far less.

## The one variable

In a chapter's first code cell, `DATASET = "cifar100"` (instead of `"digits"`) switches every model,
schedule and loader to the CIFAR-100 preset: `load_dataset("cifar100")` and `PRESETS["cifar100"]`.
For BT²'s conditions, load the images at 224 px and pass the BT² preset:

```python
data = load_dataset("cifar100", image_size=224)
ctx = ExperimentContext(data, preset=PRESETS["cifar100_bt2"])
```

In Colab: open the chapter from its *Open in Colab* badge, choose *Runtime → Change runtime type →
GPU*, run the first code cell (in Colab it installs faiss, qdrant-client and backfill_lib), set
`DATASET = "cifar100"` in the scale cell, and run the notebook. The library trains on the GPU when
there is one (`default_device()`). Checkpoints go to `$BACKFILL_CACHE` (default
`~/.cache/backfill_lib/checkpoints`), so a second run loads the trained models instead of training
again; Colab's disk is emptied when the session ends, so point `BACKFILL_CACHE` (and `BACKFILL_DATA`)
at a mounted Google Drive folder to keep them.

## What is downloaded

On first use torchvision fetches `{dl['url']}` (md5 `{dl['md5']}`, from torchvision's own
metadata): {dl['archive_size']}. Extracted into `{dl['extracted_folder']}/`, the pickles hold
{dl['pixels_bytes']:,} bytes of pixels (60,000 images × 3,072 bytes; computed). It goes to
`$BACKFILL_DATA` (default `~/.cache/backfill_lib/data`). Nothing else is downloaded: the ResNets
start from random weights.

## The two recipes

| | ours (`cifar100`) | BT²-like (`cifar100_bt2`) |
|---|---|---|
| backbone | ResNet-18, CIFAR stem (3×3 conv, stride 1, no max-pool) | ResNet-50, ImageNet stem (7×7 conv, stride 2, max-pool) |
| images | 32 px, random crop (pad 4) + flip, CIFAR mean/std | resized to 224 px + flip, ImageNet mean/std (as ml-fct and BT²) |
| embedding | d = 128 (linear layer on the pooled features) | d = 128 (same layer; BT² puts d at the last block) |
| classifier | linear with bias on the un-normalised embedding | normalised feature, no bias (BT²) |
| loss | cross-entropy | cross-entropy, label smoothing 0.1 |
| optimiser | SGD (Nesterov, momentum 0.9), lr 0.1, wd 5e-4, batch 128, cosine decay | BT²: Adam lr 1e-3 (ours: AdamW), wd 2^-15, batch 128, 5 warm-up epochs, cosine decay |
| epochs | {ours['epochs_in_preset']} (old and new model each) | {bt2['epochs_in_preset']} |

Label smoothing reaches the plain cross-entropy of the old and new models; the BCT, RA-BCT and
`bct_pseudo` objectives compute their own cross-entropy and train without it (the training loop
warns). `ExperimentContext.train_config` keeps every field of the preset's `TrainConfig`, the
label smoothing and warm-up included.

How our linear classifier was chosen: on the digits *test* split, in the library's first version,
by its effect on the rank-merge baseline; it was never validated on a validation split nor on
CIFAR-100 (see `backfill_lib/models.py`).

## Measured seconds per training step on this CPU

| recipe | images | batch | measured (median s/step) | s/step at the recipe's batch | steps/epoch (new, 50,000 images) | one epoch of the new model | epochs | old + new models |
|---|---|---|---|---|---|---|---|---|
{row('ours', ours)}
{row('BT²-like', bt2)}

Times are wall-clock seconds (what you wait), with the process's CPU time in brackets: the CPU
was shared with other jobs (load average {m['load_average_before']} on {m['cores']} cores), so wall
time exceeds CPU time; the CPU time is the better guide to a quiet core. ResNet-50 at 224 px takes
{bt2_per_image} CPU seconds per image here, so its real batch of 128 was not timed:
{bt2['seconds_per_step_how']}. The per-image CPU cost fell a little from the smaller to the larger
measured batch, so the linear extrapolation is more likely high than low. The old model trains on the 25,000 images of
classes 0–49 ({ours['steps_per_epoch']['old']} steps per epoch at batch
128); "old + new" is both models' epochs. BCT, RA-BCT and `bct_pseudo` train one more new model each
(at least the new model's time again per method; RA-BCT also runs the frozen old model on every
batch). Times are for one thread; more cores would shorten them. The heads (ψ, ρ, h) train on cached embeddings; the
embedding passes over the 60,000 images (once per model) were not timed.

In short: on this CPU one old + new pair would take {ours['old_plus_new_days_this_cpu']['cpu']:.0f} days of
compute with our recipe and {bt2['old_plus_new_days_this_cpu']['cpu']:.0f} days with the BT²-like one
(CPU time, extrapolated from the measured steps): paper scale is a GPU job.

## What to expect (reported figures, not ours)

- CIFAR-100, ResNet-50 at 224 px, old model on classes 0–49, as the BT² repository's README reports
  them (top-1 / top-5 / mAP; their BCT is the pseudo-classifier variant with α = 10): old/old
  33.6 / 55.4 / 24.4, new/new 62.7 / 74.6 / 49.9, BCT new/old 25.0 / 62.1 / 24.7 (BT² README).
- Share of the new model's gain, over four benchmarks, read through a secondary source (paper):
  distance rank merge 36–45 %, BCT 4–27 %, BiCT 16–36 %, FCT on ImageNet 62 % with side information
  and 28 % without (paper). The paper's own figures for the full method are not available here.

Our recipe differs from BT²'s (table above), so even a complete run with `cifar100` would not be a
reproduction of those numbers; `cifar100_bt2` is the closer one.
{forward_maps(result)}"""


def forward_maps_on_digits(seeds=(0, 1, 2)) -> dict:
    """``forward_transform`` on digits with each forward map (``MethodParams.forward_arch``), both settings.

    The experiment's own protocol (:func:`~backfill_lib.experiment.run_experiment`, random order,
    11 ratios); models and heads come from the checkpoint cache when they are there.
    """
    from backfill_lib.context import MethodParams
    from backfill_lib.experiment import run_experiment

    out = {"command": "OMP_NUM_THREADS=1 python benchmarks/paper_scale.py --forward-maps", "dataset": "digits",
           "seeds": list(seeds), "strategy": "forward_transform", "results": {}}
    for setting in ("homogeneous", "heterogeneous"):
        for arch in ("mlp", "fct"):
            print(f"forward_transform on digits, {setting}, forward_arch={arch} ...", flush=True)
            r = run_experiment("digits", strategies=("forward_transform",), seeds=seeds, setting=setting,
                               progress=False, params=MethodParams(forward_arch=arch))["strategies"]["forward_transform"]
            out["results"][f"{setting}/{arch}"] = {k: r[k] for k in ("relative_gain", "max_negative_flip")}
    return out


def main(argv=None) -> dict:
    """Run the benchmark and write the JSON and Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "paper_scale.json"))
    parser.add_argument("--markdown", default=str(ROOT / "results" / "paper_scale.md"))
    parser.add_argument("--quick", action="store_true", help="one timed step, small batches (smoke test)")
    parser.add_argument("--table", metavar="JSON", help="only rebuild the Markdown from this results JSON")
    parser.add_argument("--forward-maps", action="store_true",
                        help="only (re)measure forward_transform on digits with both forward maps and store it "
                             "in --out under 'forward_map_digits' (the timings are kept)")
    args = parser.parse_args(argv)
    if args.forward_maps:
        result = json.loads(Path(args.out).read_text())
        result["forward_map_digits"] = forward_maps_on_digits()
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.markdown).write_text(markdown(result))
        print(f"wrote {args.out} and {args.markdown}")
        return result
    if args.table:
        result = json.loads(Path(args.table).read_text())
        Path(args.markdown).write_text(markdown(result))
        print(f"wrote {args.markdown}")
        return result
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.manual_seed(0)
    if args.quick:
        plan = {"cifar100": [(8, 1, 1)], "cifar100_bt2": [(2, 1, 1)]}
    else:
        # (batch, warm-up steps, timed steps); ResNet-50 at 224 px: two small batches to check linearity
        plan = {"cifar100": [(128, 1, 3)], "cifar100_bt2": [(4, 1, 3), (8, 1, 2)]}
    recipes = {}
    for name, runs in plan.items():
        preset_name, image_size = RECIPES[name]
        measured = []
        for batch, warmup, steps in runs:
            print(f"{name}: batch {batch}, {warmup} warm-up + {steps} timed steps ...", flush=True)
            measured.append(time_steps(preset_name, image_size, batch, warmup, steps))
            print(f"  median {measured[-1]['seconds_per_step']:.3f} s/step", flush=True)
        recipes[name] = recipe_summary(name, measured)
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/paper_scale.py" + (" --quick" if args.quick else ""),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": {"label": "this project's 2-core CPU (shared); no GPU measured", "cpu": cpu_name(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": None if load is None else round(load, 2),
                    "torch": torch.__version__},
        "data": "random tensors of CIFAR-100's shape (3×32×32, or resized 3×224×224), 100 classes; nothing downloaded",
        "what_is_timed": "one optimiser step of the new model (forward, loss, backward, update) through "
                         "backfill_lib.training.train, median over the timed steps after warm-up; "
                         "seconds_per_step is wall-clock time (what a user waits, on a CPU shared with other "
                         "jobs), cpu_seconds_per_step the process's CPU time (the compute itself)",
        "recipes": recipes,
        "download": cifar_download(),
        "gpu": "not measured",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.markdown).write_text(markdown(result))
    print(f"wrote {args.out} and {args.markdown}")
    return result


if __name__ == "__main__":
    main()
