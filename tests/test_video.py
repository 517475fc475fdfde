"""The video package: procedural multimodal clips (pure functions of the seed, each modality carrying its part of
the label), aligned augmentation, ECE against a hand-worked case and a plain loop, FLOPs against hand counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.video import (
    ClipModule,
    ClipNet,
    ClipSpec,
    ClipTask,
    FusionNet,
    calibration_error,
    clip_model,
    cost,
    procedural_clips,
    reliability,
    shift_clips,
    split_holdout,
    top1,
)
from kdforge.tasks.video.data import _DIRECTIONS
from kdforge.train.distributed import DistEnv

SMALL = ClipSpec(num_train=48, num_val=12, num_test=12)


def test_clips_are_a_pure_function_of_seed_and_split() -> None:
    a, b = procedural_clips(SMALL, "train"), procedural_clips(SMALL, "train")
    assert a.shapes() == {"rgb": (3, 8, 16, 16), "flow": (2, 8, 16, 16), "audio": (1, 12, 16)}
    for m in a.modalities:
        assert torch.equal(a.modalities[m], b.modalities[m])
    test = procedural_clips(SMALL, "test")
    assert not torch.equal(test.modalities["rgb"][:12], a.modalities["rgb"][:12])
    other = procedural_clips(ClipSpec(num_train=48, seed=1), "train")
    assert not torch.equal(other.modalities["rgb"], a.modalities["rgb"])
    assert a.num_classes == 12 and len(a.names) == 12 and int(a.true_labels.max()) < 12
    with pytest.raises(KdforgeError, match="unknown clip split"):
        procedural_clips(SMALL, "holdout")


def test_label_noise_only_touches_training_labels() -> None:
    spec = ClipSpec(num_train=400, num_val=50, num_test=50, label_noise=0.5)
    train, test = procedural_clips(spec, "train"), procedural_clips(spec, "test")
    changed = float((train.labels != train.true_labels).float().mean())
    assert 0.35 < changed < 0.55                     # half replaced, 1/12 of those by the same class
    assert torch.equal(test.labels, test.true_labels)
    assert torch.equal(procedural_clips(ClipSpec(num_train=400, num_val=50, num_test=50), "train").true_labels,
                       train.true_labels)           # noise does not change the clips' actions


def test_flow_carries_the_verb_and_rgb_the_noun() -> None:
    spec = ClipSpec(num_train=200, num_val=4, num_test=4)
    data = procedural_clips(spec, "train")
    verb, noun = data.true_labels // spec.nouns, data.true_labels % spec.nouns
    mean_flow = data.modalities["flow"][:, :, 1:].mean(dim=(2, 3, 4))               # (N, 2) (dy, dx)
    dirs = torch.tensor(_DIRECTIONS[: spec.verbs])
    assert float(((mean_flow @ dirs.T).argmax(1) == verb).float().mean()) > 0.95
    # the noun's colour: the mean frame of a noun's clips departs from the mean of all clips towards its palette
    # colour, and the flow of different nouns is alike (no colour in flow)
    from kdforge.tasks.video.data import _palette

    palette = _palette(spec.nouns)
    rgb = data.modalities["rgb"].mean(dim=(2, 3, 4))                                # (N, 3)
    for k in range(spec.nouns):
        lift = rgb[noun == k].mean(0) - rgb.mean(0)
        assert torch.cosine_similarity(lift, palette[k] - palette.mean(0), dim=0) > 0.9
    per_noun = torch.stack([data.modalities["flow"][noun == k].abs().mean() for k in range(spec.nouns)])
    assert float(per_noun.max() / per_noun.min()) < 1.05


def test_holdout_split_is_disjoint_and_complete() -> None:
    data = procedural_clips(SMALL, "train")
    own, held = split_holdout(data, 0.25)
    assert len(own) == 36 and len(held) == 12
    assert set(own.tolist()).isdisjoint(held.tolist()) and sorted([*own.tolist(), *held.tolist()]) == list(range(48))


def test_bad_specs_fail_in_one_line() -> None:
    for spec, message in ((ClipSpec(verbs=9), "verbs must be in 1..8"), (ClipSpec(holdout_fraction=1.0),
                          "holdout_fraction"), (ClipSpec(label_noise=-0.1), "label_noise"),
                          (ClipSpec(num_val=0), "num_val")):
        with pytest.raises(ConfigError, match=message):
            spec.check()


def test_shift_is_shared_by_visual_modalities_and_pure() -> None:
    data = procedural_clips(SMALL, "train")
    index = torch.tensor([3, 7, 11])
    inputs = {m: v[index] for m, v in data.modalities.items()}
    a = shift_clips(inputs, index, epoch=2, seed=5, shift=2)
    b = shift_clips(inputs, index, epoch=2, seed=5, shift=2)
    assert all(torch.equal(a[m], b[m]) for m in a)
    assert torch.equal(a["audio"], inputs["audio"])
    for j in range(3):          # the same (dy, dx) for rgb and flow: recover it from rgb, apply it to flow
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(torch.roll(inputs["rgb"][j], (dy, dx), (2, 3)), a["rgb"][j])]
        assert len(hits) == 1
        assert torch.equal(torch.roll(inputs["flow"][j], hits[0], (2, 3)), a["flow"][j])
    assert shift_clips(inputs, index, 2, 5, shift=0) is inputs


def _paper_ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """The official `_ECELoss` as a plain loop: bins (lo, hi], |acc - conf| weighted by the bin's share."""
    probs = logits.softmax(1)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [i for i in range(len(labels)) if lo < float(probs[i].max()) <= hi]
        if inside:
            acc = sum(int(probs[i].argmax() == labels[i]) for i in inside) / len(inside)
            conf = sum(float(probs[i].max()) for i in inside) / len(inside)
            ece += abs(conf - acc) * len(inside) / len(labels)
    return 100 * ece


def test_ece_hand_worked_case_and_plain_loop() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.62, 0.3, 0.08], [0.2, 0.7, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])
    # bins of 1/15: {0.9, 0.9} acc 1/2 -> |0.9 - 0.5| * 2/4 = 0.2; {0.62} acc 1 -> 0.38 / 4; {0.7} acc 1 -> 0.3 / 4
    want = 100 * (0.2 + 0.38 / 4 + 0.3 / 4)
    assert calibration_error(probs.log(), labels) == pytest.approx(want, abs=1e-6)
    assert top1(probs.log(), labels) == 75.0
    g = torch.Generator().manual_seed(0)
    logits, target = 3 * torch.randn(300, 12, generator=g), torch.randint(12, (300,), generator=g)
    assert calibration_error(logits, target) == pytest.approx(_paper_ece(logits.double(), target), abs=1e-4)
    rel = reliability(probs.log(), labels)
    assert rel["count"].sum() == 4 and rel["count"][13] == 2 and rel["accuracy"][13] == 0.5
    assert rel["confidence"][9] == pytest.approx(0.62)
    with pytest.raises(KdforgeError, match="logits"):
        calibration_error(probs, labels[:2])


def test_flops_match_hand_counts() -> None:
    shapes = {"rgb": (3, 8, 16, 16), "flow": (2, 8, 16, 16), "audio": (1, 12, 16)}
    w, c = 4, 12
    net = ClipNet("rgb", shapes["rgb"], c, width=w)
    want = 2 * (w * 3 * 27 * 8 * 16 * 16 + 2 * w * w * 27 * 8 * 8 * 8 + 4 * w * 2 * w * 27 * 4 * 4 * 4 + 4 * w * c)
    x = {"rgb": torch.randn(2, 3, 8, 16, 16)}
    assert cost(net, x)["flops"] == want
    assert cost(net, x)["params"] == sum(p.numel() for p in net.parameters())
    audio = ClipNet("audio", shapes["audio"], c, width=w)
    want_a = 2 * (w * 9 * 12 * 16 + 2 * w * w * 9 * 6 * 8 + 4 * w * 2 * w * 9 * 3 * 4 + 4 * w * c)
    assert cost(audio, {"audio": torch.randn(1, 1, 12, 16)})["flops"] == want_a
    assert net(x).shape == (2, c)


def test_fusion_reads_every_modality_and_the_student_only_its_own() -> None:
    shapes = {"rgb": (3, 8, 16, 16), "flow": (2, 8, 16, 16), "audio": (1, 12, 16)}
    fusion = clip_model("fusion", shapes, 12, 4)
    assert isinstance(fusion, FusionNet) and fusion.modalities == ("rgb", "flow", "audio")
    inputs = {"rgb": torch.randn(2, *shapes["rgb"]), "flow": torch.randn(2, *shapes["flow"]),
              "audio": torch.randn(2, *shapes["audio"])}
    fusion.eval()
    base = fusion(inputs)
    for m in shapes:          # changing any modality changes the fused prediction
        changed = dict(inputs, **{m: inputs[m] + 1})
        assert not torch.allclose(fusion(changed), base)
    rgb = clip_model("rgb", shapes, 12, 4).eval()
    assert torch.equal(rgb(dict(inputs, flow=inputs["flow"] + 1)), rgb(inputs))
    with pytest.raises(KdforgeError, match="without rgb"):
        rgb({"flow": inputs["flow"]})
    with pytest.raises(ConfigError, match="unknown model"):
        clip_model("depth", shapes, 12, 4)
    grouped = clip_model("fusion", shapes, 12, 4, norm="group")        # per-sample statistics (exact under DDP)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in grouped.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in grouped.modules())
    with pytest.raises(ConfigError, match="norm must be batch or group"):
        ClipNet("rgb", shapes["rgb"], 12, 4, norm="layer")


def test_task_batches_are_index_addressable_and_the_module_uses_labels(tmp_path: Path) -> None:
    train, val, test = (procedural_clips(SMALL, s) for s in ("train", "val", "test"))
    own, _ = split_holdout(train, 0.25)
    task = ClipTask(ClipModule(ClipNet("rgb", train.shapes()["rgb"], 12, 4)), train, val, test, batch_size=8,
                    seed=3, train_index=own)
    module = task.build(torch.device("cpu"), DistEnv())
    assert task.steps_per_epoch() == 4
    a, b = task.batch(1, 2, DistEnv()), task.batch(1, 2, DistEnv())
    assert torch.equal(a.inputs["rgb"], b.inputs["rgb"]) and torch.equal(a.index, b.index)
    seen = torch.cat([task.batch(0, s, DistEnv()).index for s in range(4)])
    assert set(seen.tolist()) <= set(own.tolist()) and len(set(seen.tolist())) == 32
    step = module(a)
    assert set(step.losses) == {"ce"} and step.groups["ce"] == "task"
    assert step.losses["ce"].item() == pytest.approx(F.cross_entropy(step.outputs, a.target).item())
    metrics = task.evaluate(module, "val", DistEnv())
    assert 0 <= metrics["top1"] <= 100 and 0 <= metrics["ece"] <= 100 and math.isfinite(metrics["nll"])
    assert task.draw(module, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000
