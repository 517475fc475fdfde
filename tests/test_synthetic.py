"""Procedural CIFAR-like data (determinism, structure, on-disk cache) and the small real data sets."""

from __future__ import annotations

import pytest
import torch

from kdforge.data import cache_dir as cache_mod
from kdforge.data import small as small_mod
from kdforge.data import synthetic
from kdforge.data.small import digits, mnist5k, stratified_split
from kdforge.data.synthetic import procedural_cifar
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS, build

SMALL = {"num_train": 2000, "num_test": 500}


@pytest.fixture(scope="module")
def cached_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("kdcache")
    train = procedural_cifar("train", seed=0, root=root, **SMALL)
    test = procedural_cifar("test", seed=0, root=root, **SMALL)
    return root, train, test


def test_shapes_dtypes_labels_and_balance(cached_root) -> None:
    _, train, test = cached_root
    assert train.images.shape == (2000, 3, 32, 32) and test.images.shape == (500, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.num_classes == 100 and train.name == "procedural_cifar"
    assert int(train.labels.min()) >= 0 and int(train.labels.max()) <= 99
    assert torch.bincount(train.labels, minlength=100).tolist() == [20] * 100
    assert torch.bincount(test.labels, minlength=100).tolist() == [5] * 100
    for split in (train, test):
        assert torch.equal(split.extra["coarse"], split.labels // 5)
    assert len(train.class_names) == 100
    # images use the full range and are not constant
    assert int(train.images.max()) > 240 and int(train.images.min()) < 15
    assert float(train.images.float().std()) > 30


def test_mean_std_from_train_and_shared_with_test(cached_root) -> None:
    _, train, test = cached_root
    assert test.mean == train.mean and test.std == train.std
    x = train.images.double() / 255
    assert torch.allclose(torch.tensor(train.mean, dtype=torch.double), x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(torch.tensor(train.std, dtype=torch.double), x.std(dim=(0, 2, 3)), atol=1e-5)
    assert all(0.3 < m < 0.7 for m in train.mean) and all(0.1 < s < 0.4 for s in train.std)


def test_deterministic_in_seed_and_cache_matches_fresh(cached_root) -> None:
    _, train, test = cached_root
    fresh = procedural_cifar("train", seed=0, cache=False, **SMALL)
    assert torch.equal(fresh.images, train.images) and torch.equal(fresh.labels, train.labels)
    again = procedural_cifar("train", seed=0, cache=False, **SMALL)
    assert torch.equal(again.images, fresh.images) and torch.equal(again.labels, fresh.labels)
    other = procedural_cifar("train", seed=1, num_train=300, num_test=10, cache=False)
    assert not torch.equal(other.images, fresh.images[:300])
    # train and test are independent draws (not a prefix of one another)
    assert not torch.equal(train.images[:500], test.images)


def test_test_split_does_not_depend_on_num_train() -> None:
    a = procedural_cifar("test", num_train=200, num_test=300, cache=False)
    b = procedural_cifar("test", num_train=700, num_test=300, cache=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_cache_is_reused_and_keyed_by_parameters(cached_root, monkeypatch) -> None:
    root, train, _ = cached_root
    files = sorted(p.name for p in root.iterdir())
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)
    assert not any(f.startswith(cache_mod.TMP_PREFIX) for f in files)

    def fail(*args, **kwargs):
        raise AssertionError("generator called although the cache should have been used")

    monkeypatch.setattr(synthetic, "generate", fail)
    loaded = procedural_cifar("train", seed=0, root=root, **SMALL)
    assert torch.equal(loaded.images, train.images)
    assert torch.equal(loaded.extra["coarse"], train.extra["coarse"])
    with pytest.raises(AssertionError, match="generator called"):  # another seed is another cache entry
        procedural_cifar("train", seed=3, root=root, **SMALL)
    with pytest.raises(AssertionError, match="generator called"):
        procedural_cifar("train", seed=0, root=root, num_train=2000, num_test=400)


def test_cache_dir_from_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "envcache"))
    assert cache_mod.cache_dir() == tmp_path / "envcache"
    procedural_cifar("test", num_train=100, num_test=100)
    assert len(list((tmp_path / "envcache").glob("procedural_cifar-*.pt"))) == 2
    monkeypatch.delenv("KDFORGE_CACHE")
    assert cache_mod.cache_dir().name == "kdforge"


def test_corrupt_cache_entry_is_regenerated(tmp_path) -> None:
    first = procedural_cifar("train", num_train=100, num_test=100, root=tmp_path)
    for path in tmp_path.glob("*-train.pt"):
        path.write_bytes(b"truncated")
    again = procedural_cifar("train", num_train=100, num_test=100, root=tmp_path)
    assert torch.equal(first.images, again.images)


def test_unwritable_cache_warns_but_returns_data(tmp_path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="could not write cache"):
        data = procedural_cifar("test", num_train=100, num_test=100, root=blocker / "sub")
    assert len(data) == 100


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch) -> None:
    target = tmp_path / "entry.pt"

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cache_mod.atomic_torch_save({"x": torch.zeros(3)}, target)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_roundtrip(tmp_path) -> None:
    target = tmp_path / "sub" / "entry.pt"
    cache_mod.atomic_torch_save({"x": torch.arange(4)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["entry.pt"]
    assert torch.equal(cache_mod.try_torch_load(target)["x"], torch.arange(4))


def test_superclass_structure(cached_root) -> None:
    """Sibling fine classes look alike: their mean amplitude spectra (translation-invariant
    orientation/frequency content) are much closer than those of classes in other superclasses."""
    _, train, _ = cached_root
    grey = train.images.float().mean(1) / 255
    spec = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs().flatten(1)
    spec = spec / spec.norm(dim=1, keepdim=True)
    means = torch.stack([spec[train.labels == c].mean(0) for c in range(100)])
    dist = torch.cdist(means, means)
    coarse = torch.arange(100) // 5
    same = (coarse[:, None] == coarse[None, :]) & ~torch.eye(100, dtype=torch.bool)
    diff = coarse[:, None] != coarse[None, :]
    assert dist[same].mean() < 0.8 * dist[diff].mean()
    assert float(dist[same].min()) > 0  # siblings are not identical either


def test_templates_siblings_differ_but_share_family() -> None:
    tpl = synthetic.class_templates(0)
    assert torch.equal(tpl["family"].view(20, 5), tpl["family"].view(20, 5)[:, :1].expand(20, 5))
    theta = tpl["theta"].view(20, 5)
    gaps = (theta[:, :, None] - theta[:, None, :]).abs() + torch.eye(5) * 10
    assert float(gaps.min()) > 0.05  # no two siblings share an orientation
    assert len(set(tpl["family"].tolist())) == len(synthetic.FAMILIES)


def test_registered_and_buildable() -> None:
    assert "procedural_cifar" in DATASETS
    meta = DATASETS.meta("procedural_cifar")
    assert meta["kind"] == "classification" and meta["source"] == "procedural"
    data = build(DATASETS, "procedural_cifar", split="test", num_train=100, num_test=100,
                 num_classes=20, num_superclasses=4, cache=False)
    assert data.num_classes == 20 and int(data.labels.max()) < 20
    assert torch.equal(data.extra["coarse"], data.labels // 5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 100, "num_superclasses": 30}, "multiple of num_superclasses"),
    ({"num_classes": 100, "num_superclasses": 0}, "multiple of num_superclasses"),
    ({"split": "val"}, "unknown split 'val'"),
    ({"num_train": 0}, "num_train"),
])
def test_bad_arguments(kwargs, message) -> None:
    args = {"split": "train", "num_train": 100, "num_test": 100, "cache": False, **kwargs}
    with pytest.raises(KdforgeError, match=message):
        procedural_cifar(**args)


def test_other_image_size() -> None:
    data = procedural_cifar("test", num_train=100, num_test=100, image_size=24, cache=False)
    assert data.images.shape == (100, 3, 24, 24)


# --- small real data sets -------------------------------------------------------------------

def test_stratified_split_is_deterministic_and_stratified() -> None:
    labels = torch.arange(1000) % 10
    tr, te = stratified_split(labels, 0.2, seed=0)
    tr2, te2 = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert not torch.equal(te, stratified_split(labels, 0.2, seed=1)[1])
    assert torch.bincount(labels[te]).tolist() == [20] * 10
    assert set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == 1000
    with pytest.raises(KdforgeError, match="test_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_digits() -> None:
    train, test = digits("train"), digits("test")
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797 and abs(len(test) - 360) <= 10
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert set(train.labels.unique().tolist()) == set(range(10)) and train.num_classes == 10
    assert torch.equal(digits("test").images, test.images)
    assert not torch.equal(digits("test", seed=1).labels, test.labels)
    assert len(train.mean) == 1 and 0.0 < train.mean[0] < 1.0
    assert "digits" in DATASETS and DATASETS.meta("digits")["source"] == "sklearn"


def test_mnist5k() -> None:
    train, test = mnist5k("train"), mnist5k("test")
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    assert torch.equal(mnist5k("train").labels, train.labels)
    assert "mnist5k" in DATASETS


def test_small_bad_split() -> None:
    with pytest.raises(KdforgeError, match="unknown split"):
        digits("validation")


def test_missing_dependency_message(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn") or name.startswith("mlxtend"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    small_mod._load_digits.cache_clear()  # loaders memoise the decoded arrays
    small_mod._load_mnist5k.cache_clear()
    with pytest.raises(KdforgeError, match=r"kdforge\[small-data\]"):
        digits()
    with pytest.raises(KdforgeError, match=r"kdforge\[small-data\]"):
        mnist5k()
