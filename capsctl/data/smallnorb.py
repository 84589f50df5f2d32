"""smallNORB (LeCun, Huang & Bottou 2004), the EM-routing paper's dataset: ``data.dataset:
smallnorb``.

The official files ``*-dat.mat``, ``*-cat.mat`` and ``*-info.mat`` (raw or ``.gz``) are not MATLAB
files but a small binary matrix format, little-endian: an int32 magic number giving the element
type, an int32 number of dimensions n, max(n, 3) int32 sizes (unused ones are 1), then the data.
dat: (N, 2, 96, 96) uint8 stereo pairs; cat: (N,) int32 categories 0-4; info: (N, 4) int32
(instance, elevation, azimuth, lighting). 24,300 training and 24,300 test pairs.

Preprocessing as the EM paper: each 96x96 image is downsampled to 48x48 (2x2 means, once, at load)
and standardised to zero mean and unit variance per image; training batches are random 32x32
crops with a random brightness and contrast change, test batches the centre 32x32 crop. All of it
happens on the data's device, batched. ``model.in_channels`` picks the cameras: 1 = the first
image of each pair, 2 = both as two channels.

Files are looked for in the data root and in ``ROOT/smallnorb``; with ``data.download`` they are
fetched from the official location into ``ROOT/smallnorb``.
"""

from __future__ import annotations

import shutil
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch

from capsctl.data.augment import generator
from capsctl.data.datasets import DataBundle, ImageSet, IndexedSource, TrainStream
from capsctl.data.idx import check_declared, open_data, read_exact, read_header
from capsctl.errors import DataError
from capsctl.tasks import SINGLE

URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
STEMS = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training",
         "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
PARTS = ("dat", "cat", "info")
# magic number -> numpy element type (little-endian)
DTYPES = {0x1E3D4C55: np.dtype("u1"), 0x1E3D4C54: np.dtype("<i4"), 0x1E3D4C56: np.dtype("<i2"),
          0x1E3D4C51: np.dtype("<f4"), 0x1E3D4C53: np.dtype("<f8")}
CLASSES = ("animal", "human", "airplane", "truck", "car")
SIDE, DOWNSAMPLED, CROP = 96, 48, 32
BRIGHTNESS = 0.25           # training: + U(-0.25, 0.25) (in units of the image's std)
CONTRAST = (0.5, 1.5)       # training: deviations from the crop's mean scaled by U(0.5, 1.5)
VAL_SEED = 0                # the validation images are a fixed random subset of the training set
STREAM_CROP, STREAM_JITTER = 12, 13


def read_matrix(path: Path) -> np.ndarray:
    """One smallNORB binary matrix file (raw or gzipped, recognised by content) as a numpy array.

    The header's sizes are checked against the file (and ``MAX_BYTES``) before anything is
    allocated; gzipped data is inflated in chunks, never past the declared size plus one byte."""
    path = Path(path)
    with open_data(path) as (stream, size, gz):
        magic, ndim = struct.unpack("<Ii", read_header(stream, 8, path, "smallNORB header"))
        dtype = DTYPES.get(magic)
        if dtype is None:
            raise DataError(f"{path}: not a smallNORB matrix file (magic 0x{magic:08X})")
        if not 1 <= ndim <= 16:
            raise DataError(f"{path}: implausible number of dimensions {ndim}")
        n_sizes = max(ndim, 3)
        sizes = struct.unpack(f"<{n_sizes}i", read_header(stream, 4 * n_sizes, path,
                                                          "smallNORB header"))
        shape = sizes[:ndim]
        if min(shape) < 0:
            raise DataError(f"{path}: negative size in the header {shape}; the file is corrupt")
        nbytes = dtype.itemsize
        for d in shape:  # Python ints: no overflow
            nbytes *= d
        check_declared(path, shape, nbytes, 8 + 4 * n_sizes, size, gz)
        data = read_exact(stream, nbytes, path, "x".join(map(str, shape)))
    return data.view(dtype).reshape(shape)


def _find(root: Path, name: str) -> Path | None:
    for folder in (root, root / "smallnorb"):
        for candidate in (name, name + ".gz"):
            if (folder / candidate).is_file():
                return folder / candidate
    return None


def _download(root: Path, names: list[str]) -> None:
    folder = root / "smallnorb"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = folder / (name + ".gz")
        tmp = target.with_suffix(".gz.part")
        try:
            with urllib.request.urlopen(URL + name + ".gz", timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            tmp.replace(target)
        except Exception as e:  # network errors come in many types
            tmp.unlink(missing_ok=True)
            raise DataError(f"downloading {URL}{name}.gz failed ({type(e).__name__}: {e}); copy "
                            f"the smallNORB files into {folder} by hand") from None


def load_split(root: Path, split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 2, 96, 96) and int64 labels (N,) of the ``train`` or ``test`` split."""
    names = [f"{STEMS[split]}-{part}.mat" for part in PARTS]
    paths = [_find(root, n) for n in names]
    if any(p is None for p in paths) and download:
        _download(root, [n for n, p in zip(names, paths) if p is None])
        paths = [_find(root, n) for n in names]
    missing = [n for n, p in zip(names, paths) if p is None]
    if missing:
        listed = ", ".join(m + "[.gz]" for m in missing)
        raise DataError(f"smallNORB {split} files missing: {listed} not found in {root} or "
                        f"{root / 'smallnorb'}; pass --data-root DIR or "
                        "add --set data.download=true to fetch them")
    images, labels, info = (read_matrix(p) for p in paths)
    if images.ndim != 4 or images.shape[1:] != (2, SIDE, SIDE) or images.dtype != np.uint8:
        raise DataError(f"{paths[0]}: expected N x 2 x 96 x 96 bytes, got {images.shape} "
                        f"{images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images) or len(info) != len(images):
        raise DataError(f"smallNORB {split}: {len(images)} images, {len(labels)} labels and "
                        f"{len(info)} info rows; the files do not belong together")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{paths[1]}: category out of range 0-{len(CLASSES) - 1}")
    return images, labels.astype(np.int64)


def downsample(images_NC96: np.ndarray) -> np.ndarray:
    """(N, C, 96, 96) uint8 -> (N, C, 48, 48) uint8, means of 2x2 blocks rounded."""
    n, c = images_NC96.shape[:2]
    f = 96 // DOWNSAMPLED
    blocks = images_NC96.reshape(n, c, DOWNSAMPLED, f, DOWNSAMPLED, f).astype(np.float32)
    return np.rint(blocks.mean(axis=(3, 5))).astype(np.uint8)


def standardise(x_BCHW: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per image (per channel)."""
    mean = x_BCHW.mean(dim=(2, 3), keepdim=True)
    std = x_BCHW.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (x_BCHW - mean) / std.clamp_min(eps)


def crop(x_BCHW: torch.Tensor, offsets_B2: torch.Tensor, size: int = CROP) -> torch.Tensor:
    """A ``size`` x ``size`` window of each image at its (row, col) offset, one gather."""
    B, C = x_BCHW.shape[:2]
    dev = x_BCHW.device
    rows_BS = offsets_B2[:, :1] + torch.arange(size, device=dev)
    cols_BS = offsets_B2[:, 1:] + torch.arange(size, device=dev)
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return x_BCHW[b, c, rows_BS[:, None, :, None], cols_BS[:, None, None, :]]


def jitter(x_BCHW: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random brightness (added) and contrast (deviations from the mean scaled) per image."""
    B, dev = x_BCHW.shape[0], x_BCHW.device
    delta = (torch.rand(B, 1, 1, 1, generator=g, device=dev) * 2 - 1) * BRIGHTNESS
    factor = CONTRAST[0] + torch.rand(B, 1, 1, 1, generator=g, device=dev) * (
        CONTRAST[1] - CONTRAST[0])
    mean = x_BCHW.mean(dim=(1, 2, 3), keepdim=True)
    return (x_BCHW - mean) * factor + mean + delta


class NorbTrainStream(TrainStream):
    """Shuffled training batches of random crops with jitter: ``batch(epoch, k, step)``, a pure
    function of (seed, epoch, step) like the MNIST stream (exact resume); the batch order is
    the MNIST stream's."""

    def __init__(self, data: ImageSet, batch_size: int, seed: int):
        super().__init__(data, batch_size, seed)

    def batch(self, epoch: int, k: int, step: int) -> dict[str, torch.Tensor]:
        idx = self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        x = standardise(self.data.images[idx].float())
        dev = self.data.device
        g = generator(dev, self.seed, STREAM_CROP, step)
        offsets = torch.randint(0, DOWNSAMPLED - CROP + 1, (len(idx), 2), generator=g, device=dev)
        x = jitter(crop(x, offsets), generator(dev, self.seed, STREAM_JITTER, step))
        return {"x": x, "y": self.data.labels[idx]}


class NorbEvalSource(IndexedSource):
    """Fixed evaluation batches: the centre 32x32 crop of each standardised image."""

    def __init__(self, data: ImageSet, name: str):
        self.data, self.name = data, name

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x = standardise(self.data.images[idx].float())
        m = (DOWNSAMPLED - CROP) // 2
        return {"x": x[:, :, m:m + CROP, m:m + CROP], "y": self.data.labels[idx]}


def _channels(images: np.ndarray, in_channels: int) -> np.ndarray:
    if in_channels not in (1, 2):
        raise DataError(f"smallNORB has stereo pairs: model.in_channels must be 1 (first camera) "
                        f"or 2 (both), got {in_channels}")
    return images[:, :in_channels]


def build_bundle(cfg, device: torch.device, root_flag: str | None = None):
    """The ``smallnorb`` dataset: training stream, validation (a fixed random subset of
    ``data.val_size`` training pairs) and the official test set."""
    from capsctl.data.mnist import resolve_root

    root = resolve_root(root_flag, cfg.data.root)
    tr_images, tr_labels = load_split(root, "train", cfg.data.download)
    te_images, te_labels = load_split(root, "test", cfg.data.download)
    n_val = cfg.data.val_size
    if n_val >= len(tr_labels):
        raise DataError(f"data.val_size={n_val} leaves no smallNORB training images (the "
                        f"training set has {len(tr_labels)})")
    order = np.random.default_rng(VAL_SEED).permutation(len(tr_labels))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])

    def to_set(images, labels) -> ImageSet:
        small = downsample(_channels(images, cfg.model.in_channels))
        return ImageSet(torch.from_numpy(small).to(device), torch.from_numpy(labels).to(device))

    train = to_set(tr_images[train_idx], tr_labels[train_idx])
    val = NorbEvalSource(to_set(tr_images[val_idx], tr_labels[val_idx]), "val") if n_val else None
    test = NorbEvalSource(to_set(te_images, te_labels), "test")
    return DataBundle(NorbTrainStream(train, cfg.train.batch_size, cfg.train.seed), val, test, CROP,
                      SINGLE)
