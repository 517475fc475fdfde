"""The training loop: batched device-side pipeline, AMP, grad clipping, loss groups, exact resume.

Determinism: the sample order of epoch e is a permutation seeded by (seed, e) and each view's
crop/flip is a hash of (seed, epoch, index), so a run stopped at any step and resumed from its
checkpoint (weights, optimizer, RNG states) reaches the same weights as an uninterrupted run.
The uint8 images of a batch come from a batch source (`kdforge.data.stream`): an `index_select`
on the device-resident split, or DataLoader workers decoding a streamed split from disk; both
feed the same augmentation, so the two give the same training views.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdforge.config import RunConfig, dump_config
from kdforge.data.stream import StreamingImages, batch_source, fetch_images
from kdforge.data.transforms import apply_crop_flip, crop_flip_params, to_normalized
from kdforge.distill.distiller import Batch, Distiller, Step
from kdforge.errors import KdforgeError
from kdforge.train.build import RunData, build_distiller, load_data
from kdforge.train.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint, set_rng_state
from kdforge.train.distributed import DistEnv, device_for, dist_env_from_environment, local_batch
from kdforge.train.log import MetricsLog, TensorBoard, progress
from kdforge.train.metrics import evaluate_counts, rates
from kdforge.train.optim import build_optimizer, lr_factor, set_lr, wants_loss_groups


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdforgeError(f"trainer.device={name} but no CUDA device is available")
    return dev


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast dtype, or None. `auto` uses AMP only on CUDA (bf16 where supported)."""
    if mode == "none":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


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


class Trainer:
    """Train `cfg` into `run_dir`. `fit()` returns the final result dict (also `result.json`)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False,
                 data: RunData | None = None, quiet: bool = False, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.env = env or dist_env_from_environment()
        self.quiet = quiet or not self.env.is_main
        if not resume and (self.ckpt_dir / "last.json").is_file():
            raise KdforgeError(f"{self.run_dir} already holds a run; pass --resume to continue it or "
                               "choose another --out")
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self.device = resolve_device(device_for(self.env, cfg.trainer.device))
        torch.manual_seed(cfg.trainer.seed)
        self.data = data or load_data(cfg.data, cfg.trainer.seed)
        self.distiller: Distiller = build_distiller(cfg, self.data)
        sample = self._prepare(fetch_images(self.data.train, torch.arange(min(2, len(self.data.train)))))
        self.distiller.setup(sample, len(self.data.train))
        self.distiller.to(self.device)
        if cfg.trainer.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg.optim, self.distiller.trainable_parameters())
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.grouped = wants_loss_groups(self.optimizer)
        if self.grouped and cfg.trainer.grad_clip:
            raise KdforgeError("trainer.grad_clip is not supported with optim.name=dot")
        self.amp = amp_dtype(cfg.trainer.amp, self.device)
        use_scaler = self.amp == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler) if use_scaler else None
        self.forward_fn: Callable[[Batch], Step] = self._wrap_distributed()
        if cfg.trainer.compile:
            self.forward_fn = torch.compile(self.forward_fn)
        n = len(self.data.train)
        bs = cfg.data.batch_size
        self.local_bs = local_batch(bs, self.env)
        self.steps_per_epoch = n // bs if n >= bs else 1
        self.cache = self._open_cache()
        self.source = batch_source(self.data.train, self.device, cfg.data.workers)
        self.epoch = 0
        self.step = 0          # global optimizer steps done
        self.step_in_epoch = 0
        self.best = -math.inf
        self.metrics = MetricsLog(self.run_dir / "metrics.csv")
        if resume:
            self._resume()

    def _wrap_distributed(self) -> Callable[[Batch], Step]:
        """DistributedDataParallel over the distiller (teachers have no trainable parameters)."""
        if not self.env.enabled:
            return self.distiller
        if self.grouped:
            raise KdforgeError("optim.name=dot is not supported in distributed runs yet (its two gradients "
                               "bypass DDP's all-reduce); run it in one process")
        if self.cfg.trainer.sync_bn:
            self.distiller.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.distiller.student)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.distiller, device_ids=None, broadcast_buffers=True)

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

    # -- data --------------------------------------------------------------------------------

    def _prepare(self, images_uint8: Tensor) -> Tensor:
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
        x = self._prepare(images)
        soft = None
        if aug.mixup > 0 or aug.cutmix > 0:
            from kdforge.data.mixing import mix_batch

            x, soft = mix_batch(x, target, self.data.train.num_classes, index, epoch, self.cfg.trainer.seed,
                                mixup=aug.mixup, cutmix=aug.cutmix)
        return Batch(images=x, target=target, index=index, epoch=epoch, step=step, soft_target=soft,
                     teacher_outputs=teacher_outputs)

    # -- checkpoints ---------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                "best": self.best if math.isfinite(self.best) else None,
                "steps_per_epoch": self.steps_per_epoch}

    def save(self, tag: str = "last") -> None:
        if not self.env.is_main:
            return
        save_checkpoint(self.ckpt_dir, tag, self.distiller.checkpoint_state(), self._trainer_state(),
                        self.optimizer, self.scaler.state_dict() if self.scaler else None)

    def _resume(self) -> None:
        weights, state, optim_state = load_checkpoint(self.ckpt_dir, "last")
        self.distiller.load_checkpoint_state(weights)
        if optim_state is not None:
            self.optimizer.load_state_dict(optim_state)
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise KdforgeError(f"cannot resume {self.run_dir}: the data/batch size changed "
                               f"({state.get('steps_per_epoch')} -> {self.steps_per_epoch} steps per epoch)")
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.best = state["best"] if state.get("best") is not None else -math.inf
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        set_rng_state(state["rng"])
        self.metrics.load(upto_epoch=self.epoch - 1)   # rows of the epochs the checkpoint completed

    # -- loop ----------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_step(self, batch: Batch) -> tuple[Step, Tensor]:
        """One optimizer step; returns the step's outputs and the (detached) total loss."""
        set_lr(self.optimizer, self.base_lrs,
               lr_factor(self.cfg.schedule, self.step, self.steps_per_epoch, self.cfg.trainer.epochs))
        with self._autocast():
            out = self.forward_fn(batch)
        if self.grouped:
            groups = out.by_group()
            zero = out.outputs.sum() * 0.0
            self.optimizer.step_losses(groups.get("task", zero), groups.get("distill", zero),
                                       grad_scaler=self.scaler)
            total = sum(groups.values(), zero)
        else:
            total = out.total()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                total.backward()
            if self.cfg.trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.distiller.trainable_parameters(), self.cfg.trainer.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.distiller.after_optimizer_step(self.step)
        return out, total.detach()

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
        tb = TensorBoard(self.run_dir / "tensorboard", cfg.trainer.tensorboard and self.env.is_main)
        start = time.time()
        try:
            while self.epoch < cfg.trainer.epochs:
                if self._train_epoch(tb) == "stopped":
                    return {"stopped_at_step": self.step}
        except KeyboardInterrupt:
            self.save("last")
            raise KdforgeError(f"interrupted at step {self.step}; continue with --resume {self.run_dir}") from None
        finally:
            tb.close()
        return self._finish(time.time() - start)

    def _train_epoch(self, tb: TensorBoard) -> str:
        cfg, epoch = self.cfg, self.epoch
        self.distiller.train()
        self.distiller.on_epoch_start(epoch)
        order = epoch_order(len(self.data.train), cfg.trainer.seed, epoch)
        slices = epoch_slices(self.step_in_epoch, self.steps_per_epoch, cfg.data.batch_size, self.env.rank,
                              self.local_bs)
        sums: dict[str, Tensor] = {}
        correct = seen = 0
        bar = progress(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.trainer.epochs}",
                       cfg.trainer.progress and not self.quiet, initial=self.step_in_epoch)
        t0 = time.time()
        for images, target, index in self.source.epoch(order, slices):
            out, total = self.train_step(self.make_batch(index, epoch, self.step, images, target))
            for name, value in {"loss": total, **out.losses}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            correct = correct + (out.outputs.detach().argmax(1) == target).sum()
            seen += len(index)
            self.step += 1
            self.step_in_epoch += 1
            if bar.n % 25 == 0 or self.step_in_epoch == self.steps_per_epoch:   # syncs: keep them rare
                bar.set_postfix(loss=f"{float(total):.3f}", acc=f"{100.0 * float(correct) / max(1, seen):.1f}")
            bar.update(1)
            if cfg.trainer.stop_after_steps is not None and self.step >= cfg.trainer.stop_after_steps:
                bar.close()
                self.save("last")
                return "stopped"
        bar.close()
        steps_done = max(1, self.steps_per_epoch) * self.env.world
        names = list(sums)
        totals = self.env.all_reduce_sum(torch.stack([sums[k] for k in names]
                                                     + [torch.as_tensor(correct, device=self.device).float(),
                                                        torch.tensor(float(seen), device=self.device)]))
        row: dict[str, Any] = {"epoch": epoch, "step": self.step,
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "train_top1": 100.0 * float(totals[-2]) / max(1.0, float(totals[-1])),
                               "train_samples": int(totals[-1]), "epoch_time_s": round(time.time() - t0, 3)}
        row.update({f"train_{k}": float(v) / steps_done for k, v in zip(names, totals)})
        self.epoch += 1
        self.step_in_epoch = 0
        if (epoch + 1) % cfg.trainer.eval_every == 0 or self.epoch == cfg.trainer.epochs:
            ev = self.evaluate(self.data.eval)
            row.update({f"{self.data.eval_name}_{k}": v for k, v in ev.items()})
            if ev["top1"] > self.best:
                self.best = ev["top1"]
                if self.env.is_main:
                    save_checkpoint(self.ckpt_dir, "best", self.distiller.checkpoint_state(), self._trainer_state())
            if not self.quiet:
                print(f"epoch {epoch + 1}/{cfg.trainer.epochs}  loss {row['train_loss']:.3f}  "
                      f"{self.data.eval_name} top1 {ev['top1']:.2f}  top5 {ev['top5']:.2f}", flush=True)
        if self.env.is_main:
            self.metrics.append(row)
        tb.scalars({k: float(v) for k, v in row.items() if k not in ("epoch", "step")}, self.step)
        self.save("last")
        return "ok"

    def evaluate(self, data: Any) -> dict[str, float]:
        """Each rank evaluates its shard of the split; counts are summed across ranks."""
        counts = evaluate_counts(self.distiller.eval_model(), data, self._prepare, self.cfg.data.eval_batch_size,
                                 self.device, self._autocast if self.amp is not None else None,
                                 shard=(self.env.rank, self.env.world), workers=self.cfg.data.workers)
        return rates(self.env.all_reduce_sum(counts))

    def _finish(self, wall: float) -> dict[str, Any]:
        final = self.evaluate(self.data.test)
        result = {"test_top1": final["top1"], "test_top5": final["top5"], "test_loss": final["loss"],
                  f"best_{self.data.eval_name}_top1": self.best, "epochs": self.cfg.trainer.epochs,
                  "steps": self.step, "wall_time_s": round(wall, 2), "device": str(self.device),
                  "student": self.cfg.student.name,
                  "teachers": {k: v.name for k, v in self.cfg.all_teachers().items()}}
        if self.env.is_main:
            atomic_write_text(self.run_dir / "result.json", json.dumps(result, indent=2))
        return result
