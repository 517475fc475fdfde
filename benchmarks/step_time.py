"""Median ms per training step: the reference KD step vs kdforge's sequential, pipelined and cached KD.

resnet32x4 (teacher) -> resnet8x4 (student), 100 classes, batch 64 of 3x32x32 procedural_cifar:

* ``reference``: a plain re-implementation of the usual KD step (mdistiller's recipe, written here):
  teacher forward under no_grad, student forward, CE 0.1 + KD 0.9 at T=4, backward, SGD step.
* ``plain``:  `Distiller(student, None, [ce])`: CE + SGD step, no teacher.
* ``online``: `Distiller(student, teacher, [ce 0.1, kd 0.9 T=4])`, sequential: the teacher runs
  forward inside every step.
* ``pipelined``: the same Distiller, the teacher one batch ahead in `TeacherPipeline`'s worker
  thread while the student steps (`trainer.teacher_pipeline`), each side with half the threads.
* ``cached``: the same Distiller, with `Batch.teacher_outputs` from `TeacherCache.lookup` (the
  cache of the same teacher on the same views is built once beforehand, not timed).
* ``online_frozen`` / ``pipelined_frozen``: `online` / `pipelined` with the teacher's forward as a
  frozen TorchScript graph (`trainer.teacher_freeze`, on by default on CPU: BN folded, weights
  prepacked for oneDNN); ``online_frozen_cl`` also keeps the student in channels_last
  (`trainer.channels_last: true`).
* ``pipelined_bf16``: `pipelined` with the teacher's forward in bf16 autocast
  (`trainer.teacher_precision: bf16`).
* ``teacher_half`` / ``teacher_half_frozen`` / ``plain_half``: the teacher's forward alone (eager,
  frozen) and the student's CE step alone, each on half the threads: a pipeline's floor on this
  machine is the larger of its teacher's and the student's (``floor_vs_reference``,
  ``floor_frozen_vs_reference``), whatever the pipeline's own overhead.

Every variant builds its batches the same way (gather + crop/flip + normalize on the device).
Each trains its own copy of the same student. Variants are timed in interleaved rounds (each
round runs `--chunk` consecutive steps of every variant, so the pipeline's fill at the start of
a chunk is paid inside the timing), so background load hits all alike. `--threads` is the total
thread budget: the sequential variants use all of it, the pipelined one half per side. The last
line is ``pipelined_vs_reference=<p/r> online_vs_reference=<o/r> cached_vs_plain=<c/a>
online_vs_plain=<o/a> online_frozen_vs_reference=<bf/r> online_frozen_cl_vs_reference=<bfc/r>
pipelined_frozen_vs_reference=<pf/r> pipelined_bf16_vs_reference=<p16/r>
floor_vs_reference=<max(t/2, a/2)/r> floor_frozen_vs_reference=<max(tf/2, a/2)/r>``.

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
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from kdforge.train.teacher_pipeline import TeacherPipeline  # noqa: E402
from kdforge.train.trainer import amp_dtype, epoch_order  # noqa: E402

NUM_CLASSES, PADDING, SEED, TEMPERATURE = 100, 4, 0, 4.0


class Inputs:
    """The batch building every variant shares: gather + crop/flip + normalize (or the cache's views)."""

    def __init__(self, images: Tensor, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device, channels_last: bool) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.device, self.channels_last = device, channels_last

    def prepare(self, images_uint8: Tensor) -> Tensor:
        x = normalize(to_float(images_uint8.to(self.device)), self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, index: Tensor, step: int, cache: TeacherCache | None = None) -> Batch:
        p = crop_flip_params(index, 0, SEED, PADDING, True) if cache is None else cache.view_params(0, index)
        x = self.prepare(apply_crop_flip(self.images[index], p["dx"], p["dy"], p["flip"], PADDING))
        outs = {"teacher": cache.lookup(0, index)} if cache is not None else None
        return Batch(images=x, target=self.labels[index], index=index, step=step, teacher_outputs=outs)


class Variant:
    """One Distiller + SGD, stepping like `Trainer.train_step` (non-grouped optimizer path)."""

    def __init__(self, name: str, distiller: Distiller, inputs: Inputs, amp: torch.dtype | None,
                 threads: int, cache: TeacherCache | None = None, pipelined: bool = False) -> None:
        self.name, self.distiller, self.inputs, self.cache, self.amp = name, distiller, inputs, cache, amp
        self.threads = threads if not pipelined else max(1, threads // 2)
        distiller.setup(inputs.prepare(inputs.images[:2]), inputs.images.shape[0])
        distiller.to(inputs.device)
        if inputs.channels_last:
            distiller.to(memory_format=torch.channels_last)
        distiller.train()
        self.optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9,
                                         weight_decay=5e-4)
        self.scaler = torch.amp.GradScaler(inputs.device.type) if amp == torch.float16 else None
        self.pipeline = TeacherPipeline(distiller, inputs.device, self._autocast) if pipelined else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.inputs.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def run(self, indices: list[Tensor], first_step: int) -> None:
        """Consecutive steps on `indices` (the pipelined variant overlaps them)."""
        batches: Iterator[Batch] = (self.inputs.batch(ix, first_step + k, self.cache) for k, ix in enumerate(indices))
        if self.pipeline is not None:
            batches = self.pipeline.batches(batches)
        for batch in batches:
            with self._autocast():
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


class Reference:
    """The usual KD training step, written plainly (no kdforge pieces but the shared batch building)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, inputs: Inputs, amp: torch.dtype | None,
                 threads: int) -> None:
        self.name, self.inputs, self.amp, self.threads = "reference", inputs, amp, threads
        self.student, self.teacher = student.to(inputs.device).train(), teacher.to(inputs.device).eval()
        if inputs.channels_last:
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def run(self, indices: list[Tensor], first_step: int) -> None:
        ctx = (lambda: torch.autocast(self.inputs.device.type, dtype=self.amp)) if self.amp else contextlib.nullcontext
        for k, index in enumerate(indices):
            batch = self.inputs.batch(index, first_step + k)
            with ctx():
                with torch.no_grad():
                    t_logits = self.teacher(batch.images)
                s_logits = self.student(batch.images)
                ce = F.cross_entropy(s_logits, batch.target)
                kd = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, 1), F.softmax(t_logits / TEMPERATURE, 1),
                              reduction="batchmean") * TEMPERATURE ** 2
                loss = 0.1 * ce + 0.9 * kd
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def time_rounds(variants: list, batches: Callable[[int], Tensor], warmup: int, rounds: int, chunk: int,
                device: torch.device) -> dict[str, list[float]]:
    """Interleaved rounds: each round runs `chunk` consecutive steps of every variant; ms per step."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(warmup + rounds):
        indices = [batches(r * chunk + k) for k in range(chunk)]
        for v in variants:
            torch.set_num_threads(v.threads)
            sync(device)
            t0 = time.perf_counter()
            v.run(indices, r * chunk)
            sync(device)
            if r >= warmup:
                times[v.name].append((time.perf_counter() - t0) * 1e3 / chunk)
    return times


DESC = {"reference": "(r) reference KD step (plain re-implementation)",
        "plain": "(a) student alone: CE + SGD step",
        "online": "(b) kdforge online KD, sequential teacher",
        "pipelined": "(p) kdforge online KD, pipelined teacher",
        "online_frozen": "(bf) online KD, sequential, frozen teacher graph",
        "online_frozen_cl": "(bfc) online KD, sequential, frozen teacher, channels_last student",
        "pipelined_frozen": "(pf) online KD, pipelined, frozen teacher graph",
        "cached": "(c) kdforge KD from the teacher-output cache",
        "pipelined_bf16": "(p16) pipelined, teacher forward in bf16 autocast",
        "teacher_half": "(t/2) teacher forward alone, half the threads",
        "teacher_half_frozen": "(tf/2) frozen teacher graph alone, half the threads",
        "plain_half": "(a/2) student CE step alone, half the threads"}


class TeacherForward:
    """The teacher's forward alone, as the pipeline's worker runs it (`Distiller.teacher_outputs`)."""

    def __init__(self, name: str, distiller: Distiller, inputs: Inputs, amp: torch.dtype | None,
                 threads: int) -> None:
        self.name, self.distiller, self.inputs, self.amp, self.threads = name, distiller, inputs, amp, threads
        distiller.setup(inputs.prepare(inputs.images[:2]), inputs.images.shape[0])
        distiller.to(inputs.device)
        if inputs.channels_last:
            distiller.to(memory_format=torch.channels_last)

    def run(self, indices: list[Tensor], first_step: int) -> None:
        ctx = (lambda: torch.autocast(self.inputs.device.type, dtype=self.amp)) if self.amp else contextlib.nullcontext
        for k, index in enumerate(indices):
            batch = self.inputs.batch(index, first_step + k)
            with ctx():
                self.distiller.teacher_outputs(batch.images)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2,
                    help="total CPU threads: sequential variants use all, the pipelined one half per side")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds")
    ap.add_argument("--chunk", type=int, default=4, help="consecutive steps per variant per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed rounds of 3 steps")
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
        args.warmup, args.rounds, args.chunk = 1, 2, 3
    device = torch.device(args.device)
    amp = amp_dtype(args.amp, device)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    torch.set_num_threads(args.threads)
    machine = machine_description(device, args.threads)

    data = procedural_cifar("train", num_train=args.cache_samples, num_test=16, num_classes=NUM_CLASSES,
                            image_size=32)
    torch.manual_seed(SEED)
    teacher = create_model("resnet32x4", num_classes=NUM_CLASSES)
    student = create_model("resnet8x4", num_classes=NUM_CLASSES)
    inputs = Inputs(data.images.to(device), data.labels.to(device), data.mean, data.std, device, channels_last)

    with tempfile.TemporaryDirectory(prefix="kdforge-step-time-") as tmp:
        t0 = time.perf_counter()
        path = build_teacher_cache(teacher, data, Path(tmp) / "cache", epochs_k=1, seed=SEED,
                                   crop_padding=PADDING, flip=True, mean=data.mean, std=data.std,
                                   batch_size=128, device=device)
        build_s = time.perf_counter() - t0
        cache = TeacherCache.open(path, device=device)

    def terms(kd: bool) -> list[Term]:
        if not kd:
            return [Term("ce", teacher=None, group="task", weight=1.0)]
        return [Term("ce", teacher=None, group="task", weight=0.1),
                Term("kd", weight=0.9, loss_args={"temperature": TEMPERATURE})]

    def kd_distiller() -> Distiller:
        return Distiller(copy.deepcopy(student), copy.deepcopy(teacher), terms(True))

    def bf16_teacher(distiller: Distiller) -> Distiller:
        distiller.set_teacher_execution(torch.bfloat16)
        return distiller

    def frozen_teacher(distiller: Distiller) -> Distiller:
        distiller.set_teacher_execution(freeze=True, log=print)
        return distiller

    inputs_cl = Inputs(inputs.images, inputs.labels, data.mean, data.std, device, True)
    half = max(1, args.threads // 2)

    variants = [
        Reference(copy.deepcopy(student), copy.deepcopy(teacher), inputs, amp, args.threads),
        Variant("plain", Distiller(copy.deepcopy(student), None, terms(False)), inputs, amp, args.threads),
        Variant("online", kd_distiller(), inputs, amp, args.threads),
        Variant("pipelined", kd_distiller(), inputs, amp, args.threads, pipelined=True),
        Variant("cached", kd_distiller(), inputs, amp, args.threads, cache=cache),
        Variant("online_frozen", frozen_teacher(kd_distiller()), inputs, amp, args.threads),
        Variant("online_frozen_cl", frozen_teacher(kd_distiller()), inputs_cl, amp, args.threads),
        Variant("pipelined_frozen", frozen_teacher(kd_distiller()), inputs, amp, args.threads, pipelined=True),
        Variant("pipelined_bf16", bf16_teacher(kd_distiller()), inputs, amp, args.threads, pipelined=True),
        TeacherForward("teacher_half", kd_distiller(), inputs, amp, half),
        TeacherForward("teacher_half_frozen", frozen_teacher(kd_distiller()), inputs, amp, half),
        Variant("plain_half", Distiller(copy.deepcopy(student), None, terms(False)), inputs, amp, half),
    ]
    order = epoch_order(args.cache_samples, SEED, 0).to(device)
    per_epoch = max(1, args.cache_samples // args.batch)

    def batches(k: int) -> Tensor:
        k %= per_epoch
        return order[k * args.batch:(k + 1) * args.batch]

    times = time_rounds(variants, batches, args.warmup, args.rounds, args.chunk, device)
    for v in variants:
        if isinstance(v, Variant) and v.pipeline is not None:
            v.pipeline.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {"pipelined_vs_reference": med["pipelined"] / med["reference"],
              "online_vs_reference": med["online"] / med["reference"],
              "cached_vs_plain": med["cached"] / med["plain"], "online_vs_plain": med["online"] / med["plain"],
              "online_frozen_vs_reference": med["online_frozen"] / med["reference"],
              "online_frozen_cl_vs_reference": med["online_frozen_cl"] / med["reference"],
              "pipelined_frozen_vs_reference": med["pipelined_frozen"] / med["reference"],
              "pipelined_bf16_vs_reference": med["pipelined_bf16"] / med["reference"],
              "floor_vs_reference": max(med["teacher_half"], med["plain_half"]) / med["reference"],
              "floor_frozen_vs_reference": max(med["teacher_half_frozen"], med["plain_half"]) / med["reference"]}
    per_round = {k: [v / r for v, r in zip(times[k], times["reference"])]
                 for k in ("pipelined", "pipelined_frozen", "online_frozen", "online_frozen_cl")}

    setting = (f"resnet32x4 -> resnet8x4, {NUM_CLASSES} classes, batch {args.batch} of 3x32x32, {args.warmup} "
               f"warm-up + {args.rounds} timed rounds of {args.chunk} consecutive steps per variant (interleaved), "
               f"{args.threads} threads in total (pipelined: {max(1, args.threads // 2)} teacher + "
               f"{max(1, args.threads // 2)} student), amp={str(amp).replace('torch.', '') if amp else 'none'}, "
               f"channels_last={channels_last}")
    print("\n".join(machine))
    print(setting)
    print(f"cache build (resnet32x4 over {args.cache_samples} samples, K=1, not timed below): {build_s:.1f} s\n")
    for k in DESC:
        print(f"{DESC[k]:<50}  median {med[k]:8.1f} ms/step  (min {min(times[k]):.1f} max {max(times[k]):.1f})")
    for k, ratios_k in per_round.items():
        print(f"{k} / reference per round: min {min(ratios_k):.2f} max {max(ratios_k):.2f}")

    md = ["# Step time: the reference KD step vs kdforge's sequential, pipelined and cached KD", "", setting + ".",
          "", "| variant | median ms/step | min | max | vs reference | vs plain |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {DESC[k]} | {med[k]:.1f} | {min(times[k]):.1f} | {max(times[k]):.1f} | "
           f"{med[k] / med['reference']:.2f}x | {med[k] / med['plain']:.2f}x |" for k in DESC]
    md += ["", "**" + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()) + "**", "",
           *[f"{k} / reference per round: median {statistics.median(v):.2f}, min {min(v):.2f}, max {max(v):.2f}."
             for k, v in per_round.items()], "",
           "A pipeline cannot beat its floor, the slower of its two sides alone on their share of the threads "
           f"(floor_vs_reference = max(t/2, a/2) / r = {ratios['floor_vs_reference']:.2f}, with the frozen teacher "
           f"{ratios['floor_frozen_vs_reference']:.2f}), however small its own overhead.", "",
           f"Cache build (not timed above): {build_s:.1f} s for {args.cache_samples} samples x 1 epoch.", "",
           "Machine:", *[f"- {line}" for line in machine],
           "- the CPU cores may be shared with other jobs running at the same time, so absolute times are "
           "noisy; the ratios come from interleaved rounds of one run."]
    if args.rounds * args.chunk < 20:
        md += [f"- only {args.rounds * args.chunk} timed steps per variant: differences below about 20% are "
               "within noise on a shared CPU."]
    md += ["", f"Command: `{command}`"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(md) + "\n")
    print(f"\nwrote {out}")
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
