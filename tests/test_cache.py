"""Teacher-output cache: cached KD equals online KD on the trainer's views; stale/corrupt refused."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kdforge.data.cache as cache_mod
from kdforge.config import load_config
from kdforge.data.cache import (
    TeacherCache,
    build_teacher_cache,
    cache_expectation,
    data_hash,
    teacher_state_hash,
)
from kdforge.data.transforms import apply_crop_flip, crop_flip_params, to_normalized
from kdforge.errors import KdforgeError
from kdforge.losses.kd import kd_loss
from kdforge.models import create_model
from kdforge.models.taps import FeatureTap
from kdforge.train.build import load_data
from kdforge.train.trainer import Trainer, epoch_order

DATA = ("data.args={num_train: 96, num_test: 32, num_classes: 10, num_superclasses: 2, image_size: 16, "
        "cache: false}")
SEED, K = 3, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10)
    with torch.no_grad():
        teacher.fc.weight.mul_(10.0)    # trained-teacher-sized logits (|z| ~ 5), so fp16 rounding shows
    weights = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    cfg = load_config(None, [DATA, "data.batch_size=16", "trainer.progress=false",
                             "trainer.tensorboard=false", "trainer.device=cpu", f"trainer.seed={SEED}",
                             "student.name=convnet", "student.args={width: 8}", "teacher.name=resnet8",
                             f"teacher.checkpoint={weights}",
                             "terms=[{loss: ce, teacher: null, group: task}, {loss: kd, weight: 1.0}]"])
    data = load_data(cfg.data, 0)
    trainer = Trainer(cfg, root / "run", data=data, quiet=True)
    tmodel = trainer.distiller.teachers["teacher"]
    aug = cfg.data.augment
    path = build_teacher_cache(tmodel, data.train, root / "c", epochs_k=K, seed=SEED,
                               crop_padding=aug.crop_padding, flip=aug.flip, mean=data.train.mean,
                               std=data.train.std, taps=["feat2"], batch_size=40, progress=False)
    expect = cache_expectation(tmodel, data.train, seed=SEED, crop_padding=aug.crop_padding, flip=aug.flip,
                               mean=data.train.mean, std=data.train.std, taps=["feat2"])
    return {"root": root, "trainer": trainer, "teacher": tmodel, "data": data, "path": path, "expect": expect}


def test_cached_kd_equals_online_kd_on_trainer_views(setup) -> None:
    trainer, teacher, data = setup["trainer"], setup["teacher"], setup["data"]
    cache = TeacherCache.open(setup["path"], expect=setup["expect"])
    trainer.distiller.train()
    for epoch in range(K):
        index = epoch_order(len(data.train), SEED, epoch)[:16]
        batch = trainer.make_batch(index, epoch, 0)
        with torch.no_grad(), FeatureTap(teacher, ["feat2"]) as tap:
            online = teacher(batch.images)
            online_feat = tap.features["feat2"]
        cached = cache.lookup(epoch, index)
        assert cached["logits"].dtype == torch.float32 and cached["logits"].shape == (16, 10)
        assert torch.allclose(cached["logits"], online, atol=1e-2)
        assert torch.allclose(cached["feat2"], online_feat, atol=1e-2)
        student = torch.randn(16, 10, generator=torch.Generator().manual_seed(epoch)) * 3
        want, got = kd_loss(student, online), kd_loss(student, cached["logits"])
        assert abs(float(got) - float(want)) <= 1e-3 * abs(float(want))
        # the real code path: the Distiller reading Batch.teacher_outputs instead of running the teacher
        torch.manual_seed(1)
        step_online = trainer.distiller(batch)
        batch.teacher_outputs = {"teacher": cached}
        step_cached = trainer.distiller(batch)
        a, b = float(step_online.losses["kd"].detach()), float(step_cached.losses["kd"].detach())
        assert abs(a - b) <= 1e-3 * abs(a)


def test_views_rebuild_bit_for_bit_and_wrap_every_k_epochs(setup) -> None:
    trainer, data = setup["trainer"], setup["data"]
    cache = TeacherCache.open(setup["path"])
    index = torch.tensor([5, 0, 95, 17, 42])
    aug = trainer.cfg.data.augment
    for epoch in (1, 1 + K, 1 + 2 * K):
        p = cache.view_params(epoch, index)
        fresh = crop_flip_params(index, 1, SEED, aug.crop_padding, aug.flip)
        assert all(torch.equal(p[k], fresh[k]) for k in ("dx", "dy", "flip"))
        rebuilt = to_normalized(apply_crop_flip(data.train.images[index], p["dx"], p["dy"], p["flip"],
                                                aug.crop_padding), data.train.mean, data.train.std)
        assert torch.equal(rebuilt, trainer.make_batch(index, 1, 0).images)
        assert torch.equal(cache.lookup(epoch, index)["logits"], cache.lookup(1, index)["logits"])
    assert not torch.equal(cache.lookup(0, index)["logits"], cache.lookup(1, index)["logits"])


def test_manifest_records_identity(setup) -> None:
    m = json.loads((setup["path"] / "manifest.json").read_text())
    assert m["teacher_hash"] == teacher_state_hash(setup["teacher"]) == setup["expect"]["teacher_hash"]
    assert m["data_hash"] == data_hash(setup["data"].train)
    assert (m["epochs_k"], m["taps"], m["num_samples"], m["num_classes"]) == (K, ["feat2"], 96, 10)
    assert m["shapes"]["logits"] == [10] and m["transform"]["crop_padding"] == 4
    assert [s["file"] for s in m["shards"]] == ["epoch_000.safetensors", "epoch_001.safetensors"]


def test_hashes_track_weights_and_data(setup) -> None:
    teacher, train = setup["teacher"], setup["data"].train
    other = copy.deepcopy(teacher)
    assert teacher_state_hash(other) == teacher_state_hash(teacher)
    with torch.no_grad():
        next(b for n, b in other.named_buffers() if n.endswith("running_mean"))[0] += 1e-3
    assert teacher_state_hash(other) != teacher_state_hash(teacher)
    perm = torch.arange(len(train)).roll(1)
    assert data_hash(train.subset(perm)) != data_hash(train)
    assert data_hash(train.subset(torch.arange(len(train)))) == data_hash(train)


def test_stale_cache_is_refused_with_what_differs(setup) -> None:
    path, expect, train = setup["path"], setup["expect"], setup["data"].train
    other_teacher = create_model("resnet8", num_classes=10)
    with pytest.raises(KdforgeError, match="another teacher"):
        TeacherCache.open(path, expect={**expect, "teacher_hash": teacher_state_hash(other_teacher)})
    with pytest.raises(KdforgeError, match="other data"):
        TeacherCache.open(path, expect={**expect, "data_hash": data_hash(train.subset(torch.arange(50)))})
    with pytest.raises(KdforgeError, match="other transforms.*crop_padding: cache 4 vs run 2"):
        TeacherCache.open(path, expect={**expect, "transform": {**expect["transform"], "crop_padding": 2}})
    with pytest.raises(KdforgeError, match="other transforms.*seed"):
        TeacherCache.open(path, expect={**expect, "transform": {**expect["transform"], "seed": SEED + 1}})
    with pytest.raises(KdforgeError, match="lacks teacher taps feat3"):
        TeacherCache.open(path, expect={**expect, "taps": ["feat3"]})


def _copy(setup, name: str) -> Path:
    dst = setup["root"] / name
    shutil.copytree(setup["path"], dst)
    return dst


def test_truncated_or_corrupt_files_are_named(setup) -> None:
    trunc = _copy(setup, "trunc")
    shard = trunc / "epoch_001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(KdforgeError, match=f"truncated.*{shard}"):
        TeacherCache.open(trunc)
    flipped = _copy(setup, "flipped")
    shard = flipped / "epoch_000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(KdforgeError, match=f"corrupt shard {shard}"):
        TeacherCache.open(flipped)
    broken = _copy(setup, "broken")
    (broken / "manifest.json").write_text('{"format": "kdforge-teacher-ca')
    with pytest.raises(KdforgeError, match=f"corrupt {broken / 'manifest.json'}"):
        TeacherCache.open(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(KdforgeError, match="missing .*manifest.json"):
        TeacherCache.open(broken)
    with pytest.raises(KdforgeError, match="not found"):
        TeacherCache.open(setup["root"] / "nowhere")


class _FailingTeacher(torch.nn.Module):
    """Wraps a model and raises on the n-th forward, to simulate a crash mid-build."""

    def __init__(self, model: torch.nn.Module, fail_at: int) -> None:
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.model(x)


def _build(setup, teacher, out: Path, **kw):
    d = setup["data"].train
    return build_teacher_cache(teacher, d, out, epochs_k=K, seed=SEED, crop_padding=4, flip=True, mean=d.mean,
                               std=d.std, batch_size=40, progress=False, **kw)


def test_failed_build_leaves_nothing_and_keeps_the_old_cache(setup, monkeypatch) -> None:
    root = setup["root"] / "atomic"
    root.mkdir()
    with pytest.raises(RuntimeError, match="simulated crash"):
        # eager: the crash must come from a batch's forward (a frozen graph calls the module only to trace)
        _build(setup, _FailingTeacher(setup["teacher"], fail_at=4), root / "c", freeze=False)
    assert list(root.iterdir()) == []
    good = _build(setup, setup["teacher"], root / "c")
    before = (good / "manifest.json").read_text()
    with pytest.raises(KdforgeError, match="already exists"):
        _build(setup, setup["teacher"], root / "c")

    def boom(path: Path, text: str) -> None:  # the manifest write fails after every shard exists
        (path.parent / ".manifest.json.partial").write_text(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "atomic_write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        _build(setup, setup["teacher"], root / "c", overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in root.iterdir()] == ["c"]
    assert (good / "manifest.json").read_text() == before
    assert TeacherCache.open(good, expect=setup["expect"] | {"taps": []}).epochs_k == K
    # a successful rebuild replaces the cache in one rename (K changes here)
    d = setup["data"].train
    build_teacher_cache(setup["teacher"], d, root / "c", epochs_k=1, seed=SEED, crop_padding=4, flip=True,
                        mean=d.mean, std=d.std, progress=False, overwrite=True)
    assert [p.name for p in root.iterdir()] == ["c"]
    assert TeacherCache.open(good).epochs_k == 1


def test_bad_arguments_are_user_errors(setup) -> None:
    cache = TeacherCache.open(setup["path"])
    with pytest.raises(KdforgeError, match="out of range"):
        cache.lookup(0, torch.tensor([0, 96]))
    with pytest.raises(KdforgeError, match="epochs_k"):
        build_teacher_cache(setup["teacher"], setup["data"].train, setup["root"] / "x", epochs_k=0, seed=0,
                            crop_padding=4, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3, progress=False)
    with pytest.raises(KdforgeError, match="channels"):
        build_teacher_cache(setup["teacher"], setup["data"].train, setup["root"] / "x", epochs_k=1, seed=0,
                            crop_padding=4, flip=True, mean=(0.5,), std=(0.25,), progress=False)
    with pytest.raises(KdforgeError, match="unknown expectation"):
        TeacherCache.open(setup["path"], expect={"weights": "x"})


def test_the_cache_built_through_the_frozen_graph_equals_the_eager_build(setup, tmp_path: Path) -> None:
    s, aug = setup, setup["trainer"].cfg.data.augment
    calls = []
    hook = s["teacher"].register_forward_hook(lambda *_: calls.append(1))
    try:
        built = {}
        for freeze in (False, True):
            calls.clear()
            path = build_teacher_cache(s["teacher"], s["data"].train, tmp_path / f"f{freeze}", epochs_k=1, seed=SEED,
                                       crop_padding=aug.crop_padding, flip=aug.flip, mean=s["data"].train.mean,
                                       std=s["data"].train.std, taps=["feat2"], batch_size=40, progress=False,
                                       freeze=freeze)
            built[freeze] = (TeacherCache.open(path), len(calls))
    finally:
        hook.remove()
    (eager, eager_calls), (frozen, frozen_calls) = built[False], built[True]
    assert eager_calls == 3 and frozen_calls == 4    # 96 samples in batches of 40; frozen: 2 shapes x trace
    index = torch.arange(96)
    for key in ("logits", "feat2"):                  # float16 storage: at most one rounding step apart
        a, b = eager.lookup(0, index)[key], frozen.lookup(0, index)[key]
        torch.testing.assert_close(b, a, atol=1e-2, rtol=2e-3)
