"""Labelled image classification as a Task: the batched, index-seeded pipeline of the core.

The sample order of epoch e is a permutation seeded by (seed, e) and each view's crop/flip is a
hash of (seed, epoch, index), so a run stopped at any step and resumed from its checkpoint
reaches the same weights as an uninterrupted run. The uint8 images of a batch come from a batch
source (`kdforge.data.stream`): an `index_select` on the device-resident split, or DataLoader
workers decoding a streamed split from disk; both feed the same augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.config import RunConfig
from kdforge.data.stream import StreamingImages, batch_source, fetch_images
from kdforge.data.transforms import apply_crop_flip, crop_flip_params, to_normalized
from kdforge.distill.distiller import Batch, Distiller, Step
from kdforge.errors import KdforgeError
from kdforge.tasks.base import Autocast, Task, top1_counts, top1_rate
from kdforge.train.build import RunData, build_distiller, load_data
from kdforge.train.distributed import DistEnv, local_batch
from kdforge.train.metrics import evaluate_counts, rates

__all__ = ["ClassificationTask", "epoch_order", "epoch_slices"]


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of one epoch, a function of (seed, epoch) only."""
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=gen)


def epoch_slices(start_step: int, steps: int, batch_size: int, rank: int = 0, local_bs: int | None = None
                 ) -> list[slice]:
    """This rank's share of each global batch from `start_step` on, as slices of the epoch order.

    Rank r takes the contiguous `local_bs` positions at `r * local_bs` of every global batch, so
    the ranks together see exactly the samples of one process.
    """
    local_bs = batch_size if local_bs is None else local_bs
    return [slice(step * batch_size + rank * local_bs, step * batch_size + (rank + 1) * local_bs)
            for step in range(start_step, steps)]


class ClassificationTask(Task):
    """A `RunConfig`'s data, student, teachers and terms: the Distiller trained on labelled images."""

    name = "classification"

    def __init__(self, cfg: RunConfig, data: RunData | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.cache: Any = None

    # -- set-up -------------------------------------------------------------------------------------

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        cfg = self.cfg
        self.device, self.env = device, env
        self.data = self.data or load_data(cfg.data, cfg.trainer.seed)
        self.eval_split = self.data.eval_name
        # `best` is chosen on a validation split only; without one the test split is logged per
        # epoch for monitoring, and only `last` exists (nothing is selected on the test split)
        self.selection_metric = "top1" if self.data.eval_name == "val" else None
        self.distiller: Distiller = build_distiller(cfg, self.data)
        sample = self.prepare(fetch_images(self.data.train, torch.arange(min(2, len(self.data.train)))))
        self.distiller.setup(sample, len(self.data.train))
        self.distiller.to(device)
        if cfg.trainer.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.local_bs = local_batch(cfg.data.batch_size, env)
        self.cache = self._open_cache()
        self.source = batch_source(self.data.train, device, cfg.data.workers)
        return self.distiller

    def steps_per_epoch(self) -> int:
        n, bs = len(self.data.train), self.cfg.data.batch_size
        return n // bs if n >= bs else 1

    def _open_cache(self) -> Any:
        """The teacher-output cache of `teacher.cache`, checked against this run (or None)."""
        tcfg = self.cfg.teacher
        if tcfg is None or not tcfg.cache:
            return None
        from kdforge.data.cache import TeacherCache, cache_expectation
        from kdforge.distill.terms import LOGITS

        if isinstance(self.data.train, StreamingImages):
            raise KdforgeError("teacher.cache is not supported with data.stream=true yet (the cache is checked "
                               "against in-memory images); set data.stream=false or drop teacher.cache")
        aug = self.cfg.data.augment
        if aug.mixup > 0 or aug.cutmix > 0:
            raise KdforgeError("teacher.cache holds un-mixed views; turn off data.augment.mixup/cutmix or "
                               "use the online teacher")
        taps = sorted({n for t in self.distiller.terms if t.needs_teacher and t.teacher_id == "teacher"
                       for n in t.teacher_taps if n != LOGITS})
        expect = cache_expectation(self.distiller.teachers["teacher"], self.data.train, seed=self.cfg.trainer.seed,
                                   crop_padding=aug.crop_padding, flip=aug.flip, mean=self.data.train.mean,
                                   std=self.data.train.std, taps=taps)
        if not tcfg.checkpoint:       # no weights to compare: trust the cache's teacher identity
            expect.pop("teacher_hash")
        return TeacherCache.open(tcfg.cache, expect=expect, device=self.device, taps=taps)

    # -- data -----------------------------------------------------------------------------------------

    def prepare(self, images_uint8: Tensor) -> Tensor:
        """uint8 -> normalized float on the training device (no augmentation)."""
        x = images_uint8.to(self.device)
        x = to_normalized(x, self.data.train.mean, self.data.train.std)
        if self.cfg.trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def make_batch(self, index: Tensor, epoch: int, step: int, images: Tensor | None = None,
                   target: Tensor | None = None) -> Batch:
        """Augmented, normalized batch for data set positions `index` (on the device).

        `images`/`target` are the positions' uint8 images and labels when a loader already read
        them; otherwise they are fetched from the batch source here.
        """
        aug = self.cfg.data.augment
        if images is None or target is None:
            images, target = self.source.fetch(index)
        teacher_outputs = None
        if self.cache is not None:    # replay the cached views and read the teacher's outputs for them
            params = self.cache.view_params(epoch, index)
            teacher_outputs = {"teacher": self.cache.lookup(epoch, index)}
        else:
            params = crop_flip_params(index, epoch, self.cfg.trainer.seed, aug.crop_padding, aug.flip)
        if aug.crop_padding > 0 or aug.flip:
            images = apply_crop_flip(images, params["dx"], params["dy"], params["flip"], aug.crop_padding)
        x = self.prepare(images)
        soft = None
        if aug.mixup > 0 or aug.cutmix > 0:
            from kdforge.data.mixing import mix_batch

            x, soft = mix_batch(x, target, self.data.train.num_classes, index, epoch, self.cfg.trainer.seed,
                                mixup=aug.mixup, cutmix=aug.cutmix)
        return Batch(images=x, target=target, index=index, epoch=epoch, step=step, soft_target=soft,
                     teacher_outputs=teacher_outputs)

    def batches(self, epoch: int, start_step: int, env: DistEnv) -> Iterator[Batch]:
        order = epoch_order(len(self.data.train), self.cfg.trainer.seed, epoch)
        slices = epoch_slices(start_step, self.steps_per_epoch(), self.cfg.data.batch_size, env.rank,
                              self.local_bs)
        for step, (images, target, index) in enumerate(self.source.epoch(order, slices), start=start_step):
            yield self.make_batch(index, epoch, step, images, target)

    def train_counts(self, out: Step, batch: Batch) -> dict[str, Tensor]:
        return top1_counts(out.outputs, batch.target)

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return {**top1_rate(counts), "train_samples": int(counts.get("samples", 0.0))}

    # -- evaluation --------------------------------------------------------------------------------

    def evaluate(self, module: nn.Module, split: str, env: DistEnv,
                 autocast: Autocast | None = None) -> dict[str, float]:
        """top1/top5/loss; each rank evaluates its shard of the split and counts are summed."""
        data = {"train": self.data.train, "test": self.data.test, "val": self.data.eval,
                self.data.eval_name: self.data.eval}[split]
        counts = evaluate_counts(module.eval_model(), data, self.prepare, self.cfg.data.eval_batch_size,
                                 self.device, autocast, shard=(env.rank, env.world), workers=self.cfg.data.workers)
        return rates(env.all_reduce_sum(counts))

    def result(self, module: nn.Module, env: DistEnv, autocast: Autocast | None = None) -> dict[str, Any]:
        """Test metrics of the final weights; with `trainer.eval_train` also their CE and top-1 on the
        un-augmented training split (the fit a distillation term trades against: DOT's premise reads it)."""
        final = self.evaluate(module, "test", env, autocast)
        result = {"test_top1": final["top1"], "test_top5": final["top5"], "test_loss": final["loss"]}
        if self.cfg.trainer.eval_train:      # a full pass over the training split: only when asked
            fit = self.evaluate(module, "train", env, autocast)
            result.update({"final_train_loss": fit["loss"], "final_train_top1": fit["top1"]})
        return {**result, **self._long_tail(module)}

    @torch.no_grad()
    def _long_tail(self, module: nn.Module) -> dict[str, float]:
        """Many/medium/few-shot test accuracy when the training split is long-tailed (max/min count >= 4),
        with the CIFAR-LT thresholds scaled to the head class's size."""
        from kdforge.data.base import ImageTensors
        from kdforge.train.longtail_metrics import many_medium_few_accuracy, scaled_shot_thresholds

        train, test = self.data.train, self.data.test
        if not isinstance(train, ImageTensors) or not isinstance(test, ImageTensors):
            return {}
        counts = torch.bincount(train.labels.cpu(), minlength=train.num_classes)
        if int(counts.min()) == 0 or int(counts.max()) < 4 * int(counts.min()):
            return {}
        net = module.eval_model()
        was = net.training
        net.eval()
        logits = torch.cat([net(self.prepare(test.images[i:i + 500])).float().cpu() for i in range(0, len(test), 500)])
        net.train(was)
        many, few = scaled_shot_thresholds(int(counts.max()))
        groups = many_medium_few_accuracy(logits, test.labels.cpu(), counts.tolist(), many, few)
        return {f"test_{k}_top1": v for k, v in groups.items() if k in ("many", "medium", "few")}

    def describe(self) -> dict[str, Any]:
        return {"student": self.cfg.student.name,
                "teachers": {k: v.name for k, v in self.cfg.all_teachers().items()}}
