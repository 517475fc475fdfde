"""Trainer step time of this checkout vs an earlier commit (default: the last one before the Task interface).

Both code bases run the same real `Trainer` on the same run (procedural_cifar 32x32, batch 64,
resnet8x4 student; `plain` = CE only, `online` = CE 0.1 + KD 0.9 from a resnet32x4 teacher), one
CPU thread, in separate processes that take turns round-robin, so background load hits both
alike. A step is timed as the interval between the starts of consecutive `Trainer.train_step`
calls: the whole loop iteration (batch building by the task, forward, backward, optimizer step,
bookkeeping). The first steps of each process are warm-up and not counted. `pipeline` times
batch building alone (ms per batch of 64 over an epoch of the trainer's batches: the old
`Trainer.make_batch` loop vs `ClassificationTask.batches`). Ratios are
`this checkout / reference`, the median over rounds, with the per-round min and max. The last
line is ``new_vs_ref_pipeline=<r> new_vs_ref_plain=<r> new_vs_ref_online=<r>``. Writes results/trainer_vs_ref.md.

    python benchmarks/trainer_vs_ref.py                 # against 4f77757, 5 rounds of 16 steps
    python benchmarks/trainer_vs_ref.py --ref HEAD~3 --rounds 3 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import machine_description  # noqa: E402

REF = "4f77757"

CHILD = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from kdforge.config import load_config
from kdforge.train.trainer import Trainer
variant, teacher, steps, warm, out = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.set_num_threads(1)
common = ["data.args={num_train: %d, num_test: 64, image_size: 32, seed: 0}" % (64 * (steps + warm + 1)),
          "data.batch_size=64", "student.name=resnet8x4", "trainer.epochs=1", "trainer.progress=false",
          "trainer.tensorboard=false", "trainer.device=cpu", "trainer.stop_after_steps=%d" % (steps + warm)]
if variant == "online":
    common += ["teacher.name=resnet32x4", "teacher.checkpoint=" + teacher,
               "terms=[{loss: ce, teacher: null, group: task, weight: 0.1},"
               " {loss: kd, args: {temperature: 4.0}, weight: 0.9}]"]
trainer = Trainer(load_config(None, common), out, quiet=True)
if variant == "pipeline":        # batch building only: one epoch of the trainer's batches, 3 times
    from kdforge.train.trainer import epoch_order, epoch_slices
    per = []
    for epoch in range(3):
        t0 = time.perf_counter()
        if hasattr(trainer, "task"):
            n = sum(b.images.shape[0] for b in trainer.task.batches(epoch, 0, trainer.env))
        else:
            order = epoch_order(len(trainer.data.train), 0, epoch)
            slices = epoch_slices(0, trainer.steps_per_epoch, 64)
            n = sum(trainer.make_batch(i, epoch, k, x, y).images.shape[0]
                    for k, (x, y, i) in enumerate(trainer.source.epoch(order, slices)))
        per.append(1000 * (time.perf_counter() - t0) / (n / 64))
    print(json.dumps({"ms_per_step": statistics.median(per)}))
    raise SystemExit
starts = []
inner = trainer.train_step
def timed(batch):
    starts.append(time.perf_counter())
    return inner(batch)
trainer.train_step = timed
trainer.fit()
gaps = [b - a for a, b in zip(starts, starts[1:])][warm - 1:]
print(json.dumps({"ms_per_step": 1000 * statistics.median(gaps)}))
"""


def export_tree(ref: str, dest: Path) -> Path:
    """`git archive REF` unpacked into `dest` (the reference code base, without touching the checkout)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_child(tree: Path, variant: str, teacher: Path, steps: int, warm: int, work: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), variant, str(teacher), str(steps), str(warm),
                           str(out / "run")], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{tree.name} {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["ms_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=REF, help=f"git commit to compare against (default {REF})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per process")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 6 steps")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "trainer_vs_ref.md")
    args = parser.parse_args()
    rounds, steps, warm = (3, 6, 2) if args.quick else (args.rounds, args.steps, 3)
    work = Path(tempfile.mkdtemp(prefix="trainer_vs_ref-"))
    ref_tree = export_tree(args.ref, work / "ref")
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from kdforge.models import create_model

    torch.manual_seed(0)
    teacher = work / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("resnet32x4", num_classes=100).state_dict().items()},
              str(teacher))
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for variant in ("pipeline", "plain", "online"):
            for name, tree in (("ref", ref_tree), ("new", ROOT)):
                ms = run_child(tree, variant, teacher, steps, warm, work)
                times.setdefault((name, variant), []).append(ms)
                print(f"round {r + 1}/{rounds} {variant:>6} {name}: {ms:.1f} ms/step", flush=True)
    lines = [f"# Trainer step time: this checkout vs {args.ref}", "",
             *[f"- {line}" for line in machine_description(torch.device("cpu"), 1)], "",
             f"resnet8x4 student, batch 64 of 32x32, 1 thread, {rounds} rounds x {steps} timed steps per process "
             "(processes alternate ref/new).", "",
             "| variant | ref ms/step | new ms/step | new/ref median | per-round min | per-round max |",
             "|---|---|---|---|---|---|"]
    summary = []
    for variant in ("pipeline", "plain", "online"):
        ref, new = times[("ref", variant)], times[("new", variant)]
        ratios = [n / r for n, r in zip(new, ref)]
        med = statistics.median(ratios)
        lines.append(f"| {variant} | {statistics.median(ref):.1f} | {statistics.median(new):.1f} | {med:.3f} | "
                     f"{min(ratios):.3f} | {max(ratios):.3f} |")
        summary.append(f"new_vs_ref_{variant}={med:.3f}")
    text = "\n".join(lines) + "\n\n" + " ".join(summary) + "\n"
    print(text)
    if not args.quick:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
