"""Every shipped run-config recipe trains with `kdforge train RECIPE --out DIR` into a run directory.

Task recipes (`method: <id>`) are run by their methods' own tests (tests/test_<id>.py). Here the
run configs of configs/methods and configs/search, and a CIFAR-100 pair, run on a few procedural
images (the data swapped in by overrides, everything else as shipped): a teacher of the recipe's
teacher architecture first, then the recipe itself from that teacher, then `--resume` of the
finished run (which must not retrain).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdforge.cli import main
from kdforge.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = [ROOT / "configs/methods" / f"{n}.yaml" for n in ("dot", "orc", "mdcs")] + [
    ROOT / "configs/search/autokd.yaml", ROOT / "configs/search/boss.yaml",
    ROOT / "configs/cifar100/dkd_resnet32x4_resnet8x4.yaml"]
TINY = ["data.args.num_train=64", "data.args.num_test=32", "data.args.image_size=16", "data.batch_size=16",
        "data.eval_batch_size=32", "trainer.epochs=1", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.amp=none", "trainer.device=cpu"]


def _tiny(path: Path) -> list[str]:
    cfg = load_config(path)
    data = [] if cfg.data.name.startswith("procedural") else [
        "data.name=procedural_cifar", "data.root=null",
        "data.args={num_classes: 10, num_superclasses: 2, cache: false}"]
    if cfg.data.name == "procedural_cifar_lt":
        data = ["data.args.imbalance_factor=4", "data.args.num_classes=4", "data.args.num_superclasses=2"]
    return [*data, *TINY]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_into_a_run_directory(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    tiny = _tiny(path)
    extra = []
    if cfg.teacher is not None:
        teacher_args = json.dumps(cfg.teacher.args)
        assert main(["train", str(path), *tiny, f"student.name={cfg.teacher.name}", f"student.args={teacher_args}",
                     "teacher=null", "terms=[]", "method.name=null", "optim.name=sgd",
                     "--out", str(tmp_path / "teacher")]) == 0
        extra = [f"teacher.checkpoint={tmp_path / 'teacher'}"]
    run = tmp_path / "run"
    assert main(["train", str(path), *tiny, *extra, "--out", str(run)]) == 0
    for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors", "checkpoints/last.json"):
        assert (run / name).is_file(), name
    result = json.loads((run / "result.json").read_text())
    assert 0.0 <= result["test_top1"] <= 100.0 and result["steps"] >= 1
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "result.json").read_text())["steps"] == result["steps"]
