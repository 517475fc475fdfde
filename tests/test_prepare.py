"""`prepare` offline paths: placed archive, already-present data, no network, bad MD5, unsafe tars.

No test touches the network: `urlopen` is replaced for every test, either by a function that raises
(the default) or by a fake server holding tiny in-memory files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kdforge.data import formats
from kdforge.data import prepare as P
from kdforge.errors import KdforgeError


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every test starts with the network 'unplugged'; returns the list of URLs attempted."""
    calls: list[str] = []

    def refuse(request: object, timeout: float | None = None) -> None:
        calls.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


def pickled(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=2)


def cifar100_tar(rows: np.ndarray, extra: dict[str, bytes] | None = None) -> bytes:
    """A tiny tar.gz with the official cifar-100-python/ layout (10 train, 5 test images)."""
    files = {
        "cifar-100-python/train": pickled({b"data": rows[:10], b"fine_labels": list(range(10)),
                                           b"coarse_labels": [i % 20 for i in range(10)]}),
        "cifar-100-python/test": pickled({b"data": rows[10:], b"fine_labels": [99, 98, 97, 96, 95],
                                          b"coarse_labels": [19, 18, 17, 16, 15]}),
        "cifar-100-python/meta": pickled({b"fine_label_names": [b"f%d" % i for i in range(100)],
                                          b"coarse_label_names": [b"c%d" % i for i in range(20)]}),
        **(extra or {}),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        dir_info = tarfile.TarInfo("cifar-100-python")
        dir_info.type = tarfile.DIRTYPE
        tf.addfile(dir_info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def tiny_cifar100(monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, np.ndarray]:
    """The tiny archive, with SPECS patched so its MD5 is the 'official' one."""
    rows = np.random.default_rng(0).integers(0, 256, size=(15, 3072), dtype=np.uint8)
    blob = cifar100_tar(rows)
    spec = P.SPECS["cifar100"]
    remote = dataclasses.replace(spec.files[0], md5=hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(P.SPECS, "cifar100", dataclasses.replace(spec, files=(remote,)))
    return blob, rows


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> list[str]:
    """Replace urlopen by a fake server mapping URL -> bytes (404 for anything else)."""
    calls: list[str] = []

    def fake(request: urllib.request.Request, timeout: float | None = None) -> FakeResponse:
        assert timeout is not None and timeout <= 10
        calls.append(request.full_url)
        if request.full_url not in files:
            raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)  # type: ignore[arg-type]
        return FakeResponse(files[request.full_url])

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    return calls


# ------------------------------------------------------------------------------------- CIFAR


def test_placed_archive_is_verified_and_extracted(tmp_path: Path, tiny_cifar100, offline) -> None:
    blob, rows = tiny_cifar100
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(blob)
    folder = P.prepare("cifar100", tmp_path)
    assert folder == tmp_path / "cifar-100-python" and offline == []
    test = formats.cifar100(tmp_path, "test")
    assert test.labels.tolist() == [99, 98, 97, 96, 95]
    assert test.images[0, 2, 31, 31] == rows[10, 2 * 1024 + 31 * 32 + 31]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]
    # second run: already present, nothing downloaded, one-line summary
    msg = P.prepare_command("cifar100", str(tmp_path))
    assert msg == f"cifar100 ready in {folder} (10 train / 5 test images)" and offline == []


def test_placed_archive_with_wrong_md5_is_refused(tmp_path: Path, tiny_cifar100) -> None:
    blob, _ = tiny_cifar100
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(blob[:-20])
    with pytest.raises(KdforgeError, match=r"cifar-100-python.tar.gz has md5 \w+, expected"):
        P.prepare("cifar100", tmp_path)
    assert not (tmp_path / "cifar-100-python").exists()


def test_no_network_gives_one_line_instruction(tmp_path: Path, offline) -> None:
    root = tmp_path / "data"
    with pytest.raises(KdforgeError) as info:
        P.prepare("cifar100", root)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("cifar100: no network (")
    for part in ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", f"place it in {root}/",
                 f"{root}/cifar-100-python/", f"kdforge data prepare cifar100 --root {root}"):
        assert part in msg
    assert offline == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert list(root.iterdir()) == []  # no partial download left behind
    with pytest.raises(KdforgeError, match=r"cifar10: downloads disabled: download cifar-10-python.tar.gz "
                                           r"\(md5 c58f30108f718f92721af3b95e74349a\)"):
        P.prepare("cifar10", root, download=False)


def test_download_checks_md5_then_extracts(tmp_path: Path, tiny_cifar100, monkeypatch) -> None:
    blob, _ = tiny_cifar100
    url = P.SPECS["cifar100"].files[0].urls[0]
    calls = serve(monkeypatch, {url: blob})
    assert P.prepare("cifar100", tmp_path) == tmp_path / "cifar-100-python"
    assert calls == [url] and (tmp_path / "cifar-100-python.tar.gz").read_bytes() == blob
    assert len(formats.cifar100(tmp_path, "train")) == 10


def test_download_with_wrong_md5_leaves_nothing(tmp_path: Path, tiny_cifar100, monkeypatch) -> None:
    blob, _ = tiny_cifar100
    serve(monkeypatch, {P.SPECS["cifar100"].files[0].urls[0]: blob + b"tampered"})
    with pytest.raises(KdforgeError, match="md5 .* expected .*refused"):
        P.prepare("cifar100", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_reported(tmp_path: Path, monkeypatch) -> None:
    serve(monkeypatch, {})
    with pytest.raises(KdforgeError, match=r"cifar10: download failed \(HTTP 404"):
        P.prepare("cifar10", tmp_path)


def test_incomplete_existing_folder_is_not_overwritten(tmp_path: Path, tiny_cifar100) -> None:
    blob, _ = tiny_cifar100
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(blob)
    (tmp_path / "cifar-100-python").mkdir()  # e.g. an interrupted manual extraction
    with pytest.raises(KdforgeError, match="exists but is incomplete"):
        P.prepare("cifar100", tmp_path)


@pytest.mark.parametrize("bad", ["../evil", "/abs/evil", "cifar-100-python/../../evil", "link"])
def test_unsafe_tar_members_are_refused(tmp_path: Path, bad: str) -> None:
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("cifar-100-python/x" if bad == "link" else bad)
        if bad == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = 3
            tf.addfile(info, io.BytesIO(b"bad"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KdforgeError, match="refusing"):
        P.extract(archive, out, "cifar-100-python")
    assert list(out.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_truncated_archive_is_reported(tmp_path: Path) -> None:
    rows = np.zeros((15, 3072), np.uint8)
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(cifar100_tar(rows)[:200])
    with pytest.raises(KdforgeError, match="a.tar.gz"):
        P.extract(archive, tmp_path, "cifar-100-python")
    assert not (tmp_path / "cifar-100-python").exists()


# --------------------------------------------------------------------------------------- IDX


def idx_gz(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


def test_mnist_download_per_file(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    blobs = {"train-images-idx3-ubyte.gz": idx_gz(rng.integers(0, 256, (3, 28, 28))),
             "train-labels-idx1-ubyte.gz": idx_gz(np.array([1, 2, 3])),
             "t10k-images-idx3-ubyte.gz": idx_gz(rng.integers(0, 256, (2, 28, 28))),
             "t10k-labels-idx1-ubyte.gz": idx_gz(np.array([7, 8]))}
    spec = P.SPECS["mnist"]
    files = tuple(dataclasses.replace(r, md5=hashlib.md5(blobs[r.filename]).hexdigest()) for r in spec.files)
    monkeypatch.setitem(P.SPECS, "mnist", dataclasses.replace(spec, files=files))
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)  # one file already there: only the other three are fetched
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(blobs["t10k-labels-idx1-ubyte.gz"])
    calls = serve(monkeypatch, {r.urls[0]: blobs[r.filename] for r in files})
    msg = P.prepare_command("mnist", str(root))
    assert msg == f"mnist ready in {root / 'mnist'} (3 train / 2 test images)"
    assert len(calls) == 3
    assert all(c.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for c in calls)
    assert formats.mnist(root, "test").labels.tolist() == [7, 8]
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(blobs)


def test_mnist_no_network_lists_every_file(tmp_path: Path, offline) -> None:
    with pytest.raises(KdforgeError) as info:
        P.prepare("fashion_mnist", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("fashion_mnist: no network")
    for r in P.SPECS["fashion_mnist"].files:
        assert f"{r.filename} (md5 {r.md5})" in msg
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in msg
    assert f"place them in {tmp_path / 'fashion_mnist'}/" in msg
    assert len(offline) == 2  # both mirrors tried once, then it stops
    assert list((tmp_path / "fashion_mnist").iterdir()) == []


def test_present_idx_files_need_no_network(tmp_path: Path, offline) -> None:
    for prefix, n in (("train", 3), ("t10k", 2)):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_gz(np.zeros((n, 28, 28))))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_gz(np.zeros(n)))
    assert P.prepare("mnist", tmp_path) == tmp_path and offline == []
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_gz(np.zeros(5)))
    with pytest.raises(KdforgeError, match="t10k-labels-idx1-ubyte.gz has 5 labels.*delete the damaged"):
        P.prepare("mnist", tmp_path)


def test_unknown_name() -> None:
    with pytest.raises(KdforgeError, match="cannot prepare 'imagenet'; supported: cifar10, cifar100"):
        P.prepare_command("imagenet", "/tmp")
