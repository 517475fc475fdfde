"""Demo: otd against its paper's baseline, 3 seeds, same budget -> results/methods/otd.json.

Recipe: configs/methods/otd.yaml; the baseline is the same recipe with the override below. Every
run trains through the one Trainer (`kdforge.methods.otd.run_otd`) into a temporary run
directory; the six runs share one built DomainData (the data seed is fixed).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import publish  # benchmarks/ is on sys.path

from kdforge.config import TrainerConfig
from kdforge.methods.otd import OTDConfig, build_data, run_otd
from kdforge.tasks.common import load_task_config, mean_std

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "methods" / "otd.yaml"
SEEDS = [0, 1, 2]


def main() -> int:
    torch.set_num_threads(1)
    start = time.time()
    runs: dict[str, list[dict]] = {"finetune": [], "otd": []}
    trainer = TrainerConfig(device="cpu", tensorboard=False, progress=False, threads=1)
    data = build_data(load_task_config(OTDConfig, RECIPE))
    with tempfile.TemporaryDirectory(prefix="demo_otd_") as tmp:
        for seed in SEEDS:
            for arm in runs:
                cfg = load_task_config(OTDConfig, RECIPE, [f"seed={seed}", f"otd.arm={arm}"])
                r = run_otd(cfg, Path(tmp) / f"{arm}_{seed}", data=data, trainer=trainer)
                runs[arm].append(r)
                print(arm, seed, r, flush=True)
    base = mean_std([r["target_top1"] for r in runs["finetune"]])
    meth = mean_std([r["target_top1"] for r in runs["otd"]])
    delta = round(meth["mean"] - base["mean"], 3)
    out = {
        "method": "otd", "task": "taxonomy-adaptive domain adaptation (kdforge.tasks.domain)",
        "data": "procedural_cifar 6 classes 16px: source = 4 old classes x 200; target (channel-rotated, "
        "low-contrast, posterised) = 4 old + 2 new classes, 5 labelled shots/class, 60 unlabelled/class, "
        "100 test/class",
        "metric": "target-domain test top-1 (%) over old + new classes",
        "baseline": "source + few-target supervised fine-tuning (no mixing, no OTD), same loop/budget",
        "baseline_metric": base, "method_metric": meth, "delta": delta, "seeds": SEEDS,
        "wall_time_s": round(time.time() - start, 1),
        "paper_claim": "OTD improves target old- and new-class recognition over TADA baselines",
        "direction_holds": bool(delta > 0),
        "target_old_top1": {a: mean_std([r["target_old_top1"] for r in runs[a]]) for a in runs},
        "target_new_top1": {a: mean_std([r["target_new_top1"] for r in runs[a]]) for a in runs},
        "target_macro_f1": {a: mean_std([r["target_macro_f1"] for r in runs[a]]) for a in runs},
        "notes": (
            "Card constants (grad weight 1000, mix CE 0.1, EMA 0.95, 98% energy, navigation 0.1 on the head "
            "weight, 1 warm-up epoch; few-shot target CE weight 1.0 in both arms), not tuned (no validation "
            "split). The head-gradient statistic losses stay tiny (l_dom, l_cls ~1e-4 even after x1000), the "
            "cross-class stream matches only scalar means of projected rows, and the mixed batches carry "
            "pseudo-labels from the warm-up model (label noise, and mixed images are source-dominated), so at "
            "this scale OTD's extra terms mostly act as noisy extra supervision; see target_old/new_top1. Trained "
            "through the one Trainer since issue 10: batches are pure functions of (seed, epoch, step), so the "
            "draws differ from the old loop's (before_task_move); given the old draws the Trainer reproduces the "
            "old loop (finetune weights bitwise, OTD within 3e-7 over 3 epochs). Over seeds 0-7 the OTD arm gives "
            "45.7 +- 4.2 % with the old draws and 42.5 +- 4.3 % with the new ones (finetune 52.3 +- 3.9)."
        ),
    }
    previous = ROOT / "results" / "methods" / "otd.json"
    if previous.is_file():      # the numbers of the pre-Trainer loop (issue 10), kept for comparison
        before = json.loads(previous.read_text()).get("before_task_move")
        if before:
            out["before_task_move"] = before
    publish(out, previous, full=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
