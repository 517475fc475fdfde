"""Real-format loaders read back tiny hand-written files exactly (pixel layout, labels, errors)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdforge.data import formats
from kdforge.data.folder import ImageFolderStream, image_folder
from kdforge.data.formats import MissingDataError, cifar10, cifar100, fashion_mnist, mnist, npz, read_idx
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS, build

# ------------------------------------------------------------------------------------ writers


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar100(root: Path, n_train: int = 10, n_test: int = 5) -> dict[str, dict[bytes, object]]:
    """A fake `root/cifar-100-python/` with the official keys; returns what was written."""
    d = root / "cifar-100-python"
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        batch = {b"data": cifar_rows(n, seed=n), b"fine_labels": rng.integers(0, 100, n).tolist(),
                 b"coarse_labels": rng.integers(0, 20, n).tolist(), b"filenames": [b"x.png"] * n}
        dump(d / split, batch)
        out[split] = batch
    dump(d / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                      b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return out


def make_cifar10(root: Path) -> dict[str, dict[bytes, object]]:
    d = root / "cifar-10-batches-py"
    out = {}
    for i in range(1, 6):
        out[f"data_batch_{i}"] = {b"data": cifar_rows(2, seed=i), b"labels": [i, 9 - i]}
        dump(d / f"data_batch_{i}", out[f"data_batch_{i}"])
    out["test_batch"] = {b"data": cifar_rows(3, seed=99), b"labels": [0, 5, 9]}
    dump(d / "test_batch", out["test_batch"])
    dump(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    return out


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0C: ">i4"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dtype).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_mnist(d: Path, gz: bool, n_train: int = 6,
               n_test: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# -------------------------------------------------------------------------------------- CIFAR


def test_cifar100_pixel_layout_is_r_then_g_then_b_row_major(tmp_path: Path) -> None:
    written = make_cifar100(tmp_path)
    rows = written["train"][b"data"]
    rows[0, 0], rows[0, 1], rows[0, 32] = 11, 12, 13  # R(0,0), R(0,1), R(1,0)
    rows[0, 1024], rows[0, 2048 + 31 * 32 + 31] = 21, 33  # G(0,0), B(31,31)
    dump(tmp_path / "cifar-100-python" / "train", written["train"])
    ds = cifar100(tmp_path, "train")
    assert ds.images.shape == (10, 3, 32, 32) and ds.images.dtype == torch.uint8
    img = ds.images[0]
    assert (img[0, 0, 0], img[0, 0, 1], img[0, 1, 0], img[1, 0, 0], img[2, 31, 31]) == (11, 12, 13, 21, 33)
    rng = np.random.default_rng(5)
    for _ in range(200):  # the explicit formula, not a reshape, is the reference
        i, c, r, col = rng.integers(10), rng.integers(3), rng.integers(32), rng.integers(32)
        assert ds.images[i, c, r, col] == rows[i, c * 1024 + r * 32 + col]


def test_cifar100_labels_names_extra_and_stats(tmp_path: Path) -> None:
    written = make_cifar100(tmp_path)
    for split, n in (("train", 10), ("test", 5)):
        ds = cifar100(tmp_path, split)
        assert len(ds) == n and ds.num_classes == 100 and ds.name == "cifar100"
        assert ds.labels.tolist() == written[split][b"fine_labels"]
        assert ds.extra["coarse"].tolist() == written[split][b"coarse_labels"]
        assert ds.class_names[:2] == ["fine0", "fine1"] and len(ds.class_names) == 100
        assert ds.mean == formats.CIFAR100_MEAN and ds.std == formats.CIFAR100_STD
    coarse = cifar100(tmp_path / "cifar-100-python", "test", label="coarse")  # extracted dir as root
    assert coarse.num_classes == 20 and coarse.labels.tolist() == written["test"][b"coarse_labels"]
    assert coarse.extra["fine"].tolist() == written["test"][b"fine_labels"]
    assert coarse.class_names[0] == "coarse0"
    sub = cifar100(tmp_path, "train").subset(torch.tensor([1, 3]))
    assert sub.extra["coarse"].tolist() == [written["train"][b"coarse_labels"][i] for i in (1, 3)]


def test_cifar10_reads_five_batches_in_order(tmp_path: Path) -> None:
    written = make_cifar10(tmp_path)
    train = cifar10(tmp_path, "train")
    expected = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert train.images.shape == (10, 3, 32, 32)
    assert torch.equal(train.images.reshape(10, -1), torch.from_numpy(expected))
    assert train.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert train.class_names == [f"c{i}" for i in range(10)] and train.mean == formats.CIFAR10_MEAN
    test = cifar10(tmp_path / "cifar-10-batches-py", split="test")
    assert test.labels.tolist() == [0, 5, 9]
    assert test.images[2, 1, 0, 5] == written["test_batch"][b"data"][2, 1024 + 5]


def test_cifar_missing_truncated_and_bad_contents(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"cifar-100-python.*kdforge data prepare cifar100 --root"):
        cifar100(tmp_path)
    with pytest.raises(MissingDataError, match="kdforge data prepare cifar10 --root"):
        cifar10(tmp_path / "nowhere")
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(KdforgeError, match="test_batch"):
        cifar10(tmp_path, "test")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(MissingDataError, match="data_batch_4"):
        cifar10(tmp_path, "train")
    dump(batch, {b"data": np.zeros((2, 1000), np.uint8), b"labels": [0, 1]})
    with pytest.raises(KdforgeError, match=r"test_batch.*\(N, 3072\)"):
        cifar10(tmp_path, "test")
    dump(batch, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(KdforgeError, match=r"test_batch.*outside \[0, 10\)"):
        cifar10(tmp_path, "test")
    dump(batch, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(KdforgeError, match="test_batch.*2 images"):
        cifar10(tmp_path, "test")
    with pytest.raises(KdforgeError, match="split"):
        cifar10(tmp_path, "val")
    make_cifar100(tmp_path)
    with pytest.raises(KdforgeError, match="label must be"):
        cifar100(tmp_path, label="medium")


# ---------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_raw_and_gzipped(tmp_path: Path, gz: bool) -> None:
    written = make_mnist(tmp_path / "mnist", gz)
    for split in ("train", "test"):
        ds = mnist(tmp_path, split)  # parent of mnist/ works, so does the folder itself
        x, y = written[split]
        assert ds.images.shape == (len(x), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert torch.equal(ds.images[:, 0], torch.from_numpy(x))
        assert ds.labels.tolist() == y.tolist() and ds.num_classes == 10
        assert ds.mean == (0.1307,)
    assert len(mnist(tmp_path / "mnist", "test")) == 4


def test_fashion_mnist_and_torchvision_layout(tmp_path: Path) -> None:
    written = make_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    ds = fashion_mnist(tmp_path, "train")
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert torch.equal(ds.images[3, 0], torch.from_numpy(written["train"][0][3]))
    assert ds.mean == (0.2860,)


def test_read_idx_header_dtype_and_dims(tmp_path: Path) -> None:
    arr = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    p = tmp_path / "ints.idx"
    p.write_bytes(idx_bytes(arr, code=0x0C))
    out = read_idx(p)
    assert out.dtype == np.int32 and out.tolist() == arr.tolist()


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    d = tmp_path / "mnist"
    make_mnist(d, gz=False)
    with pytest.raises(MissingDataError, match="kdforge data prepare fashion_mnist --root"):
        fashion_mnist(tmp_path / "empty")
    img = d / "t10k-images-idx3-ubyte"
    good = img.read_bytes()
    img.write_bytes(good[:-10])
    with pytest.raises(KdforgeError, match=r"t10k-images-idx3-ubyte: truncated"):
        mnist(d, "test")
    img.write_bytes(b"\x00\x00\x07\x03" + good[4:])  # unknown dtype code
    with pytest.raises(KdforgeError, match=r"t10k-images-idx3-ubyte: not an IDX file"):
        mnist(d, "test")
    img.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(KdforgeError, match=r"t10k-images-idx3-ubyte: not an IDX file"):
        mnist(d, "test")
    img.write_bytes(good)
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)  # 3 labels, 4 images
    with pytest.raises(KdforgeError, match=r"t10k-labels-idx1-ubyte has 3 labels but .*t10k-images"):
        mnist(d, "test")
    gz = write_idx(d / "train-labels-idx1-ubyte", np.zeros(6, np.uint8), gz=True)
    (d / "train-labels-idx1-ubyte").unlink()
    gz.write_bytes(gz.read_bytes()[:-6])  # chopped gzip trailer
    with pytest.raises(KdforgeError, match=r"train-labels-idx1-ubyte.gz: corrupt or truncated gzip"):
        mnist(d, "train")


# -------------------------------------------------------------------------------- ImageFolder


def make_tree(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    px = {n: rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for n in ("a", "b", "t")}
    ramp = np.arange(32, dtype=np.uint8) * 8
    px["d"] = np.stack([ramp[None, :].repeat(32, 0), ramp[:, None].repeat(32, 1), np.full((32, 32), 128)],
                       axis=-1).astype(np.uint8)  # smooth, so JPEG keeps it close
    save_png(root / "train" / "dog" / "b.png", px["b"])
    save_png(root / "train" / "cat" / "a.png", px["a"])
    save_png(root / "train" / "cat" / "z.PNG", np.full((32, 32), 77, np.uint8))  # grayscale -> RGB
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    Image.fromarray(px["d"]).save(root / "train" / "dog" / "c.jpg", quality=95)
    save_png(root / "test" / "emu" / "t.png", px["t"])  # class present only in the test split
    return px


def test_image_folder_pixels_labels_and_class_order(tmp_path: Path) -> None:
    px = make_tree(tmp_path)
    train = image_folder(tmp_path, split="train")
    assert train.class_names == ["cat", "dog", "emu"] and train.num_classes == 3
    assert train.labels.tolist() == [0, 0, 1, 1]  # cat/a, cat/z, dog/b, dog/c
    assert train.images.shape == (4, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[0], torch.from_numpy(px["a"]).permute(2, 0, 1))
    assert (train.images[1] == 77).all()
    assert torch.equal(train.images[2], torch.from_numpy(px["b"]).permute(2, 0, 1))
    jpeg_err = (train.images[3].float() - torch.from_numpy(px["d"]).permute(2, 0, 1).float()).abs().mean()
    assert jpeg_err < 4  # lossy, but the same picture
    test = image_folder(tmp_path, split="test")
    assert test.labels.tolist() == [2] and test.class_names == train.class_names
    only_train = image_folder(tmp_path / "train")  # no split: classes are the folders of root
    assert only_train.class_names == ["cat", "dog"]
    assert build(DATASETS, "image_folder", root=tmp_path, split="train").labels.tolist() == [0, 0, 1, 1]


def test_image_folder_resizes_shorter_side_and_center_crops(tmp_path: Path) -> None:
    tall = np.zeros((64, 32, 3), np.uint8)
    tall[:16], tall[16:48], tall[48:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    save_png(tmp_path / "x" / "tall.png", tall)
    save_png(tmp_path / "y" / "big.png", np.full((90, 120, 3), 200, np.uint8))
    ds = image_folder(tmp_path, image_size=32)
    assert ds.images.shape == (2, 3, 32, 32)
    assert (ds.images[0, 1] == 255).all() and (ds.images[0, 0] == 0).all()  # only the green middle
    assert (ds.images[1] == 200).all()
    assert image_folder(tmp_path, image_size=8).images.shape == (2, 3, 8, 8)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(KdforgeError, match="not found"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(KdforgeError, match="no images"):
        image_folder(tmp_path / "empty")
    save_png(tmp_path / "loose" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(KdforgeError, match="loose images but no class folders"):
        image_folder(tmp_path / "loose")
    with pytest.raises(KdforgeError, match="split folder"):
        image_folder(tmp_path / "loose", split="train")
    bad = tmp_path / "bad" / "cls"
    save_png(bad / "fine.png", np.zeros((8, 8, 3), np.uint8))
    (bad / "junk.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(KdforgeError, match="junk.jpg"):
        image_folder(tmp_path / "bad")
    (bad / "junk.jpg").unlink()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (bad / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(KdforgeError, match="cut.png"):
        image_folder(tmp_path / "bad")


def test_image_folder_stream_matches_in_memory(tmp_path: Path) -> None:
    make_tree(tmp_path)
    mem = image_folder(tmp_path, split="train", image_size=16)
    stream = ImageFolderStream(tmp_path, split="train", image_size=16)
    assert len(stream) == 4 and stream.classes == mem.class_names and stream.targets == mem.labels.tolist()
    image, label = stream[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == 1
    for workers in (0, 2):
        batches = list(DataLoader(stream, batch_size=3, num_workers=workers))
        assert torch.equal(torch.cat([x for x, _ in batches]), mem.images)
        assert torch.cat([y for _, y in batches]).tolist() == mem.labels.tolist()
    flipped = ImageFolderStream(tmp_path, split="train", image_size=16, transform=lambda t: t.flip(-1))
    assert torch.equal(flipped[0][0], mem.images[0].flip(-1))


# ---------------------------------------------------------------------------------------- npz


def test_npz_layouts_and_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    nchw = rng.integers(0, 256, size=(5, 3, 8, 6), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", x=nchw.transpose(0, 2, 3, 1), y=np.array([0, 1, 2, 1, 0]))
    ds = npz(tmp_path / "nhwc.npz")
    assert ds.images.shape == (5, 3, 8, 6) and torch.equal(ds.images, torch.from_numpy(nchw))
    assert ds.labels.tolist() == [0, 1, 2, 1, 0] and ds.num_classes == 3
    f = nchw.astype(np.float32) / 255.0
    np.savez(tmp_path / "float.npz", images=f, labels=np.arange(5))
    assert torch.equal(npz(root=tmp_path / "float.npz").images, torch.from_numpy(nchw))
    gray = rng.integers(0, 256, size=(4, 7, 7), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", x=gray, y=np.zeros((4, 1), np.int64))
    g = npz(tmp_path / "gray.npz")
    assert g.images.shape == (4, 1, 7, 7) and torch.equal(g.images[:, 0], torch.from_numpy(gray))
    mean, std = formats.channel_stats(g.images)
    assert mean[0] == pytest.approx(gray.mean() / 255) and std[0] == pytest.approx(gray.std() / 255)


def test_npz_splits_stats_and_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    xtr = rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    xte = np.full((2, 4, 4, 3), 9, np.uint8)
    np.savez(tmp_path / "d.npz", x_train=xtr, y_train=np.array([0, 1, 2, 3, 0, 1]), x_test=xte,
             y_test=np.array([1, 1]), class_names=np.array(["a", "b", "c", "d"]))
    test = build(DATASETS, "npz", path=tmp_path / "d.npz", split="test")
    assert test.num_classes == 4 and test.class_names == ["a", "b", "c", "d"]  # from all label arrays
    assert (test.images == 9).all()
    train = npz(tmp_path / "d.npz", split="train")
    assert test.mean == pytest.approx(train.mean) and test.std == pytest.approx(train.std)  # train stats
    assert train.mean[0] == pytest.approx(xtr[..., 0].mean() / 255)
    with pytest.raises(KdforgeError, match="pass split"):
        npz(tmp_path / "d.npz")


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(KdforgeError, match="not found"):
        npz(tmp_path / "none.npz")
    np.savez(tmp_path / "n.npz", x=np.zeros((3, 4, 4, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(KdforgeError, match="3 images but 'y' has 2 labels"):
        npz(tmp_path / "n.npz")
    np.savez(tmp_path / "f.npz", x=np.full((2, 3, 4, 4), 2.0, np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(KdforgeError, match=r"\[0, 1\]"):
        npz(tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", a=np.zeros(2))
    with pytest.raises(KdforgeError, match="no 'x' / 'y'"):
        npz(tmp_path / "k.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(KdforgeError, match="broken.npz"):
        npz(tmp_path / "broken.npz")


def test_registered_with_metadata() -> None:
    for name in ("cifar10", "cifar100", "mnist", "fashion_mnist", "image_folder", "npz"):
        assert DATASETS.meta(name) == {"kind": "classification", "source": "file"}
