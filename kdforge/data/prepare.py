"""`kdforge data prepare`: make a standard data set loadable under a root folder, offline when possible.

Order of attempts: (1) the data are already there and parse -> done; (2) the official archive was
placed in `root` by hand -> check its MD5, extract it; (3) download from the official URL (short
timeout) to a temp file, check the MD5, rename, extract. Without network the error says, in one
line, which file (and MD5) to fetch from where and where to put it, since many training machines
are offline. Archives are extracted member-checked (no absolute paths, `..`, links or devices)
into a temp folder first, so an interrupted run never leaves a half-extracted data set.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from kdforge.data import formats
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

TIMEOUT_S = 10.0
CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One downloadable file: its name on disk, official MD5, and mirror URLs tried in order."""

    filename: str
    md5: str
    urls: tuple[str, ...]


@dataclass(frozen=True)
class Spec:
    """How a data set arrives: one tarball extracted to `subdir`, or files stored as-is in `subdir`."""

    name: str
    files: tuple[Remote, ...]
    subdir: str
    archive: bool
    marker: str = ""  # for archives: a file that identifies the extracted folder


def _idx_files(md5s: dict[str, str], mirrors: tuple[str, ...]) -> tuple[Remote, ...]:
    return tuple(Remote(f, m, tuple(u + f for u in mirrors)) for f, m in md5s.items())


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")

# MD5s of the official releases (the IDX ones are the checksums torchvision ships).
SPECS: dict[str, Spec] = {
    "cifar10": Spec("cifar10", (Remote("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                                       ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)),),
                    formats.CIFAR10_DIR, True, "batches.meta"),
    "cifar100": Spec("cifar100", (Remote("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                                         ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",)),),
                     formats.CIFAR100_DIR, True, "meta"),
    "mnist": Spec("mnist", _idx_files({
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}, _MNIST_MIRRORS),
        formats.IDX_SUBDIRS["mnist"][0], False),
    "fashion_mnist": Spec("fashion_mnist", _idx_files({
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}, _FASHION_MIRRORS),
        formats.IDX_SUBDIRS["fashion_mnist"][0], False),
}


class _NetworkError(Exception):
    """A download attempt failed for network reasons (message: the reason, one line)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _spec(name: str) -> Spec:
    if name not in SPECS:
        raise KdforgeError(f"cannot prepare '{name}'; supported: {', '.join(sorted(SPECS))} "
                           f"(image_folder and npz read your own files as they are)")
    return SPECS[name]


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in chunks (archives are ~170 MB)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _instructions(spec: Spec, root: Path, why: str, files: tuple[Remote, ...] | None = None) -> str:
    """The one-line 'what to put where' message used whenever we cannot fetch a file ourselves."""
    files = spec.files if files is None else files
    rerun = f"then rerun `kdforge data prepare {spec.name} --root {root}`"
    if spec.archive:
        r = files[0]
        return (f"{spec.name}: {why}: download {r.filename} (md5 {r.md5}) from {r.urls[0]} and place it in "
                f"{root}/, or extract it there as {root / spec.subdir}/; {rerun}")
    listing = ", ".join(f"{r.filename} (md5 {r.md5})" for r in files)
    base = files[0].urls[0].rsplit("/", 1)[0] + "/"
    return (f"{spec.name}: {why}: download {listing} from {base} and place them in {root / spec.subdir}/; "
            f"{rerun}")


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Stream `url` to a temp file beside `dest`, check the MD5, then rename; never leave a partial file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "kdforge"})
                response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
                with response:
                    length = response.headers.get("Content-Length") if response.headers else None
                    with tqdm(total=int(length) if length else None, unit="B", unit_scale=True,
                              unit_divisor=1024, desc=dest.name, disable=None) as bar:
                        while chunk := response.read(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except urllib.error.HTTPError as err:
                raise _NetworkError(f"download failed (HTTP {err.code} for {url})") from None
            except urllib.error.URLError as err:
                raise _NetworkError(f"no network ({_one_line(err.reason)})") from None
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                raise _NetworkError(f"no network ({_one_line(err) or type(err).__name__})") from None
        got = digest.hexdigest()
        if got != md5:
            raise KdforgeError(f"downloaded {url} has md5 {got}, expected {md5}: refused and deleted; "
                               f"retry, or fetch {dest.name} by hand and place it at {dest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download(spec: Spec, remote: Remote, dest: Path, root: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    reason = "no mirror"
    for url in remote.urls:
        try:
            _fetch(url, dest, remote.md5)
            return
        except _NetworkError as err:
            reason = str(err)
    missing = spec.files if spec.archive else tuple(r for r in spec.files if _find(spec, root, r) is None)
    raise KdforgeError(_instructions(spec, root, reason, missing or (remote,)))


def _check_placed(spec: Spec, archive: Path, md5: str) -> None:
    got = md5sum(archive)
    if got != md5:
        raise KdforgeError(f"{spec.name}: {archive} has md5 {got}, expected {md5} (partial or corrupt "
                           f"download?); replace it with a good copy and rerun `kdforge data prepare "
                           f"{spec.name} --root {archive.parent}`")


def _safe_members(archive: Path, tf: tarfile.TarFile, subdir: str) -> list[tarfile.TarInfo]:
    """Every member must be a plain file or folder under `subdir/`: no absolute paths, `..`, links."""
    try:
        members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise KdforgeError(f"{archive}: corrupt or truncated archive ({_one_line(err)})") from None
    for m in members:
        parts = PurePosixPath(m.name.replace("\\", "/")).parts
        if m.name.startswith(("/", "\\")) or PureWindowsPath(m.name).drive or ".." in parts:
            raise KdforgeError(f"{archive}: refusing unsafe member path '{m.name}'")
        if not (m.isfile() or m.isdir()):
            raise KdforgeError(f"{archive}: refusing member '{m.name}' (links and devices are not allowed)")
        if parts and parts[0] != subdir:
            raise KdforgeError(f"{archive}: unexpected member '{m.name}' outside {subdir}/; not the official "
                               f"archive?")
    return members


def extract(archive: Path, root: Path, subdir: str) -> Path:
    """Safely extract `archive` (whose members all live under `subdir/`) into `root/subdir`."""
    target = root / subdir
    if target.exists():
        raise KdforgeError(f"{target} exists but is incomplete; remove it and rerun to extract "
                           f"{archive.name}")
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise KdforgeError(f"{archive}: not a readable tar archive ({_one_line(err)})") from None
    with tf:
        members = _safe_members(archive, tf, subdir)
        tmp = Path(tempfile.mkdtemp(prefix=".kdforge-extract-", dir=root))
        try:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            try:
                tf.extractall(tmp, members=members, **kwargs)
            except (tarfile.TarError, OSError, EOFError) as err:
                raise KdforgeError(f"{archive}: extraction failed ({_one_line(err)})") from None
            if not (tmp / subdir).is_dir():
                raise KdforgeError(f"{archive}: holds no {subdir}/ folder; not the official archive?")
            os.replace(tmp / subdir, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find(spec: Spec, root: Path, remote: Remote) -> Path | None:
    """Where an IDX file already is (raw or .gz, any accepted folder), or None."""
    try:
        return formats._find_idx(spec.name, root, remote.filename.removesuffix(".gz"))
    except formats.MissingDataError:
        return None


def _verify(spec: Spec, root: Path) -> tuple[Path, int, int]:
    """Parse both splits with the real loaders: (data folder, #train, #test); MissingDataError if absent."""
    loader = DATASETS.get(spec.name)
    try:
        train, test = loader(root, "train"), loader(root, "test")
    except formats.MissingDataError:
        raise
    except KdforgeError as err:
        raise KdforgeError(f"{err}; delete the damaged file and rerun `kdforge data prepare {spec.name} "
                           f"--root {root}`") from None
    if spec.archive:
        folder = formats._cifar_dir(spec.name, root, spec.subdir, spec.marker, spec.files[0].filename)
    else:
        folder = formats._find_idx(spec.name, root, formats.MNIST_FILES["train"][0]).parent
    return folder, len(train), len(test)


def _prepare(name: str, root: str | Path, download: bool) -> tuple[Path, int, int]:
    spec = _spec(name)
    root = Path(root).expanduser()
    try:
        return _verify(spec, root)
    except formats.MissingDataError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    if spec.archive:
        remote = spec.files[0]
        archive = root / remote.filename
        if archive.is_file():
            _check_placed(spec, archive, remote.md5)
        elif not download:
            raise KdforgeError(_instructions(spec, root, "downloads disabled"))
        else:
            _download(spec, remote, archive, root)
        extract(archive, root, spec.subdir)
    else:
        missing = tuple(r for r in spec.files if _find(spec, root, r) is None)
        if missing and not download:
            raise KdforgeError(_instructions(spec, root, "downloads disabled", missing))
        for remote in missing:
            _download(spec, remote, root / spec.subdir / remote.filename, root)
    return _verify(spec, root)


def prepare(name: str, root: str | Path, download: bool = True) -> Path:
    """Make data set `name` loadable from `root`; return the folder holding its files."""
    return _prepare(name, root, download)[0]


def prepare_command(name: str, root: str) -> str:
    """Entry point of `kdforge data prepare NAME --root DIR`: one-line success message."""
    folder, n_train, n_test = _prepare(name, root, download=True)
    return f"{name} ready in {folder} ({n_train} train / {n_test} test images)"
