"""WAD vs pseudo-labelling and labelled-only training under class distribution mismatch (CPU, ~1-2 min).

Setting (`configs/methods/wad.yaml`, the method card's CPU demo): 16-D anisotropic Gaussian
blobs, 4 known + 4 unknown classes, 5 labels per known class, an unlabelled pool of 1,200
known-class samples polluted with 1,800 unknown-class samples (mismatch 0.6); known-class test
set of 800. Teacher: a SimCLR-style MLP encoder (NT-Xent, temperature 0.5) trained without labels
on the labelled + unlabelled pool, one per seed, shared by the arms of that seed. Student: MLP
16-64-64-4, Adam 5e-4, batch 32 labelled + 32 unlabelled, 1,800 iterations in every arm.

* `supervised`: CE on the 20 labelled samples only (the "standard baseline").
* `pseudo`: the teacher's nearest-exemplar pseudo-labels on the whole pool with w = 1.
* `wad_1round`: WAD weights (top-2 margin), one round of 1,800 iterations (no selection).
* `wad`: WAD weights + 6 rounds of 300 iterations, moving the top alpha_r of the pool
  (alpha0 = 0.1, power 2) into the labelled set between rounds (the full method).

Metric: known-class test accuracy after the last iteration (no model selection). Diagnostics:
pseudo-label accuracy on the known part of the pool, mean weight of known vs unknown samples,
and how many moved samples came from unknown classes. Writes results/methods/wad.json.

Every stage trains through the one Trainer (`run_wad`: teacher stage, then one Trainer epoch per
round) in a temporary directory; the teacher stage of a seed is trained once (`train_teacher`)
and shared by that seed's arms, as each arm would train the same teacher.

    python benchmarks/demo_wad.py            # seeds 0 1 2
    python benchmarks/demo_wad.py --quick    # 1 seed, short (smoke test, no JSON)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import publish  # noqa: E402  (benchmarks/ is on sys.path)

from kdforge.methods.wad import WADConfig, build_ssl, run_wad, train_teacher  # noqa: E402
from kdforge.tasks.common import load_task_config, mean_std  # noqa: E402

RECIPE = ROOT / "configs" / "methods" / "wad.yaml"
ARMS = ("supervised", "pseudo", "wad_1round", "wad")
# The headline of the last run on the old per-task loop (tasks/common.py:fit, stateful index
# streams), kept so the move onto the one Trainer (other batch orders) can be compared with it.
BEFORE_TASK_MOVE = {
    "baseline_metric": {"mean": 78.875, "std": 1.718, "runs": [77.0, 80.375, 79.25]},
    "method_metric": {"mean": 77.042, "std": 1.502, "runs": [78.5, 77.125, 75.5]},
    "delta": -1.833,
    "paired_deltas_vs_pseudo": [1.5, -3.25, -3.75],
    "arms_mean": {"supervised": 70.917, "pseudo": 78.875, "wad_1round": 78.5, "wad": 77.042},
    "direction_holds": False,
}


def arm_overrides(arm: str, iterations: int, split: int) -> list[str]:
    """Every arm trains iterations * (split + 1) steps in all."""
    total = iterations * (split + 1)
    return {
        "supervised": ["wad.mode=supervised", f"wad.split={split}", f"iterations={iterations}"],
        "pseudo": ["wad.mode=pseudo", "wad.split=0", f"iterations={total}"],
        "wad_1round": ["wad.mode=wad", "wad.split=0", f"iterations={total}"],
        "wad": ["wad.mode=wad", f"wad.split={split}", f"iterations={iterations}"],
    }[arm]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "methods" / "wad.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = ["iterations=30", "teacher.loop.epochs=2"] if args.quick else []
    seeds = args.seeds[:1] if args.quick else args.seeds
    base = load_task_config(WADConfig, RECIPE, quick)
    start = time.time()
    data = build_ssl(base)
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    with tempfile.TemporaryDirectory(prefix="demo_wad_") as tmp:
        for seed in seeds:
            run_seed(Path(tmp) / f"seed{seed}", seed, quick, base, data, runs, start)
    wall = time.time() - start
    report = summarise(runs, seeds, wall, base, data)
    publish(report, None if args.quick else Path(args.out))


def run_seed(root: Path, seed: int, quick: list[str], base: WADConfig, data: Any,
             runs: dict[str, list[dict[str, Any]]], start: float) -> None:
    """The four arms of one seed, sharing the seed's teacher stage (trained once under `root`)."""
    teacher = train_teacher(load_task_config(WADConfig, RECIPE, [*quick, f"seed={seed}"]), data, root, quiet=True)
    for arm in ARMS:
        cfg = load_task_config(
            WADConfig,
            RECIPE,
            [*quick, f"seed={seed}", *arm_overrides(arm, base.iterations, base.wad.split)],
        )
        res = run_wad(cfg, root / arm, data, teacher, quiet=True)
        runs[arm].append(res)
        r0 = res["rounds"][0] if res["rounds"] else {}
        print(
            f"seed {seed} {arm:>11}: acc {res['acc']:.2f}  "
            f"pseudo-acc(known) {r0.get('pseudo_acc_known', 0):.1f}"
            f"  w known/unknown {r0.get('mean_w_known', 0):.3f}/{r0.get('mean_w_unknown') or 0:.3f}"
            f"  ({time.time() - start:.0f}s)",
            flush=True,
        )


def summarise(
    runs: dict[str, list[dict[str, Any]]], seeds: list[int], wall: float, cfg: WADConfig, data: Any
) -> dict[str, Any]:
    acc = {a: mean_std([r["acc"] for r in rs]) for a, rs in runs.items()}
    base, meth = acc["pseudo"], acc["wad"]
    delta = round(meth["mean"] - base["mean"], 3)
    beats_sup = meth["mean"] > acc["supervised"]["mean"]
    rounds = [r["rounds"] for r in runs["wad"]]
    moved = sum(d.get("moved", 0) for rs in rounds for d in rs)
    moved_unknown = sum(d.get("moved_unknown", 0) for rs in rounds for d in rs)
    first = [rs[0] for rs in rounds]
    w_known = mean_std([d["mean_w_known"] for d in first])
    w_unknown = mean_std([d["mean_w_unknown"] for d in first])
    paired = [round(m - b, 3) for m, b in zip(meth["runs"], base["runs"])]
    # the direction holds only if the mean gain is positive AND most seeds gain (a paired check)
    holds = delta > 0 and beats_sup and sum(p > 0 for p in paired) > len(paired) / 2
    d = cfg.data
    return {
        "method": "wad",
        "task": "semi-supervised classification under class mismatch",
        "data": (
            f"16-D Gaussian blobs: {d.num_known} known + {d.num_unknown} unknown classes, "
            f"{d.labelled_per_class} labels/class, unlabelled pool {len(data.unlabelled)} at mismatch "
            f"{d.mismatch}; known-class test {len(data.y_test)}"
        ),
        "metric": "known-class test accuracy (%), last iteration",
        "baseline": "pseudo-labelling with w = 1 (same contrastive teacher, same 1,800 iterations)",
        "baseline_metric": base,
        "method_metric": meth,
        "delta": delta,
        "seeds": list(seeds),
        "wall_time_s": round(wall, 1),
        "paper_claim": (
            "WAD (margin-weighted pseudo-labels from a contrastive teacher, growing labelled set) "
            "beats SSL baselines and labelled-only training under class distribution mismatch"
        ),
        "direction_holds": holds,
        "notes": (
            f"Per-seed WAD - pseudo deltas {paired} (direction counted as holding only if the mean delta is "
            "positive, most seeds gain and WAD beats labelled-only). "
            f"All arms: {acc['supervised']['mean']:.2f} labelled-only, "
            f"{acc['pseudo']['mean']:.2f} pseudo w=1, "
            f"{acc['wad_1round']['mean']:.2f} WAD weights (1 round), {acc['wad']['mean']:.2f} WAD + rounds. "
            f"Mean teacher weight known {w_known['mean']:.3f} vs unknown {w_unknown['mean']:.3f} samples. "
            f"Rounds moved {moved} samples into the labelled set over all seeds, {moved_unknown} of them "
            "from unknown classes (given a known-class pseudo-label). Teacher features from the "
            "deterministic view (the official code scores one random augmented view). Recipe values "
            "from the card/official code, not tuned; the blob mean separation (0.5) was picked from three "
            "candidate data settings in a one-seed exploratory run, all of which gave the same ordering "
            "of the arms (labelled-only < pseudo w=1 <= WAD 1 round, WAD + rounds ~ pseudo)."
        ),
        "wad": {
            "arms": {a: acc[a] for a in ARMS},
            "teacher_weight_known": w_known,
            "teacher_weight_unknown": w_unknown,
            "pseudo_acc_known_round1": mean_std([d["pseudo_acc_known"] for d in first]),
            "paired_deltas_vs_pseudo": paired,
            "moved_total": moved,
            "moved_unknown_total": moved_unknown,
            "rounds_seed0": rounds[0],
        },
        "before_task_move": BEFORE_TASK_MOVE,
    }


if __name__ == "__main__":
    main()
