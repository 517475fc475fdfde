"""Median ms per training step: student alone vs online KD vs KD from the teacher-output cache.

resnet32x4 (teacher) -> resnet8x4 (student), 100 classes, batch 64 of 3x32x32 procedural_cifar:

* ``plain``:  `Distiller(student, None, [ce])`: CE + SGD step, no teacher.
* ``online``: `Distiller(student, teacher, [ce, kd])`: the teacher runs forward every step.
* ``cached``: the same Distiller, with `Batch.teacher_outputs` from `TeacherCache.lookup` (the
  cache of the same teacher on the same views is built once beforehand, not timed).

A step is what `Trainer.train_step` does plus building the batch: gather + crop/flip + normalize
on the device (the cached variant takes its views from `cache.view_params` and reads the
teacher outputs with `cache.lookup`), forward, backward, SGD step. Each variant trains its own
copy of the same student; variants are timed in interleaved rounds so background load hits all
alike. The last line is ``cached_vs_plain=<c/a> online_vs_plain=<b/a>``.

    python benchmarks/step_time.py --quick
    python benchmarks/step_time.py --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

try:
    import kdforge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_description, sync  # noqa: E402  (benchmarks/ is on sys.path)

import kdforge.losses  # noqa: E402, F401  (registers the losses)
from kdforge.data.cache import TeacherCache, build_teacher_cache  # noqa: E402
from kdforge.data.synthetic import procedural_cifar  # noqa: E402
from kdforge.data.transforms import apply_crop_flip, crop_flip_params, normalize, to_float  # noqa: E402
from kdforge.distill.distiller import Batch, Distiller  # noqa: E402
from kdforge.distill.terms import Term  # noqa: E402
from kdforge.models import create_model  # noqa: E402
from kdforge.train.checkpoint import atomic_write_text  # noqa: E402
from kdforge.train.trainer import amp_dtype, epoch_order  # noqa: E402

NUM_CLASSES, PADDING, SEED = 100, 4, 0


class Variant:
    """One Distiller + optimizer, stepping like `Trainer.train_step` (non-grouped optimizer path)."""

    def __init__(self, name: str, distiller: Distiller, images: Tensor, labels: Tensor,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 amp: torch.dtype | None, channels_last: bool, cache: TeacherCache | None = None) -> None:
        self.name, self.distiller, self.cache = name, distiller, cache
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.device, self.amp, self.channels_last = device, amp, channels_last
        distiller.setup(self._prepare(images[:2]), images.shape[0])
        distiller.to(device)
        if channels_last:
            distiller.to(memory_format=torch.channels_last)
        distiller.train()
        self.optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9,
                                         weight_decay=5e-4)
        use_scaler = amp == torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    def _prepare(self, images_uint8: Tensor) -> Tensor:
        x = normalize(to_float(images_uint8.to(self.device)), self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def make_batch(self, index: Tensor, epoch: int, step: int) -> Batch:
        """As `Trainer.make_batch`; with a cache, its views and teacher outputs."""
        images = self.images[index]
        if self.cache is None:
            p = crop_flip_params(index, epoch, SEED, PADDING, True)
        else:
            p = self.cache.view_params(epoch, index)
        x = self._prepare(apply_crop_flip(images, p["dx"], p["dy"], p["flip"], PADDING))
        outs = {"teacher": self.cache.lookup(epoch, index)} if self.cache is not None else None
        return Batch(images=x, target=self.labels[index], index=index, epoch=epoch, step=step,
                     teacher_outputs=outs)

    def step(self, index: Tensor, step: int) -> None:
        batch = self.make_batch(index, 0, step)
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with ctx:
            out = self.distiller(batch)
        total = out.total()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()


def time_rounds(variants: list[Variant], batches: Callable[[int], Tensor], warmup: int, steps: int,
                device: torch.device) -> dict[str, list[float]]:
    """Interleaved rounds: each round runs one step of every variant; returns ms per step."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(warmup + steps):
        for v in variants:
            index = batches(r)
            sync(device)
            t0 = time.perf_counter()
            v.step(index, r)
            sync(device)
            if r >= warmup:
                times[v.name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: a second thread stalls small ops on a busy 2-core CPU)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache-samples", type=int, default=512, help="training samples (and cache size)")
    ap.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                    help="autocast dtype (auto: bf16/fp16 on CUDA, none on CPU)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="channels_last memory format (default: on for CUDA)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "step_time.md"))
    args = ap.parse_args(argv)
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}",
                        *(argv if argv is not None else sys.argv[1:])])
    if args.quick:
        args.warmup, args.steps = 1, 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = amp_dtype(args.amp, device)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    machine = machine_description(device, args.threads)

    data = procedural_cifar("train", num_train=args.cache_samples, num_test=16, num_classes=NUM_CLASSES,
                            image_size=32)
    torch.manual_seed(SEED)
    teacher = create_model("resnet32x4", num_classes=NUM_CLASSES)
    student = create_model("resnet8x4", num_classes=NUM_CLASSES)
    images, labels = data.images.to(device), data.labels.to(device)

    with tempfile.TemporaryDirectory(prefix="kdforge-step-time-") as tmp:
        t0 = time.perf_counter()
        path = build_teacher_cache(teacher, data, Path(tmp) / "cache", epochs_k=1, seed=SEED,
                                   crop_padding=PADDING, flip=True, mean=data.mean, std=data.std,
                                   batch_size=128, device=device)
        build_s = time.perf_counter() - t0
        cache = TeacherCache.open(path, device=device)

    def terms(kd: bool) -> list[Term]:
        out = [Term("ce", teacher=None, group="task", weight=1.0)]
        return out + [Term("kd", weight=1.0, loss_args={"temperature": 4.0})] if kd else out

    common = (images, labels, data.mean, data.std, device, amp, channels_last)
    variants = [
        Variant("plain", Distiller(copy.deepcopy(student), None, terms(False)), *common),
        Variant("online", Distiller(copy.deepcopy(student), teacher, terms(True)), *common),
        Variant("cached", Distiller(copy.deepcopy(student), teacher, terms(True)), *common, cache=cache),
    ]
    order = epoch_order(args.cache_samples, SEED, 0).to(device)
    per_epoch = max(1, args.cache_samples // args.batch)

    def batches(r: int) -> Tensor:
        k = r % per_epoch
        return order[k * args.batch:(k + 1) * args.batch]

    times = time_rounds(variants, batches, args.warmup, args.steps, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    cached_ratio, online_ratio = med["cached"] / med["plain"], med["online"] / med["plain"]

    desc = {"plain": "(a) student alone: CE + SGD step", "online": "(b) online KD: teacher forward each step",
            "cached": "(c) KD from the teacher-output cache"}
    setting = (f"resnet32x4 -> resnet8x4, {NUM_CLASSES} classes, batch {args.batch} of 3x32x32, "
               f"{args.warmup} warm-up + {args.steps} timed steps per variant (interleaved), amp="
               f"{str(amp).replace('torch.', '') if amp else 'none'}, channels_last={channels_last}")
    print("\n".join(machine))
    print(setting)
    print(f"cache build (resnet32x4 over {args.cache_samples} samples, K=1, not timed below): "
          f"{build_s:.1f} s\n")
    for k in ("plain", "online", "cached"):
        spread = f"min {min(times[k]):.1f} max {max(times[k]):.1f}"
        print(f"{desc[k]:<42}  median {med[k]:8.1f} ms/step  ({spread})")

    md = ["# Step time: student alone vs online KD vs cached KD", "", setting + ".", "",
          "| variant | median ms/step | min | max | vs plain |", "|---|---:|---:|---:|---:|"]
    md += [f"| {desc[k]} | {med[k]:.1f} | {min(times[k]):.1f} | {max(times[k]):.1f} | "
           f"{med[k] / med['plain']:.2f}x |" for k in ("plain", "online", "cached")]
    md += ["", f"**cached_vs_plain = {cached_ratio:.2f}, online_vs_plain = {online_ratio:.2f}**", "",
           f"Cache build (not timed above): {build_s:.1f} s for {args.cache_samples} samples x 1 epoch.", "",
           "Machine:", *[f"- {line}" for line in machine],
           "- the CPU cores are shared with other jobs running at the same time, so absolute times are "
           "noisy; the ratios come from interleaved rounds of one run."]
    if args.steps < 10:
        md += [f"- only {args.steps} timed steps per variant (`--quick`): on this shared CPU, differences "
               "below about 20% (e.g. cached vs plain) are within noise."]
    md += ["",
           f"Command: `{command}`"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), "\n".join(md) + "\n")
    print(f"\nwrote {out}")
    print(f"cached_vs_plain={cached_ratio:.2f} online_vs_plain={online_ratio:.2f}")


if __name__ == "__main__":
    main()
