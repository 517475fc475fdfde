"""FerKD vs FKD (region soft labels without FerKD's label adaptation and SelfMix), same budget (CPU).

Data: procedural_cifar, 20 fine classes in 5 superclasses, 16x16, 5,000 training images (10% held
out as validation for the per-epoch curve; nothing is selected on it), 2,000 test; the split of
seed 0 is used for every run, because the soft-label bank is built once for that training set.
Teacher: resnet20 trained with CE here (cached in $KDFORGE_CACHE/demo_teachers). Student: resnet8.

Offline, once (FKD's soft-label generation): 3 bank epochs x 4 RandomResizedCrop regions
(scale 0.08-1, ratio 3/4-4/3, flip) of every training image, the teacher's softmax on each,
kept in memory and shared by all runs and seeds. Training then never runs the teacher.

* baseline `fkd`: each step replays 32 images x 4 stored regions (128 views) and fits their raw
  soft labels with soft cross-entropy (T = 1, no hard-label term), as FKD does.
* `ferkd`: the same regions and budget; per image the rho_h = 0.2 least-confident of its 12
  stored regions (teacher probability of the true class) are relabelled to the softened one-hot
  label (eps = 0.1), and SelfMix mixes each region with another region of the same image
  (CutMix, lam ~ Beta(1, 1)). rho_h/eps are the card's unverified hyper-parameters, fixed a priori.
* ablations (`--ablations`, not run by default): `adapt_only` (relabelling, no SelfMix),
  `selfmix_only` (SelfMix on raw FKD labels) and `hard` (one-hot labels on every region:
  rho_h = 1, eps = 0).

Same student init per seed, data order, regions, optimiser (SGD 0.05, momentum 0.9, wd 5e-4,
cosine) and 3 epochs (= 12 region-epochs in FKD's bookkeeping). Reported: final-model test top-1.
Also recorded: validation top-1 per epoch (convergence speed), the fraction of regions relabelled
and their mean teacher confidence on the true class. Writes results/methods/ferkd.json.

    python benchmarks/demo_ferkd.py            # 3 seeds
    python benchmarks/demo_ferkd.py --ablations  # + adapt_only, selfmix_only, hard arms
    python benchmarks/demo_ferkd.py --quick    # 1 seed, 1 epoch (smoke test, no JSON)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdforge.methods.ferkd  # noqa: E402,F401  (registers the method)
from kdforge.config import RunConfig, load_config  # noqa: E402
from kdforge.data.cache_dir import cache_dir, cache_key  # noqa: E402
from kdforge.methods.ferkd_regions import precompute_region_bank  # noqa: E402
from kdforge.models import create_model  # noqa: E402
from kdforge.train.build import load_data, load_weights  # noqa: E402
from kdforge.train.checkpoint import atomic_write_text  # noqa: E402
from kdforge.train.trainer import Trainer  # noqa: E402

DATA = ["data.name=procedural_cifar",
        "data.args={num_train: 5000, num_test: 2000, num_classes: 20, num_superclasses: 5, image_size: 16}",
        "data.val_fraction=0.1"]
TEACHER = {"name": "resnet20", "epochs": 15, "lr": 0.05}
COMMON = ["trainer.device=cpu", "trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1"]
NUM_CROPS, BANK_EPOCHS, IMAGES_PER_STEP = 4, 3, 32
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
ARMS: dict[str, dict[str, Any]] = {
    "fkd": {"adapt": False, "selfmix": False},
    "ferkd": {"adapt": True, "rho_h": 0.2, "eps": 0.1, "selfmix": True, "mix": "cutmix", "alpha": 1.0},
    "adapt_only": {"adapt": True, "rho_h": 0.2, "eps": 0.1, "selfmix": False},
    "selfmix_only": {"adapt": False, "selfmix": True, "mix": "cutmix", "alpha": 1.0},
    "hard": {"adapt": True, "rho_h": 1.0, "eps": 0.0, "selfmix": False},
}
ABLATIONS = ["adapt_only", "selfmix_only", "hard"]


def teacher_dir() -> Path:
    """Train the CE teacher once (seed 0, standard pad-crop/flip) and cache its run directory."""
    overrides = [*DATA, "data.batch_size=64", f"student.name={TEACHER['name']}", f"optim.lr={TEACHER['lr']}",
                 "schedule.name=cosine", f"trainer.epochs={TEACHER['epochs']}", "trainer.seed=0", *COMMON]
    run = cache_dir() / "demo_teachers" / f"{TEACHER['name']}-{cache_key({'o': overrides})}"
    if (run / "result.json").is_file():
        return run
    resume = (run / "checkpoints" / "last.json").is_file()    # an interrupted earlier attempt
    Trainer(load_config(None, overrides), run, resume=resume, quiet=True).fit()
    return run


def student_config(arm: str, seed: int, epochs: int, bank: Path) -> RunConfig:
    args = json.dumps({"bank": str(bank), **ARMS[arm]})
    return load_config(None, [
        *DATA, f"data.batch_size={IMAGES_PER_STEP}", "data.augment.crop_padding=0", "data.augment.flip=false",
        "student.name=resnet8", "method.name=ferkd", f"method.args={args}",
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4",
        "schedule.name=cosine", f"trainer.epochs={epochs}", f"trainer.seed={seed}", *COMMON])


def stats(values: list[float]) -> dict[str, Any]:
    return {"mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "runs": [round(v, 3) for v in values]}


DEV_NOTES = (
    "Development runs before this demo (validation split only; 20 classes / 4 superclasses, resnet20 "
    "teacher of 12 epochs, same student budget): final val top-1 FKD 32.7 (3 seeds) vs FerKD 25.0 (3), "
    "relabelling only 28.5 (3), SelfMix only 25.8 (1; Mixup instead of CutMix 26.4), one-hot labels on "
    "every region 32.0 (2); RRC scale (0.25, 1) instead of (0.08, 1): FKD 35.2 vs FerKD 29.4 (2); twice "
    "the budget (6 epochs): FKD 45.2 vs FerKD 33.0 (1). No setting tried brought FerKD level with FKD, so "
    "the card's values (rho_h 0.2, eps 0.1, SelfMix CutMix alpha 1) were kept."
)


def notes(acc: dict[str, list[float]], curve: dict[str, list[float]], crop_acc: float, teacher_acc: float,
          stats_ferkd: dict[str, Any], ablations: bool) -> str:
    """What the numbers say, why the claim may not transfer to this scale, and what was tried."""
    mean = {a: statistics.fmean(v) for a, v in acc.items()}
    delta = mean["ferkd"] - mean["fkd"]
    ahead = [f - b for f, b in zip(curve["ferkd"], curve["fkd"])]
    parts = [
        f"FerKD minus FKD: {delta:+.2f} test top-1 with the same stored regions "
        f"and budget; its mean validation curve minus FKD's per epoch is {[round(d, 2) for d in ahead]}, so "
        f"the faster-convergence claim {'holds' if min(ahead) > 0 else 'does not hold'} at this scale.",
        f"The teacher ({teacher_acc:.1f}% on full test images) is right on only {crop_acc:.1f}% of its stored "
        "RandomResizedCrop regions: in procedural_cifar the fine classes differ by pattern frequency and "
        "orientation, which the crop's zoom and aspect change, so a low-confidence region is probably "
        "often a rescaled view of the object rather than background (not measured), and the premise that "
        "the least-confident regions carry unreliable labels best replaced by the ground truth is weak. "
        f"FerKD relabelled {100 * stats_ferkd['relabelled_fraction']:.1f}% of the regions (mean teacher "
        f"confidence on the true class {stats_ferkd['relabelled_mean_conf']:.3f} vs "
        f"{stats_ferkd['kept_mean_conf']:.3f} for the kept ones).",
        "SelfMix (CutMix between two regions of one image, every step) is a strong regulariser for a resnet8 "
        "trained for 12 region-epochs, far from convergence; FKD's ImageNet recipe trains for 300 epochs.",
    ]
    if ablations:
        parts.append("Ablations (test top-1, same seeds): " + ", ".join(
            f"{a} {mean[a]:.2f}" for a in acc) + ".")
        if "hard" in mean:
            parts.append(f"One-hot labels on every region {'trail' if mean['hard'] < mean['fkd'] else 'match or beat'}"
                         " FKD's raw region labels, i.e. the teacher's region labels "
                         f"{'do' if mean['hard'] < mean['fkd'] else 'do not'} carry information the ground "
                         "truth lacks here.")
    parts.append(DEV_NOTES)
    parts.append("Not reproduced: FKD's switch to single-crop loading in the last epochs, top-k label "
                 "quantisation (labels stored in full here), the paper's ImageNet scale. Wall time was measured "
                 "on a 2-core machine shared with other jobs; the teacher is trained once and cached.")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=BANK_EPOCHS)
    parser.add_argument("--ablations", action="store_true", help=f"also run {', '.join(ABLATIONS)}")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch (smoke test, no JSON)")
    parser.add_argument("--out", default=str(ROOT / "results" / "methods" / "ferkd.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, epochs = ([0], 1) if args.quick else (args.seeds, args.epochs)
    arms = ["fkd", "ferkd"] + (ABLATIONS if args.ablations else [])
    start = time.time()
    teacher_run = teacher_dir()
    teacher_acc = json.loads((teacher_run / "result.json").read_text())["test_top1"]
    print(f"teacher {TEACHER['name']}: test top-1 {teacher_acc:.2f} ({time.time() - start:.0f}s)", flush=True)

    data = load_data(load_config(None, DATA).data, 0)     # the seed-0 split, for every run
    teacher = create_model(TEACHER["name"], num_classes=data.train.num_classes, in_channels=3)
    load_weights(teacher, teacher_run, "teacher")
    t0 = time.time()
    bank = precompute_region_bank(teacher, data.train.images, data.train.labels, data.train.num_classes,
                                  epochs=BANK_EPOCHS, num_crops=NUM_CROPS, seed=0, scale=SCALE, ratio=RATIO,
                                  mean=data.train.mean, std=data.train.std)
    bank_time = time.time() - t0
    labels = bank.labels[None, :, None].expand_as(bank.confidence)
    crop_acc = 100.0 * float((bank.probs.argmax(-1) == labels).float().mean())
    print(f"region bank: {BANK_EPOCHS}x{NUM_CROPS} regions/image, teacher top-1 on regions {crop_acc:.1f}%, "
          f"{bank_time:.0f}s", flush=True)

    acc: dict[str, list[float]] = {a: [] for a in arms}
    curves: dict[str, list[list[float]]] = {a: [] for a in arms}
    train_time: dict[str, list[float]] = {a: [] for a in arms}
    relabel: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bank_path = Path(tmp) / "bank.pt"
        bank.save(bank_path)
        for seed in seeds:
            for arm in arms:
                run = Path(tmp) / f"{arm}-{seed}"
                trainer = Trainer(student_config(arm, seed, epochs, bank_path), run, data=data, quiet=True)
                relabel.setdefault(arm, trainer.distiller.relabel_stats())
                res = trainer.fit()
                rows = list(csv.DictReader((run / "metrics.csv").open()))
                curves[arm].append([round(float(r["val_top1"]), 2) for r in rows])
                acc[arm].append(res["test_top1"])
                train_time[arm].append(res["wall_time_s"])
                print(f"seed {seed} {arm}: test top-1 {res['test_top1']:.2f}  val/epoch {curves[arm][-1]}  "
                      f"({res['wall_time_s']:.0f}s)", flush=True)
    wall = time.time() - start
    delta = statistics.fmean(acc["ferkd"]) - statistics.fmean(acc["fkd"])
    mean_curve = {a: [round(statistics.fmean(c[e] for c in curves[a]), 2) for e in range(epochs)] for a in arms}
    print(f"delta top-1 {delta:+.2f}; mean val curves {mean_curve}; relabelled "
          f"{100 * relabel['ferkd']['relabelled_fraction']:.1f}% of regions; wall {wall:.0f}s")
    if args.quick:
        return
    out = {
        "method": "ferkd", "task": "classification",
        "data": "procedural_cifar (20 classes / 5 superclasses, 16px, 4.5k train + 0.5k val, 2k test)",
        "metric": "test top-1 (%)",
        "baseline": "FKD: same stored region soft labels, no label adaptation, no SelfMix",
        "baseline_metric": stats(acc["fkd"]), "method_metric": stats(acc["ferkd"]),
        "delta": round(delta, 3), "seeds": seeds, "wall_time_s": round(wall, 1),
        "paper_claim": "FerKD beats FKD and converges faster (ImageNet R50 81.2% vs FKD 80.1%)",
        "direction_holds": bool(delta > 0),
        "extra": {
            "teacher": f"{TEACHER['name']} ({TEACHER['epochs']} epochs CE), test top-1 {teacher_acc:.2f}",
            "teacher_top1_on_stored_regions": round(crop_acc, 2),
            "student": "resnet8", "epochs": epochs, "region_epochs_fkd_bookkeeping": epochs * NUM_CROPS,
            "regions": f"{BANK_EPOCHS} bank epochs x {NUM_CROPS} RRC crops/image, scale {SCALE}, ratio 3/4-4/3",
            "bank_time_s": round(bank_time, 1),
            "student_train_time_s": {a: stats(train_time[a]) for a in arms},
            "val_top1_per_epoch_mean": mean_curve,
            "relabel_stats": {a: {k: None if v is None else round(v, 4) for k, v in relabel[a].items()}
                              for a in arms},
            "arms": {a: ARMS[a] for a in arms},
            "test_top1_per_arm": {a: stats(acc[a]) for a in arms},
            "command": "python benchmarks/demo_ferkd.py" + (" --ablations" if args.ablations else ""),
        },
        "notes": notes(acc, mean_curve, crop_acc, teacher_acc, relabel["ferkd"], args.ablations),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
