"""Data sets as uint8 tensors, read once; normalised, shuffled, augmented and batched on the device.

Sources are tried in a fixed order, and every `Dataset` says which one it came from:
    1. an explicit `path`,
    2. the official release under the data root (MNIST IDX files; CIFAR-10 python batches),
    3. a download through torchvision, only when `download=True` (needs internet and torchvision),
    4. the offline copy shipped in the repository's `data/` (MNIST IDX .gz; CIFAR-10 as JPEG).
torchvision is imported lazily, only for step 3: the core runs without it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .runtime import cache_root, data_root, repo_root

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the training sets (0-255 scale), used to normalise on the device.
STATS = {
    "mnist": ((33.32,), (78.57,)),
    "cifar10": ((125.31, 122.95, 113.87), (62.99, 62.09, 66.70)),
}
SIZES = {("mnist", "train"): 60000, ("mnist", "test"): 10000,
         ("cifar10", "train"): 50000, ("cifar10", "test"): 10000}


class DataError(RuntimeError):
    """A data file is missing, truncated or corrupt; the message names the file and the fix."""


@dataclass
class Dataset:
    """A whole split as tensors: images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    source: str  # which copy was read, recorded in every result

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return 10

    def subset(self, n: int | None, seed: int = 0) -> "Dataset":
        """A fixed random subset of n samples (all when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return Dataset(self.name, self.split, self.images[idx], self.labels[idx], f"{self.source} [subset {n}, seed {seed}]")

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.split, self.images.to(device), self.labels.to(device), self.source)


# ----------------------------------------------------------------------------------------------- MNIST
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a uint8 array, checking its declared size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}. Delete it and copy a fresh one (see data/README.md).") from e
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number). Replace the file.")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or padded: {len(raw)} bytes, the header promises {expected}. "
                        "Delete it and copy a fresh one.")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def _load_mnist_folder(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    paths = [_find_idx(folder, stem) for stem in _MNIST_FILES[split]]
    if not all(paths):
        return None
    images, labels = (read_idx(p) for p in paths)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# -------------------------------------------------------------------------------------------- CIFAR-10
class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The official CIFAR-10 batches are pickles; allow only what they contain (dicts, bytes, numpy arrays)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytes")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_cifar_batches(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / n).exists() for n in names):
        return None
    xs, ys = [], []
    for n in names:
        try:
            d = _ArrayOnlyUnpickler(io.BytesIO((folder / n).read_bytes()), encoding="bytes").load()
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        except Exception as e:  # truncated pickles raise many kinds of errors
            raise DataError(f"cannot read CIFAR-10 batch {folder / n}: {e}. Delete the folder and re-download.") from e
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _decode_cifar_jpeg_tar(tar_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    found = []  # (class index, file name, image)
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in tar:
                parts = member.name.strip("./").split("/")
                if not member.isfile() or len(parts) != 3 or parts[0] != split:
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                found.append((CIFAR10_CLASSES.index(parts[1]), parts[2], np.asarray(image, dtype=np.uint8)))
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        raise DataError(f"cannot read {tar_path}: {e}. The archive is truncated or corrupt; copy it again "
                        "from shared/data (see data/README.md).") from e
    if not found:
        raise DataError(f"{tar_path} holds no '{split}/<class>/*.jpg' images.")
    found.sort(key=lambda t: t[:2])  # ImageFolder order: class, then file name; independent of the archive
    images = np.stack([t[2] for t in found]).transpose(0, 3, 1, 2).copy()
    return images, np.asarray([t[0] for t in found], dtype=np.int64)


def _load_cifar_jpeg(tar_path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the JPEG copy once and keep the result as plain .npy files (no pickle) in the cache."""
    stat = tar_path.stat()
    tag = hashlib.sha256(f"{tar_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cached = cache_root() / "data" / f"cifar10-jpeg-{split}-{tag}.npz"
    if cached.exists():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
        except Exception:
            cached.unlink()  # a broken cache entry is rebuilt, never trusted
    images, labels = _decode_cifar_jpeg_tar(tar_path, split)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, labels=labels)
    tmp.replace(cached)
    return torch.from_numpy(images), torch.from_numpy(labels)


# ------------------------------------------------------------------------------------------ the loader
def _download(name: str, root: Path) -> None:
    try:
        import torchvision  # lazily: the CPU wheels here ship no working torchvision
    except Exception as e:
        raise DataError(f"download=True needs a working torchvision ({type(e).__name__}: {e}); "
                        f"install it or use the offline copy in {repo_root() / 'data'}.") from e
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    for train in (True, False):
        cls(str(root), train=train, download=True)


def load(name: str, split: str, *, path: str | Path | None = None, root: str | Path | None = None,
         download: bool = False) -> Dataset:
    """Load `name` ('mnist' | 'cifar10'), `split` ('train' | 'test') as uint8 tensors; see module docstring."""
    if (name, split) not in SIZES:
        raise ValueError(f"unknown data set {name!r}/{split!r}; choose from {sorted(SIZES)}")
    root = Path(root) if root is not None else data_root()
    download = download or os.environ.get("LLFC_DOWNLOAD") == "1"  # set by the Colab cell
    shipped = repo_root() / "data"
    for source, folder in _candidates(name, path, root, download):
        loaded = _load_from(name, split, folder)
        if loaded is not None:
            images, labels = loaded
            if len(labels) != SIZES[(name, split)] and path is None:
                raise DataError(f"{folder} gives {len(labels)} {name}/{split} samples, expected "
                                f"{SIZES[(name, split)]}: the copy is incomplete.")
            return Dataset(name, split, images, labels, f"{source}: {_display_path(folder)}")
    raise DataError(f"no copy of {name}/{split} found: looked in {path or ''} {root} and {shipped}. "
                    f"Copy the files into {shipped} (see data/README.md) or pass download=True with internet.")


def _display_path(path: Path) -> str:
    """Paths inside the repository are recorded relative to it, so results do not name a machine."""
    try:
        return str(Path(path).resolve().relative_to(repo_root().resolve()))
    except ValueError:
        return str(path)


def _candidates(name: str, path, root: Path, download: bool):
    if path is not None:
        yield "explicit path", Path(path)
        return
    official = root / ("MNIST/raw" if name == "mnist" else "cifar-10-batches-py")
    shipped = repo_root() / "data"
    if official.resolve() != (shipped / "MNIST/raw").resolve():  # the shipped MNIST is named below
        yield "official release", official
    if download:
        _download(name, root)
        yield "official release (downloaded)", official
    yield "offline copy", shipped / ("MNIST/raw" if name == "mnist" else "cifar10-jpeg.tar.gz")


def _load_from(name: str, split: str, location: Path):
    if name == "mnist":
        return _load_mnist_folder(location, split) if location.is_dir() else None
    if location.is_dir():
        return _load_cifar_batches(location, split)
    if location.is_file():
        return _load_cifar_jpeg(location, split)
    return None


# ------------------------------------------------------------------------------ batches on the device
def normalise(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 standardised per channel, on the images' device."""
    mean, std = _stats_on(name, images.device)
    return (images.float() - mean) / std


_STATS_ON: dict = {}


def _stats_on(name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation constants of a data set on a device, copied there once (not once per batch)."""
    key = (name, str(device))
    if key not in _STATS_ON:
        _STATS_ON[key] = tuple(torch.tensor(s, device=device).view(1, -1, 1, 1) for s in STATS[name])
    return _STATS_ON[key]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip for a whole batch at once (no per-sample Python)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
    flip = torch.rand(n, generator=generator, device=generator.device).to(x.device) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols[:, None, None, :]]


# Git Re-Basin's MLP/VGG augmentation (`make_stuff` in src/cifar10_vgg_run.py, with augmax): RandomSizedCrop(32,
# zoom_range=(0.8, 1.2)), HorizontalFlip(), Rotate(). As every released augmax (v0.2.0 to v0.4.1) runs it: the
# zoom is log-uniform on [0.8, 1.2] -- its `prevent_underzoom` compares the zoom with a *log* of the size ratio
# (0.8 > log 1), so it never acts and zoom-outs (black borders) happen; the crop's centre moves uniformly by
# up to |size * (zoom - 1)| / 2 zoomed pixels; the flip has p = 0.5; the angle is uniform on [-30, 30] degrees;
# bilinear resampling, pixels from outside the image are 0 (black, before normalisation).
ZOOM_RANGE = (0.8, 1.2)
MAX_DEGREES = 30.0


def affine_warp(x: torch.Tensor, degrees: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor,
                flip: torch.Tensor) -> torch.Tensor:
    """Resample each image of a square (N, C, S, S) batch at the output pixel p's source point
    (F R p + shift) / zoom, in pixel units about the centre: R rotates by `degrees`, F mirrors x where `flip`,
    `shift` (N, 2) is (x, y). Bilinear; outside the image reads 0. The identity parameters return x."""
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"affine_warp: images must be square, got {h}x{w}")
    t = torch.deg2rad(degrees.to(x.device, torch.float32))
    cos, sin = torch.cos(t), torch.sin(t)
    sign = 1.0 - 2.0 * flip.to(x.device, torch.float32)
    z = zoom.to(x.device, torch.float32)[:, None, None]  # divides the whole map, shift included
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0].to(x.device) * 2 / w], 1),
                         torch.stack([sin * sign, cos, shift[:, 1].to(x.device) * 2 / h], 1)], 1) / z
    # align_corners=False: normalised coordinates are pixel units about the centre scaled by 2/S, so a
    # square image's linear part is the same in both and only the shift is rescaled.
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def zoom_flip_rotate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Git Re-Basin's augmentation (above) for a whole batch, on raw 0-255 float images (so the fill is black)."""
    n, size = x.shape[0], x.shape[-1]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)

    zoom = torch.exp(uniform(*np.log(ZOOM_RANGE)))
    half = (size * zoom - size).abs() / 2  # how far the crop's centre moves (zoomed pixels), either side
    shift = torch.stack([uniform(-half, half), uniform(-half, half)], 1)
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    degrees = uniform(-MAX_DEGREES, MAX_DEGREES)
    return affine_warp(x, degrees, zoom, shift, flip)


AUGMENTATIONS = (False, True, "zoom-flip-rotate")  # True: random_crop_flip (kept True so old cache keys stay)


def batches(ds: Dataset, batch_size: int, *, shuffle: bool = False, augment: bool | str = False, seed: int = 0,
            device=None, drop_last: bool = False):
    """Yield (x float32 normalised, y int64) batches of a device-resident data set.

    Order and augmentation depend only on `seed`, so a run resumed at epoch e sees what it would have seen.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
    device = torch.device(device) if device is not None else ds.images.device
    images, labels = ds.images.to(device), ds.labels.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen).to(device) if shuffle else None  # one copy per epoch
    # Augmentation draws on the data's device, so a GPU step copies nothing from the host; on the CPU it is
    # the same generator as the order's (the CPU stream is what it always was).
    aug = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    stop = len(labels) - (len(labels) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        if augment == "zoom-flip-rotate":
            x = normalise(zoom_flip_rotate(images[idx].float(), aug), ds.name)
        else:
            x = normalise(images[idx], ds.name)
            if augment:
                x = random_crop_flip(x, aug)
        yield x, labels[idx]
