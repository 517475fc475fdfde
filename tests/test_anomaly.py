"""The anomaly-detection task package: data, MVTec folders, anomaly maps, AUROC, and the `rd` recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.tasks.anomaly.data import _texture, defective, load_mvtec, procedural_split, textures
from kdforge.tasks.anomaly.metrics import anomaly_map, auroc, gaussian_blur
from kdforge.tasks.base import seeded_generator

RD = Path(__file__).resolve().parents[1] / "configs/anomaly/rd.yaml"
TINY = ["data.size=16", "data.num_train=8", "data.num_test_normal=4", "data.num_test_defect=4", "train.epochs=1",
        "train.batch_size=4", "teacher.backbone_args={width: 4, depth: 3}", "model.embed=8", "score.sigma=1",
        "trainer.threads=1"]


def test_procedural_data_is_deterministic_and_train_is_normal_only() -> None:
    assert torch.equal(textures(3, "grid", 32, seed=5), textures(3, "grid", 32, seed=5))
    assert not torch.equal(textures(3, "grid", 32, seed=5), textures(3, "grid", 32, seed=6))
    train, test = procedural_split("stripes", 32, num_train=6, num_test_normal=3, num_test_defect=8, seed=2)
    again, _ = procedural_split("stripes", 32, num_train=6, num_test_normal=3, num_test_defect=8, seed=2)
    assert torch.equal(train.images, again.images)
    assert train.labels.sum() == 0 and train.masks.sum() == 0 and set(train.kinds) == {"good"}
    assert test.labels.tolist() == [0] * 3 + [1] * 8
    assert test.kinds[3:] == ["blob", "scratch", "spot", "rotate"] * 2
    assert all(int(m.sum()) > 0 for m in test.masks[3:]) and test.masks[:3].sum() == 0


def test_masks_cover_exactly_the_changed_pixels() -> None:
    size, seed = 32, 4
    data = defective(8, "dots", size, seed=seed)
    for i in range(8):
        clean, _ = _texture("dots", size, seeded_generator(seed, 13, i), 0.05)   # the image before the defect
        clean = (clean * 255).round().to(torch.uint8)
        diff = (data.images[i].int() - clean.int()).abs().amax(0)
        mask = data.masks[i].bool()
        assert diff[~mask].max() == 0, data.kinds[i]                 # nothing changed outside the mask
        assert diff[mask].float().mean() > 10, data.kinds[i]         # and the defect is visible inside it


def _png(path: Path, array: torch.Tensor) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if array.dim() == 2 else "RGB"
    Image.fromarray(array.numpy(), mode).save(path)


def _mvtec(root: Path, mask_side: int = 8) -> None:
    g = torch.Generator().manual_seed(0)
    for name in ("000", "001", "002"):
        _png(root / "train/good" / f"{name}.png", torch.randint(0, 255, (8, 8, 3), generator=g, dtype=torch.uint8))
    _png(root / "test/good/000.png", torch.randint(0, 255, (8, 8, 3), generator=g, dtype=torch.uint8))
    _png(root / "test/crack/000.png", torch.randint(0, 255, (8, 8, 3), generator=g, dtype=torch.uint8))
    mask = torch.zeros(mask_side, mask_side, dtype=torch.uint8)
    mask[: mask_side // 2, : mask_side // 2] = 255
    _png(root / "ground_truth/crack/000_mask.png", mask)


def test_mvtec_folder_loader(tmp_path: Path) -> None:
    _mvtec(tmp_path)
    train, test = load_mvtec(tmp_path, size=8)
    assert train.images.shape == (3, 3, 8, 8) and train.labels.sum() == 0
    assert test.kinds == ["crack", "good"] and test.labels.tolist() == [1, 0]
    assert test.masks[0].sum() == 16 and test.masks[0, :4, :4].all() and test.masks[1].sum() == 0
    from PIL import Image

    with Image.open(tmp_path / "test/crack/000.png") as im:
        assert torch.equal(test.images[0], torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
    small, small_test = load_mvtec(tmp_path, size=4)          # resized (masks with nearest neighbours)
    assert small.images.shape == (3, 3, 4, 4) and small_test.masks[0].tolist() == [[1, 1, 0, 0]] * 2 + [[0] * 4] * 2


def test_mvtec_errors_are_one_line(tmp_path: Path) -> None:
    _mvtec(tmp_path / "a")
    (tmp_path / "a/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(KdforgeError, match=r"missing mask .*000_mask.png for test image"):
        load_mvtec(tmp_path / "a")
    _mvtec(tmp_path / "b", mask_side=6)
    with pytest.raises(KdforgeError, match=r"mask .* is 6x6 but its image .* is 8x8"):
        load_mvtec(tmp_path / "b")
    with pytest.raises(KdforgeError, match="no images in"):
        load_mvtec(tmp_path / "empty")


def _rank_auc(labels: list[int], scores: list[float]) -> float:
    """Mann-Whitney: P(score of a positive > score of a negative) + half the ties, by a plain double loop."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return 100.0 * wins / (len(pos) * len(neg))


def test_auroc_hand_case_and_rank_formula() -> None:
    # negatives 0.1, 0.4; positives 0.35, 0.8: 3 of the 4 pairs ordered -> 75 %
    assert auroc(torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.4, 0.35, 0.8])) == pytest.approx(75.0)
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(60, generator=g) < 0.4).long()
    scores = (torch.rand(60, generator=g) * 5).round() + labels          # ties on purpose
    assert auroc(labels, scores) == pytest.approx(_rank_auc(labels.tolist(), scores.tolist()))
    assert math.isnan(auroc(torch.zeros(4), torch.rand(4)))


def test_anomaly_map_is_the_sum_of_one_minus_cos_over_scales() -> None:
    fine_s = torch.tensor([[[[1.0, 1.0], [0.0, 3.0]], [[0.0, 1.0], [2.0, 4.0]]]])     # (1, 2, 2, 2)
    fine_t = torch.tensor([[[[2.0, 1.0], [1.0, 4.0]], [[0.0, -1.0], [0.0, 3.0]]]])
    coarse_s, coarse_t = torch.tensor([[[[1.0]], [[0.0]]]]), torch.tensor([[[[1.0]], [[1.0]]]])   # cos = 1/sqrt(2)
    # per position 1 - <s, t> / (|s| |t|): (1,0)v(2,0): 0; (1,1)v(1,-1): 1; (0,2)v(1,0): 1; (3,4)v(4,3): 1 - 24/25
    fine = torch.tensor([[0.0, 1.0], [1.0, 1 - 24 / 25]])
    got = anomaly_map([fine_s, coarse_s], [fine_t, coarse_t], 2)
    assert torch.allclose(got[0], fine + (1 - 1 / math.sqrt(2)), atol=1e-6)


def test_gaussian_blur_matches_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    maps = torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (1.0, 4.0):
        want = torch.stack([torch.from_numpy(ndimage.gaussian_filter(m.numpy(), sigma, mode="mirror", truncate=4.0))
                            for m in maps])
        assert torch.allclose(gaussian_blur(maps, sigma), want, atol=1e-10)


def test_rd_recipe_trains_and_writes_maps(tmp_path: Path) -> None:
    out = tmp_path / "rd"
    assert main(["train", str(RD), *TINY, "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    for key in ("test_image_auroc", "test_pixel_auroc", "test_defect_error", "test_normal_error"):
        assert key in result and 0 <= result[key] <= 100
    assert result["picture"] == "predictions.png" and (out / "predictions.png").stat().st_size > 1000
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train_kd" in header and "train_nm" not in header


def test_bad_rd_recipes_fail_in_one_line(tmp_path: Path, capsys) -> None:
    for override, message in (("data.category=waves", "data.category must be one of"),
                              ("data.format=mvtec", "needs data.root"),
                              ("teacher.taps=[feat3, feat1]", "fine to coarse"),
                              ("data.strength=0", "data.strength must be in")):
        assert main(["train", str(RD), *TINY, override, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_teacher_loads_a_users_weights(tmp_path: Path) -> None:
    from kdforge.methods.rd import TeacherConfig, make_teacher
    from kdforge.models import create_model

    net = create_model("convnet", num_classes=4, in_channels=3, width=4, depth=3)
    torch.save(net.state_dict(), tmp_path / "teacher.pt")
    cfg = TeacherConfig(backbone_args={"width": 4, "depth": 3}, checkpoint=str(tmp_path / "teacher.pt"), seed=7)
    teacher = make_teacher(cfg)
    got = teacher.net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert [c for c, _ in teacher.shapes(16)] == [4, 8, 16]
    cfg.backbone_args = {"width": 8, "depth": 3}
    with pytest.raises(KdforgeError, match="does not fit the teacher backbone"):
        make_teacher(cfg)
