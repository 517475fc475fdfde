"""Streaming ImageFolder splits: same samples, batches, training views, weights and resume as in memory."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdforge.config import load_config
from kdforge.data import load_split
from kdforge.data.folder import image_folder
from kdforge.data.stream import LoaderBatches, StreamingImages, TensorBatches, image_folder_stream
from kdforge.data.transforms import normalize, to_float
from kdforge.errors import ConfigError, KdforgeError
from kdforge.train.checkpoint import load_tensors
from kdforge.train.metrics import evaluate_counts
from kdforge.train.trainer import Trainer, epoch_order, epoch_slices

CLASSES = ("cat", "dog", "eel")
SIZE = 8


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/{train,test}/<class>/*.png: random RGB images of mixed sizes (so the resize+crop path runs)."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 10), ("test", 4)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (SIZE, SIZE) if i % 2 else (SIZE + 2 + i % 3, SIZE + 5)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


def test_streaming_split_matches_in_memory_split(tree: Path) -> None:
    mem = image_folder(tree, split="train", image_size=SIZE)
    stream = load_split("image_folder", "train", str(tree), stream=True, image_size=SIZE)
    assert isinstance(stream, StreamingImages) and len(stream) == len(mem) == 30
    assert stream.labels.dtype == torch.int64 and torch.equal(stream.labels, mem.labels)
    assert (stream.num_classes, stream.class_names, stream.image_shape) == (3, list(CLASSES), (3, SIZE, SIZE))
    assert (stream.mean, stream.std) == (mem.mean, mem.std)
    index = torch.tensor([29, 0, 13, 13, 7])
    assert torch.equal(stream.fetch(index), mem.images[index])
    sub = stream.subset(torch.tensor([4, 20, 11]))
    assert torch.equal(sub.labels, mem.labels[[4, 20, 11]])
    assert torch.equal(sub.fetch(torch.tensor([2, 0])), mem.images[[11, 4]])
    # the streaming factory takes exactly the in-memory loader's options
    assert inspect.signature(image_folder_stream).parameters.keys() == inspect.signature(image_folder).parameters.keys()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_the_given_chunks_in_order(tree: Path, workers: int) -> None:
    mem = image_folder(tree, split="train", image_size=SIZE)
    stream = image_folder_stream(tree, "train", SIZE)
    chunks = [[5, 1, 28], [0], [17, 3]]
    got = list(stream.loader(chunks, workers))
    assert len(got) == 3
    for (images, labels, index), chunk in zip(got, chunks):
        assert index.tolist() == chunk and images.dtype == torch.uint8
        assert torch.equal(images, mem.images[chunk]) and torch.equal(labels, mem.labels[chunk])


def test_epoch_slices_shard_each_global_batch() -> None:
    order = epoch_order(30, seed=3, epoch=1)
    one = [order[s] for s in epoch_slices(1, 3, 8)]
    assert [o.tolist() for o in one] == [order[8:16].tolist(), order[16:24].tolist()]
    ranks = [[order[s] for s in epoch_slices(1, 3, 8, rank, 4)] for rank in (0, 1)]
    for step, whole in enumerate(one):
        assert torch.cat([ranks[0][step], ranks[1][step]]).tolist() == whole.tolist()


def test_batch_sources_agree_with_each_other(tree: Path) -> None:
    mem = image_folder(tree, split="train", image_size=SIZE)
    order = epoch_order(len(mem), seed=0, epoch=2)
    slices = epoch_slices(1, 3, 8, rank=1, local_bs=4)
    dev = torch.device("cpu")
    a = list(TensorBatches(mem, dev).epoch(order, slices))
    b = list(LoaderBatches(image_folder_stream(tree, "train", SIZE), dev, workers=2).epoch(order, slices))
    assert len(a) == len(b) == 2
    for (xa, ya, ia), (xb, yb, ib), s in zip(a, b, slices):
        assert ia.tolist() == ib.tolist() == order[s].tolist()
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xb, mem.images[order[s]])


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_counts_on_a_streamed_split_by_hand(tree: Path, workers: int) -> None:
    mem = image_folder(tree, split="test", image_size=SIZE)
    stream = image_folder_stream(tree, "test", SIZE)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 3))

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return normalize(to_float(x), mem.mean, mem.std)

    with torch.no_grad():
        logits = model(prepare(mem.images))
    hits = (logits.argmax(1) == mem.labels).double()
    ce = F.cross_entropy(logits, mem.labels, reduction="none").double()
    for rank, (lo, hi) in enumerate([(0, 6), (6, 12)]):   # 12 samples, 2 ranks, uneven batches of 5
        counts = evaluate_counts(model, stream, prepare, batch_size=5, shard=(rank, 2), workers=workers)
        assert counts[0] == hits[lo:hi].sum() and counts[1] == hi - lo   # 3 classes: top-5 is every sample
        assert abs(float(counts[2]) - float(ce[lo:hi].sum())) < 1e-4 and counts[3] == hi - lo


# ------------------------------------------------------------------------------------------- trainer


def _cfg(tree: Path, *extra: str):
    return load_config(None, [
        "data.name=image_folder", f"data.root={tree}", f"data.args={{image_size: {SIZE}}}", "data.batch_size=8",
        "data.eval_batch_size=5", "data.val_fraction=0.2", "data.augment.crop_padding=2",
        "student.name=convnet", "student.args={width: 8, depth: 2}", "schedule.name=cosine", "optim.lr=0.1",
        "trainer.epochs=2", "trainer.progress=false", "trainer.tensorboard=false", "trainer.device=cpu", *extra])


def _metrics(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader((run / "metrics.csv").open())]


@pytest.fixture(scope="module")
def runs(tree: Path, tmp_path_factory) -> dict[str, Path]:
    """One in-memory run and two streamed runs (in-process and 2 workers) of the same config."""
    out = {}
    for name, extra in (("memory", []), ("stream0", ["data.stream=true", "data.workers=0"]),
                        ("stream2", ["data.stream=true", "data.workers=2"])):
        out[name] = tmp_path_factory.mktemp(name)
        Trainer(_cfg(tree, *extra), out[name], quiet=True).fit()
    return out


def test_streamed_training_equals_in_memory_training(runs: dict[str, Path]) -> None:
    ref = load_tensors(runs["memory"] / "checkpoints/last.safetensors")
    for name in ("stream0", "stream2"):
        got = load_tensors(runs[name] / "checkpoints/last.safetensors")
        assert got.keys() == ref.keys()
        for key in ref:
            assert torch.equal(got[key], ref[key]), (name, key)
        assert _metrics(runs[name]) == _metrics(runs["memory"])
        assert json.loads((runs[name] / "result.json").read_text())["test_top1"] == \
            json.loads((runs["memory"] / "result.json").read_text())["test_top1"]
    rows = _metrics(runs["memory"])
    assert [r["train_samples"] for r in rows] == ["24", "24"]   # 30 train - 6 val, 3 full batches


def test_streamed_views_equal_in_memory_views(tree: Path, tmp_path: Path) -> None:
    mem = Trainer(_cfg(tree), tmp_path / "m", quiet=True)
    stream = Trainer(_cfg(tree, "data.stream=true", "data.workers=0"), tmp_path / "s", quiet=True)
    assert isinstance(stream.data.train, StreamingImages) and isinstance(stream.task.source, LoaderBatches)
    assert isinstance(stream.data.eval, StreamingImages) and isinstance(mem.task.source, TensorBatches)
    index = torch.tensor([3, 17, 0, 9])
    a, b = mem.make_batch(index, 1, 0), stream.make_batch(index, 1, 0)
    assert torch.equal(a.images, b.images) and torch.equal(a.target, b.target)
    assert not torch.equal(a.images, mem.make_batch(index, 0, 0).images)   # views do change per epoch


def test_streamed_resume_is_exact(tree: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    stream = ["data.stream=true", "data.workers=2"]
    cut = tmp_path / "cut"
    Trainer(_cfg(tree, *stream, "trainer.stop_after_steps=4"), cut, quiet=True).fit()   # 3 steps per epoch
    state = json.loads((cut / "checkpoints/last.json").read_text())
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, 4, 1)
    Trainer(_cfg(tree, *stream), cut, resume=True, quiet=True).fit()
    full = load_tensors(runs["stream2"] / "checkpoints/last.safetensors")
    got = load_tensors(cut / "checkpoints/last.safetensors")
    for key in full:
        assert torch.equal(got[key], full[key]), key
    # (the resumed epoch's train_* averages cover only the steps after the resume, as in memory)
    evals = [{k: v for k, v in r.items() if not k.startswith("train_")} for r in _metrics(cut)]
    assert evals == [{k: v for k, v in r.items() if not k.startswith("train_")} for r in _metrics(runs["stream2"])]


def test_stream_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(KdforgeError, match="data set 'procedural_cifar' cannot stream") as err:
        load_split("procedural_cifar", "train", stream=True, num_train=8, num_test=4, cache=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.workers must be >= 0"):
        _cfg(tree, "data.workers=-1")
    with pytest.raises(KdforgeError, match="no option 'size'"):
        load_split("image_folder", "train", str(tree), stream=True, size=8)
    cfg = _cfg(tree, "data.stream=true", "teacher.name=convnet", f"teacher.cache={tmp_path / 'cache'}",
               "terms=[{loss: kd}]")
    with pytest.raises(KdforgeError, match="teacher.cache is not supported with data.stream=true") as err:
        Trainer(cfg, tmp_path / "run", quiet=True)
    assert "\n" not in str(err.value)
