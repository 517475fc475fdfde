"""Multimodal (egocentric-style) action recognition (issue 14): procedural clips seen as RGB, flow and audio.

`data` (one scene description rendered per modality, each modality carrying part of the label;
train / val / test streams, the teachers' part and the held-out part of the training split),
`folders` (a user's EPIC-style clip folders: frames, flow u / v frames, WAV audio, split CSVs),
`models` (a small conv `ClipNet` per modality, the late-fusion `FusionNet`, FLOPs and parameter
counts), `metrics` (top-1, ECE via torchmetrics, reliability bins) and `task` (the clip Task on the
one Trainer, with identically augmented modalities). Recipe: `method: mm_ego_kd`
(kdforge/methods/mm_ego_kd.py, configs/methods/mm_ego_kd.yaml, configs/video/).
"""

from kdforge.tasks.video.data import MODALITIES, ClipData, ClipSpec, procedural_clips, split_holdout
from kdforge.tasks.video.metrics import calibration_error, reliability, top1
from kdforge.tasks.video.models import ClipNet, FusionNet, clip_model, cost
from kdforge.tasks.video.task import ClipBatch, ClipModule, ClipTask, clip_logits, shift_clips

__all__ = ["MODALITIES", "ClipBatch", "ClipData", "ClipModule", "ClipNet", "ClipSpec", "ClipTask", "FusionNet",
           "calibration_error", "clip_logits", "clip_model", "cost", "procedural_clips", "reliability",
           "shift_clips", "split_holdout", "top1"]
