"""The dense-prediction package: procedural scenes, PNG folders, models with taps, metrics by hand, a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.cli import main
from kdforge.distill.terms import Term
from kdforge.errors import KdforgeError
from kdforge.models.taps import FeatureTap
from kdforge.tasks.dense.folders import load_dense_folder
from kdforge.tasks.dense.metrics import boundary_f, depth_errors, miou, mtl_score, normal_angle_error, ods_f
from kdforge.tasks.dense.models import MultiTaskNet, task_channels
from kdforge.tasks.dense.scenes import Scene, SceneObject, boundaries, procedural_split, render
from kdforge.tasks.dense.task import DenseTask, _hflip, task_losses
from kdforge.train.checkpoint import load_tensors

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/methods/mtl_cskd.yaml"
TINY = ["data.size=16", "data.num_train=8", "data.num_test=4", "model.width=2", "teacher.model.width=4",
        "train.epochs=1", "train.batch_size=4", "teacher.loop.epochs=1", "teacher.loop.batch_size=4",
        "trainer.threads=1"]


# -- scenes -------------------------------------------------------------------------------------


def _one_sphere() -> Scene:
    return Scene(objects=[SceneObject("sphere", (0.5, 0.5), 0.25, 0.0, 1.5, 1.0, (1.0, 0.0, 0.0))],
                 floor=(3.0, 1.0, 0.0), light=(0.0, 0.0, 1.0), fog=0.0)


def test_a_hand_built_scene_renders_its_geometry() -> None:
    m = render(_one_sphere(), 32, noise=0.0)
    c = 16                                                  # the pixel at the sphere's centre (0.5 + 0.5/32)
    assert m["semseg"][c, c] == 1 and m["semseg"][0, 0] == 0 and m["instance"][c, c] == 1
    assert m["depth"][c, c] == pytest.approx(1.5 + 0.25 * (1 - math.sqrt(1 - (0.5 / 32 / 0.25) ** 2 * 2)), abs=1e-4)
    # background plane: 3 + 1 * (1 - y) at the top-left pixel centre y = 0.5 / 32
    assert m["depth"][0, 0] == pytest.approx(3 + 1 - 0.5 / 32, abs=1e-5)
    assert torch.allclose(m["normals"].norm(dim=0), torch.ones(32, 32), atol=1e-5)
    assert m["normals"][2, c, c] > 0.99                          # the sphere faces the camera at its centre
    assert m["normals"][0, c, c + 6] > 0.5 and m["normals"][0, c, c - 6] < -0.5   # and turns away at its sides
    assert m["image"][0, c, c] > 200 and m["image"][1, c, c] < 20    # red, lit head-on (no fog)
    disc = ((torch.arange(32) + 0.5) / 32 - 0.5) ** 2
    inside = (disc[:, None] + disc[None, :]) <= 0.25 ** 2
    assert torch.equal(m["semseg"] == 1, inside)
    assert torch.equal(m["boundary"], boundaries(m["instance"]))


def test_boundaries_mark_both_sides_of_every_edge() -> None:
    inst = torch.zeros(4, 5, dtype=torch.long)
    inst[:, 3:] = 1
    expected = torch.zeros(4, 5, dtype=torch.uint8)
    expected[:, 2:4] = 1
    assert torch.equal(boundaries(inst), expected)


def test_the_nearer_object_occludes() -> None:
    far = SceneObject("box", (0.5, 0.5), 0.3, 0.0, 2.5, 0.5, (0.0, 1.0, 0.0))
    near = SceneObject("cone", (0.5, 0.5), 0.15, 0.0, 1.0, 0.5, (0.0, 0.0, 1.0))
    for order in ([far, near], [near, far]):            # depth decides, not the list order
        m = render(Scene(objects=order), 32, noise=0.0)
        assert m["semseg"][16, 16] == near.label and m["semseg"][16, 10] == far.label


def test_procedural_split_is_deterministic_and_complete() -> None:
    a = procedural_split(6, seed=3, size=16)
    b = procedural_split(6, seed=3, size=16)
    assert torch.equal(a.images, b.images) and all(torch.equal(a.targets[k], b.targets[k]) for k in a.targets)
    assert not torch.equal(a.images, procedural_split(6, seed=4, size=16).images)
    assert a.tasks == ["semseg", "depth", "normals", "boundary"] and a.num_classes == 6 and len(a.scenes) == 6
    assert a.images.dtype == torch.uint8 and a.images.shape == (6, 3, 16, 16)
    with pytest.raises(KdforgeError, match="unknown task"):
        procedural_split(2, 0, 16, tasks=("saliency",))


def test_flip_mirrors_targets_and_negates_normal_x() -> None:
    data = procedural_split(2, seed=1, size=16)
    flip = torch.tensor([True, False])
    images, targets = _hflip(data.images, data.targets, flip)
    assert torch.equal(images[0], data.images[0].flip(-1)) and torch.equal(images[1], data.images[1])
    assert torch.equal(targets["normals"][0, 0], -data.targets["normals"][0, 0].flip(-1))
    assert torch.equal(targets["normals"][0, 1:], data.targets["normals"][0, 1:].flip(-1))


# -- PNG folders --------------------------------------------------------------------------------


def _write_folder(root: Path, n: int = 2, size: int = 8) -> None:
    for sub in ("images", "semseg", "depth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / "images" / f"s{i}.png")
        labels = np.zeros((size, size), np.uint8)
        labels[:, size // 2:] = 2
        labels[0, 0] = 255
        Image.fromarray(labels, mode="L").save(root / "semseg" / f"s{i}.png")
        Image.fromarray(np.full((size, size), 1500 + i, np.uint16)).save(root / "depth" / f"s{i}.png")


def test_folder_loader_reads_images_labels_and_depth(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    data = load_dense_folder(tmp_path, ["semseg", "depth"], num_classes=3, size=8)
    assert data.images.shape == (2, 3, 8, 8) and data.names == ["s0", "s1"] and int(data.images[1].max()) == 40
    assert data.targets["semseg"][0, 0, 0] == 255 and data.targets["semseg"][0, 3, 7] == 2
    assert data.targets["depth"][1, 0, 0] == pytest.approx(1.501)
    resized = load_dense_folder(tmp_path, ["semseg"], num_classes=3, size=4)
    labels = resized.targets["semseg"]
    assert labels.shape == (2, 4, 4) and set(labels.unique().tolist()) <= {0, 2, 255}


def test_folder_loader_errors_are_one_line(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    with pytest.raises(KdforgeError, match="holds label value 2, outside 0..1") as e:
        load_dense_folder(tmp_path, ["semseg"], num_classes=2)
    assert len(str(e.value).splitlines()) == 1
    Image.fromarray(np.zeros((5, 8), np.uint8), mode="L").save(tmp_path / "semseg" / "s1.png")
    with pytest.raises(KdforgeError, match=r"s1.png is 8x5 but its image .* is 8x8"):
        load_dense_folder(tmp_path, ["semseg"], num_classes=3)
    (tmp_path / "depth" / "s0.png").unlink()
    with pytest.raises(KdforgeError, match="image 's0' has no depth file"):
        load_dense_folder(tmp_path, ["depth"], num_classes=3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "semseg" / "extra.png")
    with pytest.raises(KdforgeError, match="semseg file .*extra.png has no image"):
        load_dense_folder(tmp_path, ["semseg"], num_classes=3)
    with pytest.raises(KdforgeError, match="normals not found"):
        load_dense_folder(tmp_path, ["normals"], num_classes=3)


# -- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["unet", "fpn"])
def test_multitask_net_outputs_and_taps(arch: str) -> None:
    net = MultiTaskNet(task_channels(["semseg", "depth", "normals", "boundary"], 6), arch, width=4)
    x = torch.randn(2, 3, 16, 16)
    with FeatureTap(net, ["semseg", "depth", "enc4", "dec"]) as tap:
        out = net(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"semseg": (2, 6, 16, 16), "depth": (2, 1, 16, 16),
                                                           "normals": (2, 3, 16, 16), "boundary": (2, 1, 16, 16)}
    assert torch.equal(tap.features["semseg"], out["semseg"]) and torch.equal(tap.features["depth"], out["depth"])
    assert tap.features["enc4"].shape == (2, 32, 2, 2)
    with pytest.raises(KdforgeError, match="divisible by 8"):
        net(torch.randn(1, 3, 12, 12))


# -- metrics by hand ----------------------------------------------------------------------------


def test_miou_hand_case() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    # class 0: inter 1, union 2 (pred 1, target 2) -> 1/2; class 1: inter 2, union 3 -> 2/3; class 2: 1/1;
    # class 3 appears nowhere (left out); the 255 pixel is ignored
    assert miou(pred, target, 4) == pytest.approx(100 * (0.5 + 2 / 3 + 1) / 3)


def test_depth_errors_hand_case() -> None:
    target = torch.tensor([[2.0, 4.0], [0.0, 1.0]])            # the 0 has no measurement
    pred = torch.tensor([[3.0, 4.0], [9.0, 0.5]])
    e = depth_errors(pred, target)
    assert e["rmse"] == pytest.approx(math.sqrt((1 + 0 + 0.25) / 3))
    assert e["absrel"] == pytest.approx((0.5 + 0 + 0.5) / 3)


def test_normal_angle_hand_case() -> None:
    target = torch.zeros(1, 3, 1, 3)
    target[0, 2] = 1.0
    target[0, :, 0, 2] = 0.0                                   # no measurement
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, 2, 0, 0] = 5.0                                     # same direction (0 deg), any length
    pred[0, 0, 0, 1] = 1.0                                     # perpendicular (90 deg)
    assert normal_angle_error(pred, target) == pytest.approx(45.0, abs=1e-4)


def test_boundary_f_hand_case_and_torchmetrics() -> None:
    target = torch.zeros(1, 5, 5)
    target[0, 2, :] = 1                                        # a horizontal edge, 5 px
    prob = torch.zeros(1, 5, 5)
    prob[0, 3, :3] = 0.9                                       # 3 px, one row below
    assert boundary_f(prob, target, 0.5, tolerance=0) == 0.0
    # tolerance 1 (Chebyshev): all 3 predictions match (P = 1); true pixels 0..3 are within 1 px of one, the
    # fifth is 2 px away (R = 0.8)
    assert boundary_f(prob, target, 0.5, tolerance=1) == pytest.approx(2 * 0.8 / 1.8)
    from torchmetrics.functional.classification import binary_f1_score

    g = torch.Generator().manual_seed(0)
    p, t = torch.rand(2, 9, 9, generator=g), (torch.rand(2, 9, 9, generator=g) > 0.7).long()
    assert boundary_f(p, t, 0.5, tolerance=0) == pytest.approx(float(binary_f1_score(p, t, threshold=0.5)), abs=1e-6)
    assert ods_f(prob, target) == pytest.approx(100 * 2 * 0.8 / 1.8)


def test_mtl_score_hand_case() -> None:
    base = {"semseg_miou": 50.0, "depth_rmse": 0.5}
    # +10 % on mIoU (higher is better), rmse 0.55 is 10 % worse (lower is better) -> mean 0
    assert mtl_score({"semseg_miou": 55.0, "depth_rmse": 0.55}, base) == pytest.approx(0.0)
    assert mtl_score({"semseg_miou": 55.0, "depth_rmse": 0.4}, base) == pytest.approx((10 + 20) / 2)
    with pytest.raises(KdforgeError, match="missing"):
        mtl_score({"semseg_miou": 55.0}, base)


def test_task_losses_skip_unmeasured_pixels() -> None:
    pred = {"depth": torch.tensor([[[[1.0, 5.0]]]]),
            "normals": torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]).view(1, 3, 1, 2)}
    target = {"depth": torch.tensor([[[3.0, 0.0]]]),                          # second pixel unmeasured
              "normals": torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]]).view(1, 3, 1, 2)}   # first unmeasured
    losses = task_losses(pred, target, {"depth": 2.0})
    assert float(losses["depth"]) == pytest.approx(2 * 2.0)                   # |1 - 3| with weight 2
    assert float(losses["normals"]) == pytest.approx(1 - 1 / math.sqrt(2))    # (1, 0, 1) vs (0, 0, 1) only


# -- the task on the Trainer --------------------------------------------------------------------


def test_a_term_reads_several_task_outputs_of_both_models() -> None:
    seen = {}

    class Probe(torch.nn.Module):
        needs_teacher = True

        def setup(self, *args) -> None:
            pass

        def forward(self, s, t, ctx):
            seen["s"], seen["t"] = [x.shape for x in s], [x.shape for x in t]
            return sum(x.mean() for x in s) * 0

    data = procedural_split(4, seed=0, size=16)
    ch = task_channels(data.tasks, data.num_classes)
    student, teacher = MultiTaskNet(ch, width=2), MultiTaskNet(ch, "fpn", width=4)
    task = DenseTask(student, data, data, 2, teacher=teacher, terms=[Term(Probe(), ["semseg", "boundary"],
                                                                          ["semseg", "boundary"], name="probe")])
    module = task.build(torch.device("cpu"), None)
    step = module(task.batch(0, 0, _OneProcess()))
    assert seen["s"] == seen["t"] == [(2, 6, 16, 16), (2, 1, 16, 16)]
    assert set(step.losses) == {"semseg", "depth", "normals", "boundary", "probe"}
    assert step.groups["semseg"] == "task" and step.groups["probe"] == "distill"
    # the core teacher execution options apply to dict outputs: bf16 forward, float32 (dict) outputs handed out
    images = task.batch(0, 0, _OneProcess()).images
    exact, _ = module._run_teacher("teacher", images)
    module.set_teacher_execution(torch.bfloat16)
    outputs, _ = module._run_teacher("teacher", images)
    assert isinstance(outputs, dict) and set(outputs) == set(data.tasks)
    assert all(v.dtype == torch.float32 and not v.is_inference() for v in outputs.values())
    assert any(not torch.equal(outputs[k], exact[k]) for k in exact)       # it did run in bf16
    assert all(torch.allclose(outputs[k], exact[k], atol=0.1, rtol=0.1) for k in exact)
    # and a frozen graph of the (fixed) teacher serves the same dict outputs and taps
    assert module.teacher_outputs_ahead
    module.set_teacher_execution(freeze=True)
    frozen, frozen_taps = module._run_teacher("teacher", images)
    _, exact_taps = module._run_teacher("teacher", images)
    assert module.frozen_teachers["teacher"].failed is None and module.frozen_teachers["teacher"]._graphs
    assert all(torch.allclose(frozen[k], exact[k], atol=1e-4, rtol=1e-4) for k in exact)
    assert frozen_taps.keys() == {"semseg", "boundary"} == exact_taps.keys()


def test_pipelined_teacher_training_equals_sequential(tmp_path: Path, monkeypatch) -> None:
    from kdforge.train.stages import run_recipe
    from kdforge.train.teacher_pipeline import TeacherPipeline

    pipelined = []
    original = TeacherPipeline.batches
    monkeypatch.setattr(TeacherPipeline, "batches", lambda self, b: (pipelined.append(1), original(self, b))[1])
    for mode in ("off", "on"):
        run_recipe(RECIPE, [*TINY, "train.epochs=2", f"trainer.teacher_pipeline={mode}"], out=tmp_path / mode)
        assert bool(pipelined) == (mode == "on")         # the student stage (2 epochs) ran pipelined
    for name in ("teacher", None):
        a, b = (tmp_path / m / ("stages/" + name if name else "") / "checkpoints/last.safetensors"
                for m in ("off", "on"))
        wa, wb = load_tensors(a), load_tensors(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


class _OneProcess:
    enabled = False


def test_recipe_trains_draws_and_scores_against_baselines(tmp_path: Path) -> None:
    single = tmp_path / "single"
    assert main(["train", str(ROOT / "configs/dense/single_semseg.yaml"), *TINY, "--out", str(single)]) == 0
    assert json.loads((single / "result.json").read_text())["tasks"] == ["semseg"]
    assert main(["train", str(RECIPE), *TINY, f"baselines.semseg={single}", "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    for key in ("test_semseg_miou", "test_depth_rmse", "test_depth_absrel", "test_normals_mean_angle",
                "test_boundary_odsf", "test_mtl_score", "teacher_test_semseg_miou"):
        assert key in result, key
    base = json.loads((single / "result.json").read_text())["test_semseg_miou"]
    assert result["test_mtl_score"] == pytest.approx(100 * (result["test_semseg_miou"] - base) / base)
    header = (tmp_path / "run/metrics.csv").read_text().splitlines()[0]
    assert "train_cs_intra" in header and "train_cs_inter" in header and "train_semseg" in header
    assert (tmp_path / "run/predictions.png").stat().st_size > 1000
    assert (tmp_path / "run/stages/teacher/predictions.png").is_file()


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    from recipe_checks import assert_resume_exact

    assert_resume_exact(RECIPE, [*TINY, "train.epochs=2"], tmp_path, stop_after=3)
