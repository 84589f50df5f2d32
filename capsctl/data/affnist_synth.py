"""affnist-synth: an affNIST-style test set made from the MNIST test digits by the creator's
recipe, for machines without the real files: every digit, ``per_digit`` random affine versions,
rotation within +-20 degrees, shear within +-0.2, horizontal and vertical scale each in
[0.8, 1.2], then a random translation that keeps the whole digit inside the frame
(``generate_round``, deterministic in (seed, round)). ``write_synth`` writes it in the official
layout (data/affnist_mat.py) plus the applied transforms and the ``capsctl_synth`` marker; it is
always reported as "affnist-synth", never as affNIST.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capsctl.data import affnist_mat
from capsctl.data.affnist_files import BATCH_DIRS
from capsctl.data.affnist_mat import SIDE
from capsctl.data.augment import generator
from capsctl.errors import DataError

SYNTH_STREAM = 21


@dataclass(frozen=True)
class SynthRanges:
    """Ranges of the random affine transform (uniform draws)."""

    rotation: float = 20.0   # degrees, +-
    shear: float = 0.2       # horizontal shear factor, +-
    scale_min: float = 0.8   # horizontal and vertical scale, each drawn on its own
    scale_max: float = 1.2

    def check(self) -> None:
        if not 0 <= self.rotation <= 180:
            raise DataError(f"--rotation {self.rotation}: expected 0 to 180 degrees")
        if not 0 <= self.shear <= 1:
            raise DataError(f"--shear {self.shear}: expected 0 to 1")
        if not 0 < self.scale_min <= self.scale_max <= 1.4:
            raise DataError(f"--scale-min {self.scale_min} / --scale-max {self.scale_max}: "
                            "expected 0 < min <= max <= 1.4 (larger digits cannot stay inside "
                            "the 40x40 frame)")


def linear_part(params_N6: torch.Tensor) -> torch.Tensor:
    """(N, 2, 2) matrices A = R(rotation) @ Shear(shear) @ Scale(scale_x, scale_y) acting on
    (x, y) = (column, row) pixel coordinates; positive rotation turns the digit counter-clockwise
    as displayed (y points down)."""
    th = torch.deg2rad(params_N6[:, 0])
    c, s = torch.cos(th), torch.sin(th)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)
    shear = torch.stack([torch.stack([one, params_N6[:, 1]], -1),
                         torch.stack([zero, one], -1)], -2)
    scale = torch.diag_embed(params_N6[:, 2:4])
    return rot @ shear @ scale


def forward_matrix(params_N6: torch.Tensor, src_side: int = 28) -> torch.Tensor:
    """(N, 2, 3) maps a source pixel (x, y, 1) to canvas coordinates: q = A (p - c) + t, with c
    the source centre and t = params[:, 4:6] where that centre lands on the canvas."""
    a = linear_part(params_N6)
    c = torch.full((2,), (src_side - 1) / 2, dtype=params_N6.dtype)
    return torch.cat([a, (params_N6[:, 4:6] - a @ c)[:, :, None]], dim=2)


def _ink_box(digits_NHW: torch.Tensor) -> torch.Tensor:
    """(N, 4) x0, y0, x1, y1 of the nonzero pixels (the whole image when blank)."""
    side = digits_NHW.shape[-1]
    ink = digits_NHW > 0
    cols, rows = ink.any(1), ink.any(2)
    ar = torch.arange(side)
    big = torch.full_like(ar, side)
    x0 = torch.where(cols, ar, big).min(1).values
    x1 = torch.where(cols, ar, -1).max(1).values
    y0 = torch.where(rows, ar, big).min(1).values
    y1 = torch.where(rows, ar, -1).max(1).values
    box = torch.stack([x0, y0, x1, y1], 1)
    blank = ~ink.flatten(1).any(1)
    box[blank] = torch.tensor([0, 0, side - 1, side - 1])
    return box.double()


def draw_transforms(digits_NHW: torch.Tensor, ranges: SynthRanges, g: torch.Generator,
                    max_tries: int = 200) -> torch.Tensor:
    """(N, 6) float64 params (rotation_deg, shear, scale_x, scale_y, centre_x, centre_y).

    The translation is uniform over the positions where everything a bilinear resampling can
    light (the ink box grown by one source pixel, transformed) lies inside the 40x40 frame;
    transforms for which no such position exists are drawn again.
    """
    n, side = digits_NHW.shape[0], digits_NHW.shape[-1]
    box = _ink_box(digits_NHW)
    c = (side - 1) / 2
    corners_N42 = torch.stack([box[:, [0, 1]], box[:, [2, 1]], box[:, [0, 3]], box[:, [2, 3]]], 1)
    corners_N42 = corners_N42 + torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]],
                                             dtype=torch.float64) - c
    params = torch.zeros(n, 6, dtype=torch.float64)
    todo = torch.arange(n)
    for _ in range(max_tries):
        if len(todo) == 0:
            return params
        u = torch.rand(len(todo), 6, generator=g, dtype=torch.float64)
        p = torch.empty_like(u)
        p[:, 0] = (2 * u[:, 0] - 1) * ranges.rotation
        p[:, 1] = (2 * u[:, 1] - 1) * ranges.shear
        p[:, 2:4] = ranges.scale_min + u[:, 2:4] * (ranges.scale_max - ranges.scale_min)
        moved_N42 = corners_N42[todo] @ linear_part(p).transpose(1, 2)
        lo, hi = -moved_N42.min(1).values, (SIDE - 1) - moved_N42.max(1).values
        fits = (hi >= lo).all(1)
        p[:, 4:6] = lo + u[:, 4:6] * (hi - lo)
        params[todo[fits]] = p[fits]
        todo = todo[~fits]
    raise DataError(f"{len(todo)} digits do not fit the 40x40 frame after {max_tries} draws; "
                    "lower --scale-max or --shear")


def render(digits_NHW: torch.Tensor, params_N6: torch.Tensor, chunk: int = 2500) -> torch.Tensor:
    """uint8 (N, 40, 40): each digit warped by its transform (bilinear, zero outside)."""
    n, side = digits_NHW.shape[0], digits_NHW.shape[-1]
    a = linear_part(params_N6)
    a_inv = torch.linalg.inv(a)
    ys, xs = torch.meshgrid(torch.arange(SIDE, dtype=torch.float64),
                            torch.arange(SIDE, dtype=torch.float64), indexing="ij")
    q_P2 = torch.stack([xs.flatten(), ys.flatten()], 1)  # canvas pixel (x, y), P = 1600
    out = torch.empty(n, SIDE, SIDE, dtype=torch.uint8)
    c = (side - 1) / 2
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        # source position of every canvas pixel: p = A^-1 (q - t) + c
        p_NP2 = (q_P2[None] - params_N6[sl, None, 4:6]) @ a_inv[sl].transpose(1, 2) + c
        grid = (p_NP2 / (side - 1) * 2 - 1).float().view(-1, SIDE, SIDE, 2)
        src = digits_NHW[sl].float().unsqueeze(1)
        warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        out[sl] = warped[:, 0].round().clamp_(0, 255).to(torch.uint8)
    return out


def generate_round(digits_NHW: np.ndarray, ranges: SynthRanges, seed: int,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """Round ``k`` (0-based): one transformed version of every digit. Deterministic in
    (seed, k) and independent of the other rounds. Returns images (N, 40, 40) uint8 and the
    params (N, 6)."""
    digits = torch.from_numpy(np.array(digits_NHW, dtype=np.uint8))  # a writable copy
    g = generator(torch.device("cpu"), seed, SYNTH_STREAM, k)
    params = draw_transforms(digits, ranges, g)
    return render(digits, params).numpy(), params.numpy()


def write_synth(out: Path, digits_NHW: np.ndarray, labels: np.ndarray, per_digit: int,
                seed: int, ranges: SynthRanges, force: bool = False,
                progress: Callable[[int], None] | None = None) -> dict:
    """Write ``out/test_batches/1.mat .. per_digit.mat`` (round k = file k) and a README.txt.

    Besides ``image`` and ``label_int`` each file stores, per image, ``source_index`` (the MNIST
    test digit), ``transform_params`` (6 x N: rotation_deg, shear, scale_x, scale_y, centre_x,
    centre_y) and ``affine_transforms`` (6 x N: the rows of the 2x3 forward matrix in pixel
    coordinates, x' = a x + b y + c, y' = d x + e y + f).
    """
    ranges.check()
    if per_digit < 1:
        raise DataError(f"--per-digit {per_digit}: expected at least 1")
    target = out / BATCH_DIRS["test"]
    if target.exists() and any(target.iterdir()):
        if not force:
            raise DataError(f"{target} already holds files; choose another --out or pass --force "
                            "to move them aside")
        shutil.move(str(target), str(target.with_name(
            f"{target.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")))
    tmp = out / f".{target.name}.writing"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DataError(f"cannot write to {out}: {e.strerror or e}; pick another --out") from None
    n = len(labels)
    index = np.arange(n, dtype=np.int32).reshape(1, n)
    for k in range(per_digit):
        images, params = generate_round(digits_NHW, ranges, seed, k)
        matrix = forward_matrix(torch.from_numpy(params)).numpy().reshape(n, 6)
        marker = {"seed": seed, "round": k + 1, "per_digit": per_digit, **asdict(ranges)}
        affnist_mat.write_mat(tmp / f"{k + 1}.mat", images, labels,
                  extra={"source_index": index, "transform_params": params.T.copy(),
                         "affine_transforms": matrix.T.copy()},
                  marker=marker)
        if progress is not None:
            progress(k + 1)
    os.replace(tmp, target)
    (out / "README.txt").write_text(
        "affnist-synth: an affNIST-style test set made by `capsctl data affnist-synth` from the "
        "MNIST test digits\n(not the official affNIST; results on it are reported as "
        f"affnist-synth).\nseed {seed}, {per_digit} versions per digit, {n} digits, "
        f"rotation +-{ranges.rotation} deg, shear +-{ranges.shear}, "
        f"scale [{ranges.scale_min}, {ranges.scale_max}] per axis.\n")
    return {"folder": str(target), "files": per_digit, "images": n * per_digit, "digits": n}
