"""L2D (MLD + LED) vs the BCE-only student on procedural multi-label images, same budget (CPU, minutes).

Setting (`configs/methods/l2d.yaml`): 24 px images holding 1-3 of 6 glyph classes (label
frequencies from ~70% down to ~5% for the rarest), 2,000 training and 1,000 test images.
Teacher: convnet width 32 + query-per-class decoder head (D = 64), BCE only, trained once and
frozen. Students: convnet width 8 + the same head type (D = 32), AdamW 3e-3, cosine, 12 epochs,
batch 32; identical initialisation, batches and crop/flip views in every arm of a seed (the
views are fixed across seeds so the teacher's outputs are computed once per epoch and shared).

* `bce`: BCE (sum) only, the vanilla student (the paper's baseline row).
* `mld`: + 10 * MLD (one-vs-all sigmoid KL) only.
* `l2d`: + 10 * MLD + 100 * CD + 1000 * ID (the paper's full recipe and weights).
* `softmax_kd` (--ablation): + 10 * Hinton KD over the labels (T = 4), the "knowledge
  counteraction" comparison of the paper.

Metric: macro mAP (%) on the test split after the last epoch (no model selection), and the AP
of the rarest label. Writes results/methods/l2d.json.

    python benchmarks/demo_l2d.py               # seeds 0 1 2
    python benchmarks/demo_l2d.py --ablation    # + the softmax-KD arm
    python benchmarks/demo_l2d.py --quick       # 1 seed, 1 epoch each (smoke test, no JSON)
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

from kdforge.methods.l2d import L2DConfig, build_multilabel, run_l2d, train_teacher  # noqa: E402
from kdforge.tasks.common import load_task_config, mean_std  # noqa: E402
from kdforge.tasks.multilabel import evaluate  # noqa: E402

RECIPE = ROOT / "configs" / "methods" / "l2d.yaml"
ARM_OVERRIDES = {
    "bce": ["l2d.w_mld=0", "l2d.w_cd=0", "l2d.w_id=0"],
    "mld": ["l2d.w_cd=0", "l2d.w_id=0"],
    "l2d": [],
    "softmax_kd": ["l2d.w_mld=0", "l2d.w_cd=0", "l2d.w_id=0", "l2d.softmax_kd=10"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation", action="store_true", help="also run softmax KD over the labels")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "methods" / "l2d.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = ["teacher_train.epochs=1", "train.epochs=1"] if args.quick else []
    seeds = args.seeds[:1] if args.quick else args.seeds
    # l2d first among the distilled arms: it fills the shared teacher cache with logits and embeddings
    arms = ["bce", "l2d", "mld", *(["softmax_kd"] if args.ablation else [])]
    start = time.time()
    cfg = load_task_config(L2DConfig, RECIPE, quick)
    train, test = build_multilabel(cfg)
    work = Path(tempfile.mkdtemp(prefix="demo_l2d-"))   # every run is an ordinary run directory here
    teacher = train_teacher(cfg, work / "teacher").module.eval_model()
    teacher_eval = evaluate(teacher, test)
    print(
        f"teacher: mAP {teacher_eval['mAP']:.2f}, rare AP {teacher_eval['rare_AP']:.2f} "
        f"({time.time() - start:.0f}s)",
        flush=True,
    )
    cache: dict[int, dict[str, torch.Tensor]] = {}
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for seed in seeds:
        for arm in arms:
            res = run_l2d(
                load_task_config(L2DConfig, RECIPE, [*quick, f"seed={seed}", *ARM_OVERRIDES[arm]]),
                work / f"{arm}-seed{seed}",
                teacher,
                cache,
            )
            res = {"mAP": res["test_mAP"], "rare_AP": res["test_rare_AP"]}
            runs[arm].append(res)
            print(f"seed {seed} {arm:>10}: mAP {res['mAP']:.2f}  rare AP {res['rare_AP']:.2f}  "
                  f"({time.time() - start:.0f}s)", flush=True)
    wall = time.time() - start
    report = summarise(runs, seeds, wall, cfg, teacher_eval, len(train), len(test))
    publish(report, None if args.quick else Path(args.out))


def summarise(
    runs: dict[str, list[dict[str, Any]]],
    seeds: list[int],
    wall: float,
    cfg: L2DConfig,
    teacher: dict[str, float],
    n_train: int,
    n_test: int,
) -> dict[str, Any]:
    table = {a: {m: mean_std([r[m] for r in rs]) for m in ("mAP", "rare_AP")} for a, rs in runs.items()}
    base, meth = table["bce"]["mAP"], table["l2d"]["mAP"]
    delta = round(meth["mean"] - base["mean"], 3)
    paired = [round(m - b, 3) for m, b in zip(meth["runs"], base["runs"])]  # same seed, same start
    mld_delta = round(table["mld"]["mAP"]["mean"] - base["mean"], 3)
    led_delta = round(meth["mean"] - table["mld"]["mAP"]["mean"], 3)
    kd = ""
    if "softmax_kd" in table:
        kd = f" Softmax KD over labels: {table['softmax_kd']['mAP']['mean']:.2f}."
    d = cfg.data
    return {
        "method": "l2d",
        "task": "multi-label classification",
        "data": (
            f"procedural multi-label glyphs ({d.num_classes} labels, 1-{d.max_objects} per image, rarest "
            f"~{100 * d.rarity:.0f}% weight, {d.image_size}px, {n_train} train / {n_test} test)"
        ),
        "metric": "test mAP (%), macro over labels, last epoch",
        "baseline": "same student trained with BCE only (vanilla), same budget",
        "baseline_metric": base,
        "method_metric": meth,
        "delta": delta,
        "seeds": list(seeds),
        "wall_time_s": round(wall, 1),
        "paper_claim": (
            "L2D (one-vs-all logit KD + class-/instance-aware label-wise embedding KD) beats the "
            "vanilla student and logit/feature KD baselines on multi-label benchmarks"
        ),
        "direction_holds": delta > 0 and sum(p > 0 for p in paired) > len(paired) / 2,
        "notes": (
            f"Per-seed deltas {paired} (the direction counts as holding only if the mean delta is "
            "positive and most seeds gain). "
            f"Teacher (convnet w32, BCE) test mAP {teacher['mAP']:.2f}. "
            f"MLD alone vs BCE: {mld_delta:+.2f} mAP; "
            f"adding LED with the paper's weights (CD 100, ID 1000) on top of MLD: {led_delta:+.2f}.{kd} "
            "At this scale the LED terms dominate the loss (several times the BCE sum) and the tiny student "
            "(convnet w8, D=32) cannot match the teacher's embedding structure; in a seed-0 check on a "
            "separate validation draw (not the test split), LED at 0.1x and 0.01x the paper's weights "
            "still did not beat MLD alone, so the weights were left at the paper's values. Deviations: "
            "AdamW + cosine instead of Adam + OneCycle, a one-layer decoder head with D = 32/64 instead of "
            "ML-Decoder with D = 768, crop/flip views fixed across seeds (seeds vary initialisation and "
            "batch order)."
        ),
        "l2d": {"arms": table, "teacher": {"mAP": teacher["mAP"], "rare_AP": teacher["rare_AP"]}},
    }


if __name__ == "__main__":
    main()
