"""A user's COCO data (JSON + image folder, real PNG files written here) as detection training and test data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.tasks.detection.images import load_coco_images
from kdforge.tasks.detection.task import DetectionTask
from kdforge.train.distributed import DistEnv

RECIPE = Path(__file__).resolve().parents[1] / "configs/detection/fcos.yaml"
SIZES = [(80, 60), (50, 70), (64, 64), (90, 45)]          # (width, height): landscape, portrait, square


def _write_set(root: Path, name: str, count: int = 4) -> Path:
    """PNG images with one or two filled rectangles each; categories with COCO-like sparse ids 3 and 7."""
    folder = root / f"{name}_images"
    folder.mkdir(parents=True)
    images, anns = [], []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        pixels = torch.full((h, w, 3), 40, dtype=torch.uint8)
        boxes = [(3, [w * 0.1, h * 0.2, w * 0.4, h * 0.5])] + ([(7, [w * 0.55, h * 0.1, w * 0.3, h * 0.3])] if i % 2
                                                                 else [])
        for cat, (x, y, bw, bh) in boxes:
            pixels[int(y):int(y + bh), int(x):int(x + bw)] = torch.tensor([220, 30, 30] if cat == 3 else [30, 30, 220],
                                                                          dtype=torch.uint8)
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        Image.fromarray(pixels.numpy()).save(folder / f"img{i}.png")
        images.append({"id": 10 + i, "file_name": f"img{i}.png", "width": w, "height": h})
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 7, "name": "blue"}, {"id": 3, "name": "red"}]}))
    return path


def test_images_are_letterboxed_and_boxes_follow_with_sparse_category_ids(tmp_path: Path) -> None:
    data = load_coco_images(_write_set(tmp_path, "train"), tmp_path / "train_images", 40)
    assert data.images.shape == (4, 3, 40, 40) and data.images.dtype == torch.uint8
    assert data.category_ids == [3, 7] and data.num_classes == 2
    boxes, labels = data.targets(1)                       # 50 x 70 portrait: scale 40 / 70
    s = 40 / 70
    assert torch.allclose(boxes[0], torch.tensor([5 * s, 14 * s, 25 * s, 49 * s]), atol=1e-4)
    assert labels.tolist() == [0, 1]                      # id 3 -> 0, id 7 -> 1
    width = round(50 * s)                                 # letterbox: padding (black) right of the image
    assert data.images[1, :, :, width:].max() == 0 and data.images[1, :, :, :width].max() > 0
    red = data.images[1, 0, int(30 * s), int(15 * s)]     # inside the red rectangle
    assert red > 200
    assert data.original.annotations[1]["bbox"] == [5.0, 14.0, 20.0, 35.0]      # the user's frame, untouched
    assert data.original.images[1]["width"] == 50


class _Oracle(nn.Module):
    """Predicts each image's letterboxed ground truth, so AP in the user's frame must be 100."""

    def __init__(self, data) -> None:
        super().__init__()
        self.data, self.seen = data, 0

    def forward(self, x):
        return x

    def decode(self, out):
        res = []
        for _ in range(out.shape[0]):
            boxes, labels = self.data.targets(self.seen)
            res.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels})
            self.seen += 1
        return res

    def eval_model(self):
        return self


def test_evaluation_maps_predictions_back_to_the_original_frame(tmp_path: Path) -> None:
    data = load_coco_images(_write_set(tmp_path, "test"), tmp_path / "test_images", 40)
    task = DetectionTask(nn.Identity(), data, data, 2)
    task.device = torch.device("cpu")
    metrics = task.evaluate(_Oracle(data), "test", DistEnv())
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)


def test_a_coco_recipe_trains_and_reports_coco_metrics(tmp_path: Path) -> None:
    _write_set(tmp_path, "train", 8)
    _write_set(tmp_path, "test", 4)
    args = ["data.format=coco", f"data.train={{annotations: {tmp_path}/train.json, images: {tmp_path}/train_images}}",
            f"data.test={{annotations: {tmp_path}/test.json, images: {tmp_path}/test_images}}", "data.size=32",
            "train.epochs=1", "train.batch_size=4", "model.backbone_args={width: 4}", "model.width=8",
            "trainer.progress=false", "trainer.threads=1"]
    assert main(["train", str(RECIPE), *args, "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run/result.json").read_text())
    assert result["steps"] == 2 and 0.0 <= result["test_AP"] <= 100.0


def test_bad_user_data_fails_in_one_line(tmp_path: Path, capsys) -> None:
    path = _write_set(tmp_path, "train")
    tree = json.loads(path.read_text())
    tree["images"][2]["width"] = 65                         # the PNG is 64 wide
    path.write_text(json.dumps(tree))
    with pytest.raises(KdforgeError, match=r"img2.png: image 12: the file is 64x64 but .* says 65x64"):
        load_coco_images(path, tmp_path / "train_images", 32)
    (tmp_path / "train_images/img3.png").write_bytes(b"not a png")
    tree["images"][2]["width"] = 64
    path.write_text(json.dumps(tree))
    with pytest.raises(KdforgeError, match=r"img3.png: image 13: Pillow cannot read it"):
        load_coco_images(path, tmp_path / "train_images", 32)
    with pytest.raises(KdforgeError, match="image folder not found"):
        load_coco_images(path, tmp_path / "nowhere", 32)
    for override, message in (("data.format=voc", "data.format must be procedural or coco"),
                              ("data.format=coco", "data.format coco needs data.train")):
        assert main(["train", str(RECIPE), override, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
