"""Audio-to-dense prediction on the one Trainer: an echo-spectrogram student taught by a frozen image teacher.

The student sees only the binaural echo spectrogram of a scene (`echo.procedural_echo_split`,
(C, F, T), a shape unlike the image's) and predicts the scene's dense maps (depth, semantic
labels) at the image's resolution; the teacher is a frozen image network
(`models.MultiTaskNet`) whose predictions are the student's pseudo ground truth and whose encoder
features (taps `enc3`, `enc4`, ...) the feature losses read. Both are computed once, at `build`,
for every training scene (the teacher is frozen and the batches are not augmented), so a step
runs the student only.

`AudioDenseNet`: a convolutional audio encoder (`models.Encoder`: stages of widths w, 2w, 4w, 8w,
strides 1, 2, 2, 2), per aligned level a 1x1 projection of the audio stage to the teacher tap's
channel count C (the features a_i the feature losses read), a bridge from the audio grid to the
teacher tap's grid -- `resize` (bilinear, the plain student), `sam` (`SAMBlock`) or `oracle` (the
teacher's own features of the scene's image at that level, at training and test time: the card's
upper-bound check of the aligned-feature path; not an audio-only model) -- and a
decoder from the coarsest bridged grid up to the output size (x2 upsampling, concatenating each
bridged map at its grid, two 3x3 convs per level) with one `models.Head` per task.

`SAMBlock` (Spatial Alignment via Matching, card p09): K learnable spatial embeddings p^k shaped
like the teacher's feature map (V positions x C),

    T^k(l) = max_j p^k(l) . (W a(j))          p_hat(l) = sum_k softmax_k(T^k(l)) p^k(l)
    p_bar  = MultiHead(query=p_hat, key=a, value=a) + p_hat

and p_bar (V x C, the teacher's layout) replaces the audio features in the decoder.

`AudioDenseModule` (the training module): each task's loss against the targets of the batch
(the teacher's predictions with `pseudo_gt`, else the ground truth): depth `berhu` (the reverse
Huber of Laina et al., c = 0.2 max |error| of the batch) or `l1`, semantic cross-entropy; plus
`lam` x the feature loss per aligned level: `mse` (the audio features resized to the teacher's
grid, FitNet-style) or `triplet` (`kdforge.losses.sam_audio.loose_triplet_feature_kd` of the
teacher features against the raw audio features a_i, or against p_bar with `triplet_on: aligned`), off for
the first `warmup_steps` steps (the card's warm-up with L_p alone). The teacher features are its
encoder stage outputs (after ReLU, as a ResNet stage's) or, with `teacher_features: pre_relu`, the
same stage before its last ReLU (`teacher_tap`).

`AudioDenseTask`: seeded batches (`SampledTask`) of standardised spectrograms (per channel and
frequency, statistics of the training split), evaluation against the ground truth (depth RMSE,
MAE, abs-rel, delta < 1.25; mIoU; and the audio-blind priors, the per-pixel mean / median
training depth map, as `test_mean_map_*` / `test_median_map_*`), and `draw` (image, spectrogram,
truth, teacher, student per scene).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Batch, Step
from kdforge.errors import KdforgeError
from kdforge.losses.sam_audio import NEGATIVES, loose_triplet_feature_kd
from kdforge.models.taps import FeatureTap
from kdforge.tasks.base import SampledTask, TaskModule, seeded_generator
from kdforge.tasks.dense.echo import EchoData
from kdforge.tasks.dense.metrics import depth_errors, miou
from kdforge.tasks.dense.models import Encoder, Head, _block
from kdforge.tasks.dense.scenes import IGNORE
from kdforge.tasks.dense.task import _show, normalise
from kdforge.train.distributed import DistEnv

__all__ = ["AudioDenseModule", "AudioDenseNet", "AudioDenseTask", "BRIDGES", "FEATURE_LOSSES", "SAMBlock",
           "audio_metrics", "berhu", "depth_delta", "depth_mae", "teacher_targets"]

BRIDGES = ("resize", "sam", "oracle")
FEATURE_LOSSES = ("none", "mse", "triplet")
TEACHER_FEATURES = ("post_relu", "pre_relu")


def teacher_tap(stage: int, kind: str = "post_relu") -> str:
    """The teacher (`models.MultiTaskNet`) tap of encoder stage `stage` (1-based): the stage output (after its last
    ReLU, `enc<s>`) or the input of that ReLU (after the last BatchNorm, `pre_relu`; copied, the ReLU is in place)."""
    if kind not in TEACHER_FEATURES:
        raise KdforgeError(f"audio dense: teacher features must be one of {', '.join(TEACHER_FEATURES)}, got {kind!r}")
    return f"enc{stage}" if kind == "post_relu" else f"encoder.stages.{stage - 1}.5:input"


class SAMBlock(nn.Module):
    """Spatial Alignment via Matching: audio features (N, A, C) -> a map in the teacher's layout (N, V, C)."""

    def __init__(self, k: int, positions: int, channels: int, heads: int = 4) -> None:
        super().__init__()
        if k < 1 or positions < 1 or channels < 1 or heads < 1 or channels % heads:
            raise KdforgeError(f"SAMBlock needs k, positions, channels >= 1 and channels divisible by heads, got "
                               f"k={k}, positions={positions}, channels={channels}, heads={heads}")
        self.embed = nn.Parameter(torch.randn(k, positions, channels) / channels ** 0.5)    # p^k, (K, V, C)
        self.match = nn.Linear(channels, channels, bias=False)                               # W
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def scores(self, audio: Tensor) -> Tensor:
        """T (N, K, V): each embedding entry's best match over the audio positions."""
        wa = self.match(audio)                                                   # (N, A, C)
        return torch.einsum("kvc,nac->nkva", self.embed, wa).amax(-1)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """(p_bar (N, V, C), mixture weights softmax_k T (N, K, V))."""
        alpha = self.scores(audio).softmax(1)
        p_hat = torch.einsum("nkv,kvc->nvc", alpha, self.embed)
        p_bar = self.attn(p_hat, audio, audio, need_weights=False)[0] + p_hat
        return p_bar, alpha


class AudioDenseNet(nn.Module):
    """Audio encoder -> per-level bridge to the teacher's grids -> decoder -> task heads (module doc).

    `levels`: {stage (1-based audio encoder stage): (C, h, w) of the teacher tap it aligns to};
    `k`: {stage: K} for `bridge: sam`. forward(x) -> {task: (N, C_t, size, size)}.
    """

    def __init__(self, tasks: Mapping[str, int], levels: Mapping[int, tuple[int, int, int]], size: int,
                 in_channels: int = 2, width: int = 16, depth: int = 4, bridge: str = "resize",
                 k: Mapping[int, int] | None = None, heads: int = 4) -> None:
        super().__init__()
        if bridge not in BRIDGES:
            raise KdforgeError(f"AudioDenseNet: bridge must be one of {', '.join(BRIDGES)}, got {bridge!r}")
        if not levels or any(not 1 <= s <= depth for s in levels):
            raise KdforgeError(f"AudioDenseNet: levels must name audio stages in 1..{depth}, got {sorted(levels)}")
        grids = sorted({(h, w) for _, h, w in levels.values()})
        if len(grids) != len(levels):
            raise KdforgeError(f"AudioDenseNet: two levels share a teacher grid: {dict(levels)}")
        h0, w0 = grids[0]
        steps = 0
        while (h0 << steps, w0 << steps) != (size, size):
            steps += 1
            if h0 << steps > size:
                raise KdforgeError(f"AudioDenseNet: the teacher grid {h0}x{w0} does not double up to {size}x{size}")
        self.tasks, self.levels, self.size, self.bridge = dict(tasks), dict(levels), size, bridge
        widths = [width * 2 ** i for i in range(depth)]
        self.encoder = Encoder(in_channels, widths)
        self.proj = nn.ModuleDict({str(s): nn.Conv2d(widths[s - 1], c, 1) for s, (c, _, _) in levels.items()})
        self.sam = nn.ModuleDict()
        if bridge == "sam":
            k = dict(k or {})
            missing = [s for s in levels if s not in k]
            if missing:
                raise KdforgeError(f"AudioDenseNet: bridge sam needs K for stage(s) {missing}")
            self.sam = nn.ModuleDict({str(s): SAMBlock(k[s], h * w, c, heads) for s, (c, h, w) in levels.items()})
        by_grid = {(h, w): c for c, h, w in levels.values()}
        blocks, cin = [], 0
        for i in range(steps + 1):
            grid = (h0 << i, w0 << i)
            cout = max(2 * width, widths[-1] >> i)
            blocks.append(_block(cin + by_grid.get(grid, 0), cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.grids = [(h0 << i, w0 << i) for i in range(steps + 1)]
        self.heads = nn.ModuleDict({t: Head(cin, c) for t, c in tasks.items()})
        self.feature_taps = {**{f"enc{i + 1}": f"encoder.stages.{i}" for i in range(depth)},
                             **{t: f"heads.{t}" for t in tasks}}

    def forward_features(self, x: Tensor, oracle: Mapping[int, Tensor] | None = None
                         ) -> tuple[dict[str, Tensor], dict[int, Tensor], dict[int, Tensor]]:
        """({task: output}, {stage: projected audio features a (N, C, h_a, w_a)},
        {stage: the bridged map in the teacher's grid (N, C, h, w)}). `oracle` ({stage: the teacher's features
        (N, C, h, w)}) is the bridged map of `bridge: oracle`."""
        if self.bridge == "oracle" and (oracle is None or any(s not in oracle for s in self.levels)):
            raise KdforgeError(f"AudioDenseNet: bridge oracle needs the teacher's features of stages "
                               f"{sorted(self.levels)}")
        feats = self.encoder(x)
        projected, bridged = {}, {}
        for s, (c, h, w) in self.levels.items():
            a = self.proj[str(s)](feats[s - 1])
            projected[s] = a
            if self.bridge == "sam":
                p_bar, _ = self.sam[str(s)](a.flatten(2).transpose(1, 2))
                bridged[s] = p_bar.transpose(1, 2).reshape(a.shape[0], c, h, w)
            elif self.bridge == "oracle":
                bridged[s] = oracle[s].to(a.dtype)                           # type: ignore[index]
            else:
                bridged[s] = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)
        by_grid = {tuple(m.shape[-2:]): m for m in bridged.values()}
        y: Tensor | None = None
        for block, grid in zip(self.decoder, self.grids, strict=True):
            parts = [] if y is None else [F.interpolate(y, size=grid, mode="bilinear", align_corners=False)]
            if grid in by_grid:
                parts.append(by_grid[grid])
            y = block(torch.cat(parts, 1))
        return {t: head(y) for t, head in self.heads.items()}, projected, bridged

    def forward(self, x: Tensor, oracle: Mapping[int, Tensor] | None = None) -> dict[str, Tensor]:
        return self.forward_features(x, oracle)[0]


def berhu(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Reverse Huber: |e| where |e| <= c, (e^2 + c^2) / (2c) beyond; c = 0.2 max |e| (over valid pixels)."""
    err = (pred.float() - target.float()).abs()
    if valid is not None:
        err = err[valid]
    if err.numel() == 0:
        return pred.sum() * 0.0
    c = (0.2 * err.detach().max()).clamp_min(1e-6)
    return torch.where(err <= c, err, (err * err + c * c) / (2 * c)).mean()


def depth_mae(pred: Tensor, target: Tensor) -> float:
    """Mean absolute error over measured pixels (target > 0), the paper's headline depth metric."""
    pred, target = pred.reshape(target.shape).float(), target.float()
    valid = target > 0
    return float((pred[valid] - target[valid]).abs().mean())


def depth_delta(pred: Tensor, target: Tensor, threshold: float = 1.25) -> float:
    """Fraction of measured pixels (target > 0) with max(pred / target, target / pred) < threshold."""
    pred, target = pred.reshape(target.shape).float(), target.float()
    valid = target > 0
    p, t = pred[valid].clamp_min(1e-6), target[valid]
    return float((torch.maximum(p / t, t / p) < threshold).float().mean())


class AudioDenseModule(TaskModule):
    """The student, its task losses against the batch targets and the feature losses against the teacher's taps."""

    frozen: tuple[str, ...] = ()

    def __init__(self, student: AudioDenseNet, teacher_taps: Mapping[int, str], feature: str = "none",
                 lam: float = 0.0, margin: float = 0.3, neg: str = "all", triplet_on: str = "raw",
                 depth_loss: str = "berhu", task_weights: Mapping[str, float] | None = None, seed: int = 0,
                 warmup_steps: int = 0) -> None:
        super().__init__()
        if feature not in FEATURE_LOSSES or neg not in NEGATIVES or triplet_on not in ("raw", "aligned") \
                or depth_loss not in ("berhu", "l1"):
            raise KdforgeError(f"audio dense module: bad feature={feature!r} / neg={neg!r} / triplet_on={triplet_on!r}"
                               f" / depth_loss={depth_loss!r}")
        self.student, self.teacher_taps = student, dict(teacher_taps)
        self.feature, self.lam, self.margin, self.neg, self.triplet_on = feature, float(lam), margin, neg, triplet_on
        self.depth_loss, self.task_weights, self.seed = depth_loss, dict(task_weights or {}), seed
        self.warmup_steps = int(warmup_steps)

    def eval_model(self) -> nn.Module:
        return self.student

    def task_loss(self, task: str, pred: Tensor, target: Tensor) -> Tensor:
        if task == "depth":
            valid = target > 0
            if self.depth_loss == "berhu":
                return berhu(pred[:, 0], target, valid)
            return (pred[:, 0].float() - target).abs()[valid].sum() / valid.sum().clamp_min(1)
        if task == "semseg":
            return F.cross_entropy(pred.float(), target, ignore_index=IGNORE)
        raise KdforgeError(f"audio dense: no loss for task '{task}' (depth, semseg)")

    def feature_loss(self, stage: int, a: Tensor, bridged: Tensor, v: Tensor, step: int) -> Tensor:
        if self.feature == "mse":
            return F.mse_loss(F.interpolate(a, size=v.shape[-2:], mode="bilinear", align_corners=False).float(),
                              v.float())
        s = bridged if self.triplet_on == "aligned" else a
        g = seeded_generator(self.seed, 61, step, stage) if self.neg == "adjacent" else None
        return loose_triplet_feature_kd(v.flatten(2).transpose(1, 2), s.flatten(2).transpose(1, 2), self.margin,
                                        self.neg, tuple(s.shape[-2:]), g)

    def forward(self, batch: Batch) -> Step:
        feats = (batch.teacher_outputs or {}).get("teacher", {})
        uses = (self.feature != "none" and self.lam > 0) or self.student.bridge == "oracle"
        missing = [tap for tap in self.teacher_taps.values() if uses and tap not in feats]
        if missing:
            raise KdforgeError(f"audio dense: the batch lacks the teacher's '{missing[0]}' features")
        oracle = {s: feats[tap] for s, tap in self.teacher_taps.items()} if self.student.bridge == "oracle" else None
        outputs, projected, bridged = self.student.forward_features(batch.images, oracle)
        losses = {t: float(self.task_weights.get(t, 1.0)) * self.task_loss(t, out, batch.target[t])
                  for t, out in outputs.items()}
        groups = {t: "task" for t in losses}
        if self.feature != "none" and self.lam > 0:
            lam = self.lam if batch.step >= self.warmup_steps else 0.0     # the warm-up: L_p alone
            for s, tap in self.teacher_taps.items():
                name = f"{self.feature}_{tap}"
                losses[name] = lam * self.feature_loss(s, projected[s], bridged[s], feats[tap], batch.step)
                groups[name] = "distill"
        return Step(outputs=outputs, losses=losses, groups=groups)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, images: Tensor, taps: Sequence[str], device: torch.device,
                    batch_size: int = 64) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The frozen teacher's ({task: output}, {tap: feature}) on uint8 `images`, on the CPU, in eval mode."""
    was = teacher.training
    teacher.eval()
    outs: dict[str, list[Tensor]] = {}
    feats: dict[str, list[Tensor]] = {}
    with FeatureTap(teacher, list(taps), detach=True) as tap:
        for start in range(0, len(images), batch_size):
            tap.clear()
            for k, v in teacher(normalise(images[start:start + batch_size]).to(device)).items():
                outs.setdefault(k, []).append(v.float().cpu())
            for k, v in tap.features.items():
                feats.setdefault(k, []).append(v.float().cpu())
    teacher.train(was)
    return {k: torch.cat(v) for k, v in outs.items()}, {k: torch.cat(v) for k, v in feats.items()}


def _as_targets(outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Teacher predictions as pseudo ground truth: depth (N, H, W), semantic labels (argmax)."""
    out = {}
    for t, v in outputs.items():
        out[t] = v.argmax(1) if t == "semseg" else v[:, 0]
    return out


def audio_metrics(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], num_classes: int) -> dict[str, float]:
    """depth_rmse, depth_absrel, depth_delta1 and semseg_miou of `outputs` against the ground truth."""
    out: dict[str, float] = {}
    for task, pred in outputs.items():
        if task == "depth":
            errors = depth_errors(pred[:, 0], targets["depth"])
            out["depth_rmse"], out["depth_absrel"] = errors["rmse"], errors["absrel"]
            out["depth_mae"] = depth_mae(pred[:, 0], targets["depth"])
            out["depth_delta1"] = depth_delta(pred[:, 0], targets["depth"])
        elif task == "semseg":
            out["semseg_miou"] = miou(pred.argmax(1), targets["semseg"], num_classes)
    return out


def prior_depth_metrics(train_depth: Tensor, test_depth: Tensor) -> dict[str, float]:
    """The best audio-blind predictors of the test depth: the per-pixel mean training map (RMSE-optimal) and the
    per-pixel median map (MAE-optimal); their test RMSE, MAE and delta < 1.25."""
    mean = train_depth.float().mean(0, keepdim=True).expand_as(test_depth)
    median = train_depth.float().median(0, keepdim=True).values.expand_as(test_depth)
    return {"test_mean_map_depth_rmse": depth_errors(mean, test_depth)["rmse"],
            "test_median_map_depth_mae": depth_mae(median, test_depth),
            "test_mean_map_depth_delta1": depth_delta(mean, test_depth),
            "test_median_map_depth_delta1": depth_delta(median, test_depth)}


class AudioDenseTask(SampledTask):
    """An echo-spectrogram student on `train` (EchoData), taught by a frozen image `teacher` (module doc)."""

    name = "audio_dense"

    def __init__(self, student: AudioDenseNet, train: EchoData, test: EchoData, batch_size: int, seed: int = 0,
                 teacher: nn.Module | None = None, pseudo_gt: bool = True, feature: str = "none", lam: float = 0.0,
                 margin: float = 0.3, neg: str = "all", triplet_on: str = "raw", depth_loss: str = "berhu",
                 task_weights: Mapping[str, float] | None = None, val: EchoData | None = None,
                 extra_result: dict[str, Any] | None = None, teacher_features: str = "post_relu",
                 warmup_epochs: int = 0) -> None:
        if batch_size < 1:
            raise KdforgeError(f"audio dense: batch_size must be >= 1, got {batch_size}")
        if (pseudo_gt or (feature != "none" and lam > 0) or student.bridge == "oracle") and teacher is None:
            raise KdforgeError("audio dense: pseudo_gt, feature losses and bridge oracle need a teacher")
        if warmup_epochs < 0:
            raise KdforgeError(f"audio dense: warmup_epochs must be >= 0, got {warmup_epochs}")
        self.student, self.teacher, self.train, self.test, self.val = student, teacher, train, test, val
        self.batch_size, self.seed, self.pseudo_gt = batch_size, seed, pseudo_gt
        self.module_args = {"feature": feature, "lam": lam, "margin": margin, "neg": neg, "triplet_on": triplet_on,
                            "depth_loss": depth_loss, "task_weights": task_weights, "seed": seed}
        self.uses_features = (feature != "none" and lam > 0) or student.bridge == "oracle"
        self.teacher_taps = {s: f"enc{s}" for s in student.levels}       # the names the module reads
        self.tap_paths = {f"enc{s}": teacher_tap(s, teacher_features) for s in student.levels}
        self.teacher_features, self.warmup_epochs = teacher_features, warmup_epochs
        self.tasks = list(student.tasks)
        missing = [t for t in self.tasks if t not in train.targets or t not in test.targets]
        if missing:
            raise KdforgeError(f"audio dense: the student predicts {missing} but the data has no such targets")
        spec = train.spectrograms
        self.mean = spec.mean((0, 3), keepdim=True)[0]
        self.std = spec.std((0, 3), keepdim=True)[0].clamp_min(1e-6)
        self.extra_result = dict(extra_result or {})
        self.targets: dict[str, Tensor] = {}
        self.features: dict[str, Tensor] = {}
        self.device = torch.device("cpu")

    def inputs(self, spectrograms: Tensor) -> Tensor:
        """Standardised spectrograms (train statistics per channel and frequency bin)."""
        return (spectrograms.float() - self.mean) / self.std

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        self.targets = {t: self.train.targets[t] for t in self.tasks}
        self.features = {}
        if self.teacher is not None and (self.pseudo_gt or self.uses_features):
            self.teacher.to(device)
            outs, feats = self.teacher_outputs(self.train.images, device)
            if self.pseudo_gt:
                self.targets = _as_targets({t: outs[t] for t in self.tasks})
            if self.uses_features:
                self.features = feats
            self.teacher.cpu()
        module = AudioDenseModule(self.student, self.teacher_taps, **self.module_args,
                                  warmup_steps=self.warmup_epochs * self.steps_per_epoch())
        return module.to(device)

    def teacher_outputs(self, images: Tensor, device: torch.device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The teacher's ({task: output}, {enc<s>: feature of the configured kind}) on uint8 `images`."""
        assert self.teacher is not None
        if device != next(self.teacher.parameters()).device:
            self.teacher.to(device)
        outs, feats = teacher_targets(self.teacher, images, list(self.tap_paths.values()), device)
        return outs, {name: feats[path] for name, path in self.tap_paths.items()}

    def batch(self, epoch: int, step: int, env: DistEnv) -> Batch:
        k = epoch * self.steps_per_epoch() + step
        idx = self.batch_index(epoch, step, env)
        target = {t: v[idx].to(self.device) for t, v in self.targets.items()}
        feats = ({"teacher": {tap: v[idx].to(self.device) for tap, v in self.features.items()}}
                 if self.features else None)
        return Batch(images=self.inputs(self.train.spectrograms[idx]).to(self.device), target=target,
                     index=idx.to(self.device), epoch=epoch, step=k, teacher_outputs=feats)

    def split(self, split: str) -> EchoData:
        data = {"train": self.train, "test": self.test, "val": self.val}.get(split)
        if data is None:
            raise KdforgeError(f"audio dense: no '{split}' split (data.num_val sets a validation split)")
        return data

    @torch.no_grad()
    def predict(self, model: nn.Module, spectrograms: Tensor, batch_size: int = 64,
                images: Tensor | None = None) -> dict[str, Tensor]:
        """The student's outputs; `bridge: oracle` also reads the teacher's features of the scenes' `images`."""
        was = model.training
        model.eval()
        parts: dict[str, list[Tensor]] = {}
        oracle = getattr(model, "bridge", None) == "oracle"
        if oracle and images is None:
            raise KdforgeError("audio dense: bridge oracle predicts from the scenes' images too")
        for start in range(0, len(spectrograms), batch_size):
            extra = None
            if oracle:
                feats = self.teacher_outputs(images[start:start + batch_size], self.device)[1]   # type: ignore[index]
                extra = {s: feats[tap].to(self.device) for s, tap in self.teacher_taps.items()}
            for k, v in model(self.inputs(spectrograms[start:start + batch_size]).to(self.device), extra).items():
                parts.setdefault(k, []).append(v.float().cpu())
        model.train(was)
        return {k: torch.cat(v) for k, v in parts.items()}

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = self.split(split)
        with autocast() if autocast is not None else contextlib.nullcontext():
            outputs = self.predict(module.eval_model(), data.spectrograms, images=data.images)
        return audio_metrics(outputs, data.targets, data.num_classes)

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        out = {f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}
        if self.val is not None:
            out.update({f"val_{k}": v for k, v in self.evaluate(module, "val", env).items()})
        if "depth" in self.tasks:      # what a student that hears nothing predicts: the training depth prior
            out.update(prior_depth_metrics(self.train.targets["depth"], self.test.targets["depth"]))
        return {**out, **self.extra_result}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "tasks": self.tasks, "train_scenes": len(self.train), "test_scenes": len(self.test),
                "spectrogram": list(self.train.spectrograms.shape[1:]), "pseudo_gt": self.pseudo_gt,
                "student_parameters": sum(p.numel() for p in self.student.parameters()),
                "bridge": self.student.bridge, "teacher_taps": list(self.tap_paths.values()),
                "warmup_epochs": self.warmup_epochs, **self.module_args}

    def draw(self, module: nn.Module, path: Path, count: int = 4) -> bool:
        """`count` test scenes: image, left spectrogram, per task the truth, the teacher's and the student's maps."""
        from kdforge.plotting import pyplot, save_png

        pick = list(range(min(count, len(self.test))))
        student = self.predict(module.eval_model(), self.test.spectrograms[pick], images=self.test.images[pick])
        teacher = None
        if self.teacher is not None:
            teacher, _ = self.teacher_outputs(self.test.images[pick], self.device)
        rows: list[tuple[str, str | None, str]] = [("image", None, "image"), ("echo (ch 0)", None, "spec")]
        for t in self.tasks:
            rows += [(f"{t} truth", t, "truth")] + ([(f"{t} teacher", t, "teacher")] if teacher else []) + \
                [(f"{t} audio student", t, "student")]
        plt = pyplot()
        fig, axes = plt.subplots(len(rows), len(pick), figsize=(1.5 * len(pick), 1.35 * len(rows)), squeeze=False)
        for j, i in enumerate(pick):
            for r, (label, task, kind) in enumerate(rows):
                ax = axes[r, j]
                if kind == "image":
                    ax.imshow(self.test.images[i].permute(1, 2, 0).numpy())
                elif kind == "spec":
                    ax.imshow(self.test.spectrograms[i, 0].numpy(), origin="lower", aspect="auto", cmap="magma")
                elif kind == "truth":
                    _show(ax, task, self.test.targets[task][i], False, self.test)
                else:
                    src = teacher if kind == "teacher" else student
                    _show(ax, task, src[task][j], True, self.test)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, fontsize=7)
        fig.suptitle("test scenes: the audio student hears only the echo", fontsize=8)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True
