"""Image-text contrastive training as a Task on the one Trainer, and its training module.

Batches are `stream_batch` positions of the training pairs (a pure function of seed and step):
normalised pixels, token ids and attention masks. `ClipModule` trains a student CLIP with
CLIP's InfoNCE as the task term and, given a frozen teacher CLIP, TinyCLIP's affinity mimicking
as the distillation term. Evaluation on held-out pairs: zero-shot accuracy over the 25
(colour, shape) prompts and image<->text recall@1/@5; the validation split is evaluated every
epoch (picks `best`; records the first step the student reaches a target accuracy, e.g. 90 % of
the teacher's), the test split once with the final weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import KdforgeError
from kdforge.losses.tinyclip import affinity_mimicking_loss, clip_contrastive_loss
from kdforge.tasks.base import SampledTask, TaskModule
from kdforge.tasks.vision_language.data import PairData, class_prompts
from kdforge.tasks.vision_language.metrics import retrieval_recall, similarity, zero_shot_accuracy
from kdforge.tasks.vision_language.models import count_parameters, encode_images, encode_texts, logit_scale, pixels
from kdforge.tasks.vision_language.tokenizer import encode
from kdforge.train.distributed import DistEnv

__all__ = ["ClipModule", "EncodedPairs", "VLBatch", "VisionLanguageTask", "embed"]

_MAX_LOG_SCALE = float(torch.log(torch.tensor(100.0)))


@dataclass
class VLBatch:
    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    index: Tensor


@dataclass
class EncodedPairs:
    """A split with its captions tokenised once."""

    data: PairData
    input_ids: Tensor
    attention_mask: Tensor

    @classmethod
    def of(cls, data: PairData, tokenizer: Any, context_length: int) -> EncodedPairs:
        return cls(data, *encode(tokenizer, data.captions, context_length))

    def __len__(self) -> int:
        return len(self.data)


class ClipModule(TaskModule):
    """The student CLIP; InfoNCE (weight `clip_weight`) plus, with a teacher, affinity mimicking
    (weight `distill_weight`, the teacher's scale fixed at `teacher_scale`, the student's learnable)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, clip_weight: float = 1.0,
                 distill_weight: float = 0.0, teacher_scale: float = 50.0) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleDict({} if teacher is None else {"teacher": teacher.eval().requires_grad_(False)})
        self.clip_weight, self.distill_weight, self.teacher_scale = clip_weight, distill_weight, teacher_scale
        if distill_weight and teacher is None:
            raise KdforgeError("ClipModule: distill_weight > 0 needs a teacher")
        if not clip_weight and not distill_weight:
            raise KdforgeError("ClipModule: clip_weight and distill_weight are both 0 (nothing to train)")

    def eval_model(self) -> nn.Module:
        return self.student

    def forward(self, batch: VLBatch) -> Step:
        img = encode_images(self.student, batch.pixel_values)
        txt = encode_texts(self.student, batch.input_ids, batch.attention_mask)
        scale = logit_scale(self.student)
        losses: dict[str, Tensor] = {}
        groups: dict[str, str] = {}
        if self.clip_weight:
            losses["clip"] = self.clip_weight * clip_contrastive_loss(img, txt, scale)
            groups["clip"] = "task"
        if self.distill_weight:
            teacher = self.teachers["teacher"]
            with torch.no_grad():
                img_t = encode_images(teacher, batch.pixel_values)
                txt_t = encode_texts(teacher, batch.input_ids, batch.attention_mask)
            losses["affinity"] = self.distill_weight * affinity_mimicking_loss(img, txt, img_t, txt_t, scale,
                                                                               self.teacher_scale)
            groups["affinity"] = "distill"
        return Step(outputs=(img @ txt.T).detach(), losses=losses, groups=groups)

    def after_optimizer_step(self, step: int) -> None:
        with torch.no_grad():       # CLIP keeps its temperature in [1, 100]
            self.student.logit_scale.clamp_(0.0, _MAX_LOG_SCALE)


@torch.no_grad()
def embed(model: nn.Module, pairs: EncodedPairs, prompts: tuple[Tensor, Tensor], device: torch.device,
          chunk: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(image, caption, prompt) embeddings of a split, in eval mode (the previous mode restored)."""
    was = model.training
    model.eval()
    try:
        imgs, txts = [], []
        for s in range(0, len(pairs), chunk):
            imgs.append(encode_images(model, pixels(pairs.data.images[s:s + chunk]).to(device)).cpu())
            txts.append(encode_texts(model, pairs.input_ids[s:s + chunk].to(device),
                                     pairs.attention_mask[s:s + chunk].to(device)).cpu())
        prm = encode_texts(model, prompts[0].to(device), prompts[1].to(device)).cpu()
    finally:
        model.train(was)
    return torch.cat(imgs), torch.cat(txts), prm


class VisionLanguageTask(SampledTask):
    """Contrastive image-text training on procedural pairs; zero-shot and retrieval metrics."""

    stream = 11

    name = "vision_language"
    eval_split = "val"
    selection_metric = "zeroshot_top1"
    ddp_note = ("its contrastive / affinity losses compare each pair with the whole batch, and the gather of "
                "the other processes' embeddings is not built yet; run it in one process")

    def __init__(self, module: ClipModule, splits: dict[str, PairData], tokenizer: Any, context_length: int,
                 batch_size: int, seed: int = 0, target_top1: float | None = None,
                 extra_result: dict[str, Any] | None = None) -> None:
        """`splits`: train / val / test pairs; `target_top1`: the val zero-shot accuracy whose first
        crossing is reported as `steps_to_target` (e.g. 90 % of the teacher's)."""
        missing = {"train", "val", "test"} - splits.keys()
        if missing:
            raise KdforgeError(f"vision_language task: missing splits {sorted(missing)}")
        self.module, self.batch_size, self.seed = module, batch_size, seed
        self.splits = {k: EncodedPairs.of(v, tokenizer, context_length) for k, v in splits.items()}
        self.class_names, prompts = class_prompts()
        self.prompts = encode(tokenizer, prompts, context_length)
        self.target_top1, self.extra_result = target_top1, dict(extra_result or {})
        self.reached_step: int | None = None
        self._epochs_done = 0
        self.device = torch.device("cpu")       # until `build` moves the module (evaluation before training)

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        return self.module.to(device)

    @property
    def train(self) -> Any:
        """The training split (what SampledTask draws batches from)."""
        return self.splits["train"]

    def batch(self, epoch: int, step: int, env: DistEnv) -> VLBatch:
        train = self.splits["train"]
        idx = self.batch_index(epoch, step, env)
        return VLBatch(pixels(train.data.images[idx]).to(self.device), train.input_ids[idx].to(self.device),
                       train.attention_mask[idx].to(self.device), idx.to(self.device))

    def on_epoch_end(self, module: nn.Module, epoch: int) -> None:
        self._epochs_done = epoch + 1

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        pairs = self.splits[split]
        img, txt, prm = embed(module.eval_model(), pairs, self.prompts, self.device)
        out = {"zeroshot_top1": zero_shot_accuracy(img, prm, pairs.data.labels),
               **retrieval_recall(similarity(img, txt))}
        if (split == self.eval_split and self.target_top1 is not None and self.reached_step is None
                and out["zeroshot_top1"] >= self.target_top1):
            self.reached_step = self._epochs_done * self.steps_per_epoch()
        return out

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        net = module.eval_model()
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        t0 = time.perf_counter()
        embed(net, self.splits["test"], self.prompts, self.device)
        out["encode_ms_per_pair"] = 1000.0 * (time.perf_counter() - t0) / len(self.splits["test"])
        out["params"] = count_parameters(net)
        if self.target_top1 is not None:
            out["target_val_zeroshot_top1"] = self.target_top1
            out["steps_to_target"] = self.reached_step
        return {**out, **self.extra_result}

    def describe(self) -> dict[str, Any]:
        cfg = self.module.student.config
        towers = {name: {"layers": c.num_hidden_layers, "width": c.hidden_size, "heads": c.num_attention_heads,
                         "mlp": c.intermediate_size} for name, c in (("vision", cfg.vision_config),
                                                                      ("text", cfg.text_config))}
        return {"task": self.name, "student": towers, "teacher": bool(len(self.module.teachers))}

    def state_dict(self) -> dict[str, Any]:
        return {"reached_step": self.reached_step, "epochs_done": self._epochs_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reached_step = state.get("reached_step")
        self._epochs_done = int(state.get("epochs_done", 0))

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Eight test images with their caption and top-3 zero-shot labels (green: the true class)."""
        from kdforge.plotting import pyplot, save_png

        plt = pyplot()
        test = self.splits["test"]
        count = min(8, len(test))
        img, _, prm = embed(module.eval_model(), test, self.prompts, self.device)
        probs = (100.0 * similarity(img[:count], prm)).softmax(1)
        fig, axes = plt.subplots(2, (count + 1) // 2, figsize=(2.6 * ((count + 1) // 2), 7.4), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i >= count:
                continue
            ax.imshow(test.data.images[i].permute(1, 2, 0).numpy())
            ax.set_title(test.data.captions[i], fontsize=7)
            top = probs[i].topk(3)
            truth = int(test.data.labels[i])
            for j, (p, c) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                ax.text(0.0, -0.04 - 0.11 * j, f"{self.class_names[c]} {p:.2f}", fontsize=7, va="top",
                        transform=ax.transAxes, color="green" if c == truth else "red")
        fig.suptitle("test pairs: caption (title) and top-3 zero-shot classes (green = true class)", fontsize=9)
        fig.subplots_adjust(left=0.02, right=0.98, top=0.92, bottom=0.12, hspace=0.75, wspace=0.1)
        save_png(fig, path, dpi=80)
        return True
