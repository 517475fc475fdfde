"""MDCS vs the same 3-expert model trained with plain CE, on procedural CIFAR-LT (CPU, minutes).

Data: procedural_cifar_lt, 20 classes (one pattern family each), 16x16 images, a balanced set
of 250 per class cut to an exponential profile with imbalance factor 100 (250 -> 2 images, 1,143
in all) or 10 (250 -> 25, 1,985); balanced test split of 100 per class.
Model: resnet8 layout, shared stem + stage 1, 3 experts with private stages 2-3 at 3/4 width and
cosine heads (s=30), for both arms. Budget: identical epochs, steps, optimiser and schedule
(the paper's SGD 0.1 Nesterov, wd 5e-4, linear warm-up, lr x0.1 steps at 1/2, 4/5 and 19/20 of the
run, scaled down from 400 epochs).

* baseline `ce_experts`: each expert trained with plain CE on the weak view (lambda = 0, no CS):
  the "without diversity / consistency" multi-expert model.
* `dl_only` (ablation, --ablation): prior-shifted CE (lambda = -0.5, 1, 2.5) on both views, no CS.
* `mdcs`: prior-shifted CE on both views + consistency self-distillation (weight 0.6, CIS).

The consistency weight ramps linearly over the whole run (--ramp-fraction 1.0), not over the
paper's first 5% (20 of 400 epochs): with cosine heads (s=30) the untrained experts make peaked
random predictions, the early KL gradient is about twice the CE gradient, and a 1-epoch ramp
stalled training (dev data, below). The fraction was chosen on a separate data instance
(--data-seed 1: other class templates and images), never on the reported test split:
15 epochs, IF 100, one seed: ce_experts 49.5, dl_only 53.6, mdcs with ramp 1/15 26.9,
8/15 53.9, 15/15 56.5.

Metric: final-epoch test top-1 of the expert average (= balanced accuracy, the test split is
balanced) and many/medium/few accuracy with the CIFAR thresholds scaled to a 250-image head
(many > 50, few < 10 training images). No model selection: the last epoch is reported.
Writes results/methods/mdcs.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdforge.methods.mdcs  # noqa: E402,F401  (registers the method)
from kdforge.config import RunConfig, load_config  # noqa: E402
from kdforge.data.transforms import normalize, to_float  # noqa: E402
from kdforge.train.build import RunData, load_data  # noqa: E402
from kdforge.train.checkpoint import atomic_write_text  # noqa: E402
from kdforge.train.longtail_metrics import many_medium_few_accuracy, scaled_shot_thresholds  # noqa: E402
from kdforge.train.trainer import Trainer  # noqa: E402

CLASSES, PER_CLASS, TEST_PER_CLASS, SIZE = 20, 250, 100, 16
VARIANTS: dict[str, list[str]] = {
    "ce_experts": ["method.args.lambdas=[0.0, 0.0, 0.0]", "method.args.cs_weight=0.0",
                   "method.args.two_views=false"],
    "dl_only": ["method.args.cs_weight=0.0"],
    "mdcs": [],
}


def make_config(variant: str, imbalance: float, seed: int, epochs: int, ramp_fraction: float = 1.0,
                data_seed: int = 0) -> RunConfig:
    """One run; both arms share everything except the method arguments of VARIANTS."""
    warm = max(1, round(epochs * 20 / 400))
    ramp = max(1.0, ramp_fraction * epochs)
    milestones = [round(epochs * f) for f in (200 / 400, 320 / 400, 380 / 400)]
    return load_config(None, [
        "data.name=procedural_cifar_lt",
        f"data.args={{imbalance_factor: {imbalance}, num_train: {CLASSES * PER_CLASS}, "
        f"num_test: {CLASSES * TEST_PER_CLASS}, num_classes: {CLASSES}, num_superclasses: {CLASSES}, "
        f"image_size: {SIZE}, seed: {data_seed}}}",
        "data.batch_size=64", "data.augment.crop_padding=2", "student.name=resnet8",
        "method.name=mdcs", f"method.args.cs_ramp_epochs={ramp}",
        "optim.lr=0.1", "optim.nesterov=true", "optim.weight_decay=5e-4",
        "schedule.name=multistep", f"schedule.milestones={milestones}", f"schedule.warmup_epochs={warm}",
        f"trainer.epochs={epochs}", f"trainer.seed={seed}", f"trainer.eval_every={epochs}",
        "trainer.tensorboard=false", "trainer.progress=false", "trainer.device=cpu",
        *VARIANTS[variant]])


@torch.no_grad()
def test_logits(trainer: Trainer, data: RunData) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E, C) expert logits and (N,) labels on the test split (the final model)."""
    net = trainer.distiller.student.eval()
    x = normalize(to_float(data.test.images), data.train.mean, data.train.std)
    return torch.cat([net(x[i:i + 500]) for i in range(0, len(x), 500)]), data.test.labels


def expert_diversity(expert_logits: torch.Tensor) -> float:
    """Mean pairwise KL between the experts' test predictions (the card's diversity measure)."""
    logp = F.log_softmax(expert_logits, dim=2)
    e = logp.shape[1]
    kls = [F.kl_div(logp[:, j], logp[:, i], log_target=True, reduction="batchmean")
           for i in range(e) for j in range(e) if i != j]
    return float(torch.stack(kls).mean())


def run_one(variant: str, imbalance: float, seed: int, args: argparse.Namespace, data: RunData,
            work: Path) -> dict[str, Any]:
    cfg = make_config(variant, imbalance, seed, args.epochs, args.ramp_fraction, args.data_seed)
    torch.manual_seed(seed)
    trainer = Trainer(cfg, work / f"{variant}_if{imbalance:g}_s{seed}", data=data, quiet=True)
    result = trainer.fit()
    logits, labels = test_logits(trainer, data)
    counts = torch.bincount(data.train.labels, minlength=data.train.num_classes).tolist()
    many, few = scaled_shot_thresholds(max(counts))
    mmf = many_medium_few_accuracy(logits.mean(dim=1), labels, counts, many, few)
    assert abs(mmf["overall"] - result["test_top1"]) < 1e-6, "expert average differs from the trainer's eval"
    out = {k: (None if isinstance(v, float) and v != v else v) for k, v in mmf.items()}   # NaN -> null
    out["diversity_kl"] = expert_diversity(logits)
    out["wall_time_s"] = result["wall_time_s"]
    print(f"{variant:>10}  IF={imbalance:<4g} seed={seed}  top1 {mmf['overall']:.2f}  many {mmf['many']:.1f}  "
          f"medium {mmf['medium']:.1f}  few {mmf['few']:.1f}  div {out['diversity_kl']:.3f}  "
          f"({result['wall_time_s']:.0f}s)", flush=True)
    return out


def stats(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "runs": values}
    return {"mean": round(statistics.mean(vals), 3), "std": round(statistics.stdev(vals), 3) if len(vals) > 1 else 0.0,
            "runs": [None if v is None else round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--ramp-fraction", type=float, default=1.0,
                        help="consistency weight ramps linearly over this fraction of the epochs")
    parser.add_argument("--data-seed", type=int, default=0, help="procedural data instance (1 = dev data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--imbalance", type=float, nargs="+", default=[100.0, 10.0])
    parser.add_argument("--ablation", action="store_true", help="also run dl_only (DL without CS)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "methods" / "mdcs.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, cpu_start = time.time(), time.process_time()
    variants = ["ce_experts", *(["dl_only"] if args.ablation else []), "mdcs"]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for imbalance in args.imbalance:
            data = load_data(make_config("mdcs", imbalance, 0, args.epochs, data_seed=args.data_seed).data, 0)
            for seed in args.seeds:
                for variant in variants:
                    res = run_one(variant, imbalance, seed, args, data, Path(tmp))
                    runs.setdefault(f"if{imbalance:g}", {}).setdefault(variant, []).append(res)
    wall = time.time() - start
    report = summarise(runs, args, variants, wall)
    report["longtail"]["cpu_time_s"] = round(time.process_time() - cpu_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("baseline_metric", "method_metric", "delta", "direction_holds")}))
    print(f"wrote {args.out} ({wall:.0f}s)")


def notes(longtail: dict[str, Any], deltas: dict[str, float], variants: list[str],
          args: argparse.Namespace) -> str:
    """What the numbers say, with the setting and the dev-data choice behind them."""
    parts = [f"{args.epochs} epochs per run on 2 shared CPU cores (the paper: 400 epochs of CIFAR-100-LT).",
             "MDCS - baseline top-1: " + ", ".join(f"{s.upper()} {d:+.2f}" for s, d in deltas.items()) + "."]
    for setting, res in longtail.items():
        groups = ", ".join(f"{g} {res['mdcs'][g]['mean']:.1f} vs {res['ce_experts'][g]['mean']:.1f}"
                           for g in ("many", "medium", "few") if res["mdcs"][g]["mean"] is not None)
        parts.append(f"{setting.upper()} group accuracy mdcs vs baseline: {groups}; expert diversity (mean "
                     f"pairwise test KL) {res['mdcs']['diversity_kl']['mean']:.2f} vs "
                     f"{res['ce_experts']['diversity_kl']['mean']:.2f}; top-1 std over seeds "
                     f"{res['mdcs']['overall']['std']:.1f} vs {res['ce_experts']['overall']['std']:.1f}.")
        if "dl_only" in variants:
            cs_gain = res["mdcs"]["overall"]["mean"] - res["dl_only"]["overall"]["mean"]
            parts.append(f"{setting.upper()} ablation: DL only {res['dl_only']['overall']['mean']:.2f}, so CS adds "
                         f"{cs_gain:+.2f} on top of DL.")
    parts.append("Reading: the diversity loss does what the card predicts (more diverse experts, higher few-shot "
                 "accuracy at IF 100) but costs much more many- and medium-shot accuracy than it gains, and the "
                 "strong view plus CS slow fitting; in 16 short epochs on ~1-2k images the plain-CE experts win "
                 "overall. Seed-to-seed spread is large, so single-run differences of several points are noise. "
                 "The paper's regime (400 epochs, 11k-20k images, ResNet-32) was out of reach here.")
    parts.append("The consistency weight ramps over the whole run instead of the paper's first 5%: with the "
                 "paper's ramp (1 epoch here) the s=30 cosine experts' peaked random early predictions gave a CS "
                 "gradient ~2x the CE gradient and training stalled (26.9% vs 49.5% for the baseline on dev "
                 "data). The ramp was chosen on a separate procedural data instance (data seed 1; ramp 1/15: 26.9, "
                 "8/15: 53.9, 15/15: 56.5, DL only 53.6); nothing was tuned on this test split. Strong view: "
                 "batched AutoAugment CIFAR-10 policy + Cutout(8 px = side/2) + own crop/flip; weak view: "
                 "crop/flip + rotation 15 deg. Few-shot is empty at IF 10 (tail 25 >= 10), as on CIFAR-100-LT IR10.")
    return " ".join(parts)


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace, variants: list[str],
              wall: float) -> dict[str, Any]:
    """The docs/extending.md schema (headline: IF=100 top-1), plus every setting and group in `longtail`."""
    longtail: dict[str, Any] = {}
    for setting, by_variant in runs.items():
        longtail[setting] = {v: {k: stats([r[k] for r in rs])
                                 for k in ("overall", "many", "medium", "few", "diversity_kl")}
                             for v, rs in by_variant.items()}
        for v, rs in by_variant.items():
            longtail[setting][v]["groups"] = {k: rs[0][k] for k in ("n_many", "n_medium", "n_few")}
    head = f"if{args.imbalance[0]:g}"
    base, meth = longtail[head]["ce_experts"]["overall"], longtail[head]["mdcs"]["overall"]
    deltas = {s: round(longtail[s]["mdcs"]["overall"]["mean"] - longtail[s]["ce_experts"]["overall"]["mean"], 3)
              for s in longtail}
    holds = all(d > 0 for d in deltas.values())
    return {
        "method": "mdcs", "task": "long-tailed classification",
        "data": (f"procedural_cifar_lt ({CLASSES} classes, {SIZE}px, head {PER_CLASS} images, "
                 f"IF {' and '.join(f'{i:g}' for i in args.imbalance)}; balanced test {TEST_PER_CLASS}/class)"),
        "metric": f"test top-1 (%) = balanced accuracy, IF={args.imbalance[0]:g} (headline); final epoch",
        "baseline": "same 3-expert resnet8 (shared stem+stage1, cosine heads), plain CE per expert, weak view",
        "baseline_metric": base, "method_metric": meth, "delta": deltas[head],
        "seeds": list(args.seeds), "wall_time_s": round(wall, 1),
        "paper_claim": ("MDCS (diversity loss + consistency self-distillation) beats multi-expert baselines on "
                        "CIFAR-100-LT; e.g. 56.1% with CS vs 50.7% without (IR100, ResNet-32)"),
        "direction_holds": holds,
        "notes": notes(longtail, deltas, variants, args),
        "longtail": {"variants": variants, "epochs": args.epochs, "deltas_overall": deltas,
                     "thresholds": "many > 50, few < 10 train images (CIFAR 100/20 scaled to a 250 head)",
                     "settings": longtail},
    }


if __name__ == "__main__":
    main()
