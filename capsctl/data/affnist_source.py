"""affNIST's evaluation source: ``MatSource`` streams affNIST-format files one at a time
(memory stays flat in N), ``open_source`` finds the files of ``affnist`` or ``affnist-synth``
under the data root (fetching the official ones when asked) and refuses a generated set
passed off as the official one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from capsctl.data.affnist_files import download, missing, split_files
from capsctl.data.affnist_mat import SIDE, is_synthetic, read_mat
from capsctl.errors import DataError


def _as_input(images_BHW: torch.Tensor) -> torch.Tensor:
    """0-255 pixels (uint8 or float) -> float32 (B, 1, H, W) in [0, 1], never in place."""
    return images_BHW.unsqueeze(1).float() / 255.0


class MatSource:
    """Batches of affNIST-format files, one file in memory at a time.

    Same interface as ``EvalSource``: ``batches(batch_size, limit)``, ``get(idx)``, ``len()``,
    ``name``. Batches do not straddle files (the last batch of each file may be smaller).
    """

    task = "single"  # one label per image (capsctl/data/registry.py)
    default_limit = None

    def __init__(self, files: list[Path], name: str, device: torch.device):
        self.files, self.name, self.device = list(files), name, torch.device(device)
        self._counts: list[int] | None = None
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def counts(self) -> list[int]:
        """Images per file (reads every file once, checking it)."""
        if self._counts is None:
            self._counts = [len(read_mat(p)[1]) for p in self.files]
        return self._counts

    def __len__(self) -> int:
        return sum(self.counts())

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached is None or self._cached[0] != i:
            self._cached = None  # free the previous file before reading the next
            images, labels = read_mat(self.files[i])
            self._cached = (i, torch.from_numpy(images).to(self.device),
                            torch.from_numpy(labels).to(self.device))
        return self._cached[1], self._cached[2]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict]:
        left = math.inf if limit is None else limit
        for i in range(len(self.files)):
            if left <= 0:
                return
            images, labels = self._load(i)
            for start in range(0, len(labels), batch_size):
                if left <= 0:
                    return
                stop = start + int(min(batch_size, left))
                left -= min(stop, len(labels)) - start
                yield {"x": _as_input(images[start:stop]), "y": labels[start:stop]}
        self._cached = None

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at global indices ``idx`` (files in order, concatenated)."""
        idx_np = torch.as_tensor(idx).cpu().numpy().astype(np.int64)
        ends = np.cumsum(self.counts())
        if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= ends[-1]):
            raise IndexError(f"index out of range for {self.name} ({ends[-1]} images)")
        file_of = np.searchsorted(ends, idx_np, side="right")
        x = torch.empty((len(idx_np), SIDE, SIDE), dtype=torch.float32, device=self.device)
        y = torch.empty(len(idx_np), dtype=torch.long, device=self.device)
        for i in np.unique(file_of):
            rows = np.nonzero(file_of == i)[0]
            local = idx_np[rows] - (ends[i - 1] if i else 0)
            images, labels = self._load(int(i))
            rows_t = torch.from_numpy(rows).to(self.device)
            local_t = torch.from_numpy(local).to(self.device)
            x[rows_t], y[rows_t] = images[local_t].float(), labels[local_t]
        return {"x": _as_input(x), "y": y}


def open_source(name: str, split: str, root: Path, device: torch.device,
                download_missing: bool = False) -> MatSource:
    """The ``affnist`` or ``affnist-synth`` source of ``split`` under the data root ``root``."""
    if name == "affnist-synth" and split != "test":
        raise DataError("affnist-synth has only a test split (made from the MNIST test digits); "
                        "use --split test")
    folder = root / name
    files = split_files(folder, split)
    if files is None and name == "affnist" and download_missing:
        download(root, split)
        files = split_files(folder, split)
    if files is None:
        raise missing(name, folder, split, root)
    if name == "affnist" and is_synthetic(files[0]):
        raise DataError(f"{files[0]} was made by capsctl data affnist-synth, not the official "
                        f"affNIST; move it to {root / 'affnist-synth'} and evaluate it as "
                        "--dataset affnist-synth")
    return MatSource(files, name, device)
