"""Efficient-CapsNet's MNIST training augmentation (``data.augment: efficient-capsnet``),
batched on the data's device: the four steps of the authors' input pipeline (Mazzia et al. 2021,
code EscVM/Efficient-CapsNet, ``utils/pre_process_mnist.py``), in their order, each drawn per
image:

1. rotate, with probability 1/2, by ``trunc(30 * clip(N(0, 0.33), -0.9999, 0.9999))`` whole
   degrees about pixel (14, 14), bilinear, zero outside (their ``cv2.warpAffine``);
2. shift by whole pixels within the digit's empty margins (measured after the rotation): along
   each axis a direction (1/2 each) and a fraction ``min(|N(0, 0.33)|, 0.9999)`` of the margin
   on that side, rounded down as they do (``floor(-a * left)`` or ``floor(a * (1 + right))``);
3. squish: resize the width from 28 to ``28 - w`` columns, ``w = floor(7 a + 1)`` (1..7), with
   an anti-aliased Lanczos-3 filter, and place it ``w // 2 + floor(2 b)`` columns from the left
   edge, cropped to 28 (their ``tf.image.resize(LANCZOS3, antialias=True)``, pad, crop);
4. erase a 4 x 4 patch whose top-left corner is uniform in rows and columns 4..22.

Where this differs from their code, and why (docs/datasets.md says the same): pixels are the
project's uint8 / 255 (theirs / 256); the rotation samples at exact coordinates (OpenCV rounds
them to 1/32 pixel); an image with no ink is not shifted (their margins are undefined there).
Every draw comes from one generator the caller seeds per step, so a resumed run replays them.

Shapes: B batch, H = W = 28 rows and columns (C = W). ``augment(images_BHW, g)`` returns
float32 (B, 1, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from capsctl.data.augment import to_float

SIDE = 28
ROTATE_DEG = 30.0      # their angle scale
SPREAD = 0.33          # their normal's standard deviation
ERASE = 4              # patch side
ERASE_LOW, ERASE_SPAN = 4, 19   # corner in 4 .. 22
SQUISH_MAX = SIDE // 4          # w = floor(7 a + 1) <= 7


def lanczos3(x: torch.Tensor) -> torch.Tensor:
    """sinc(x) sinc(x / 3) for |x| < 3, else 0 (float64)."""
    x = x.abs()
    px = math.pi * x
    safe = torch.where(x < 1e-3, torch.ones_like(px), px)
    w = 3.0 * torch.sin(safe) * torch.sin(safe / 3.0) / (safe * safe)
    return torch.where(x < 1e-3, torch.ones_like(w), torch.where(x < 3.0, w, torch.zeros_like(w)))


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of an anti-aliased Lanczos-3 resize (half-pixel centres;
    the kernel stretched by n_in / n_out when shrinking; each row sums to 1)."""
    scale = n_out / n_in
    stretch = max(1.0 / scale, 1.0)
    centre_O = (torch.arange(n_out, dtype=torch.float64) + 0.5) / scale
    pos_I = torch.arange(n_in, dtype=torch.float64) + 0.5
    w_OI = lanczos3((pos_I[None, :] - centre_O[:, None]) / stretch)
    return w_OI / w_OI.sum(dim=1, keepdim=True)


def squish_table() -> torch.Tensor:
    """(SQUISH_MAX, 2, C_out, C_in) float32: for w = 1..7 and the extra offset 0 or 1, the
    matrix taking an image's 28 columns to the squished, placed and cropped 28 columns."""
    table = torch.zeros(SQUISH_MAX, 2, SIDE, SIDE, dtype=torch.float64)
    for w in range(1, SQUISH_MAX + 1):
        r = resize_matrix(SIDE, SIDE - w)
        for extra in (0, 1):
            start = w // 2 + extra
            keep = min(SIDE - w, SIDE - start)
            table[w - 1, extra, start:start + keep] = r[:keep]
    return table.float()


def _normal(shape, g, device) -> torch.Tensor:
    """N(0, 0.33) draws (clipped by the caller, as each of their steps does)."""
    return torch.randn(shape, generator=g, device=device) * SPREAD


def draw(n: int, g: torch.Generator, device) -> dict[str, torch.Tensor]:
    """The random parameters of ``n`` images, in a fixed order from ``g``: ``angle`` (degrees,
    0 where not rotated), ``shift_dir`` / ``shift_amt`` (n, 2: rows, columns), ``squish_w``,
    ``squish_extra`` and ``erase`` (n, 2: top row, left column). Their shift pairs its two
    direction draws and two amount draws crosswise - rows take direction 0 and amount 1,
    columns direction 1 and amount 0 - so the amounts are swapped here into (rows, columns)."""
    angle = torch.trunc(_normal(n, g, device).clamp(-0.9999, 0.9999) * ROTATE_DEG)
    rotate = _normal(n, g, device).clamp(-0.9999, 0.9999) <= 0
    shift_dir = torch.floor(torch.rand((n, 2), generator=g, device=device) * 2).long()
    shift_amt = _normal((n, 2), g, device).abs().clamp(max=0.9999).flip(1)
    squish = _normal((n, 2), g, device).abs().clamp(max=0.9999)
    erase = torch.floor(torch.rand((n, 2), generator=g, device=device) * ERASE_SPAN).long()
    return {"angle": torch.where(rotate, angle, torch.zeros_like(angle)),
            "shift_dir": shift_dir, "shift_amt": shift_amt,
            "squish_w": torch.floor(squish[:, 0] * SQUISH_MAX + 1).long(),
            "squish_extra": torch.floor(squish[:, 1] * 2).long(),
            "erase": erase + ERASE_LOW}


def rotate(x_B1HW: torch.Tensor, angle_B: torch.Tensor) -> torch.Tensor:
    """Each image turned counter-clockwise (as displayed) by ``angle_B`` degrees about pixel
    (14, 14), bilinear, zero outside; images with angle 0 are returned unchanged."""
    B, _, H, W = x_B1HW.shape
    theta = torch.deg2rad(angle_B.double())
    a, b = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    dev = x_B1HW.device
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float64) - SIDE / 2,
                            torch.arange(W, device=dev, dtype=torch.float64) - SIDE / 2,
                            indexing="ij")
    src_x_BHW = a * xs - b * ys + SIDE / 2     # the inverse of OpenCV's rotation matrix
    src_y_BHW = b * xs + a * ys + SIDE / 2
    grid_BHW2 = torch.stack((src_x_BHW / (W - 1), src_y_BHW / (H - 1)), dim=-1) * 2 - 1
    turned = F.grid_sample(x_B1HW, grid_BHW2.to(x_B1HW.dtype), mode="bilinear",
                           padding_mode="zeros", align_corners=True)
    return torch.where((angle_B != 0)[:, None, None, None], turned, x_B1HW)


def _margins(ink_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(empty lines before the first inked one, after the last), 0 and 0 without ink."""
    N = ink_BN.shape[1]
    idx_N = torch.arange(N, device=ink_BN.device)
    first = torch.where(ink_BN, idx_N, N).amin(dim=1)
    last = torch.where(ink_BN, idx_N, -1).amax(dim=1)
    has = ink_BN.any(dim=1)
    return torch.where(has, first, 0), torch.where(has, N - 1 - last, 0)


def shift(x_B1HW: torch.Tensor, dir_B2: torch.Tensor, amt_B2: torch.Tensor) -> torch.Tensor:
    """Whole-pixel shifts within each image's empty margins (the module's step 2), as their
    roll; ``dir_B2`` and ``amt_B2`` in (rows, columns) order (``draw``)."""
    B, _, H, W = x_B1HW.shape
    plane = x_B1HW[:, 0]
    top, bottom = _margins(plane.sum(dim=2) > 0)
    left, right = _margins(plane.sum(dim=1) > 0)

    def amount(amt, low, high, direction):
        back = torch.floor(-amt * low.to(amt.dtype))
        forth = torch.floor(amt * (1 + high).to(amt.dtype))
        return torch.where(direction == 0, back, forth).long()

    dy_B = amount(amt_B2[:, 0], top, bottom, dir_B2[:, 0])
    dx_B = amount(amt_B2[:, 1], left, right, dir_B2[:, 1])
    dev = x_B1HW.device
    rows_BH = (torch.arange(H, device=dev) - dy_B[:, None]) % H
    cols_BW = (torch.arange(W, device=dev) - dx_B[:, None]) % W
    b = torch.arange(B, device=dev)[:, None, None]
    return plane[b, rows_BH[:, :, None], cols_BW[:, None, :]].unsqueeze(1)


def squish(x_B1HW: torch.Tensor, w_B: torch.Tensor, extra_B: torch.Tensor,
           table: torch.Tensor) -> torch.Tensor:
    """The module's step 3 as one matrix per image: out[..., c] = sum_i x[..., i] S[c, i]."""
    S_BCI = table[w_B - 1, extra_B]
    return torch.matmul(x_B1HW, S_BCI.transpose(1, 2).unsqueeze(1))


def erase(x_B1HW: torch.Tensor, corner_B2: torch.Tensor) -> torch.Tensor:
    """A 4 x 4 patch set to zero at each image's (top row, left column)."""
    H, W = x_B1HW.shape[-2:]
    dev = x_B1HW.device
    r_BH = torch.arange(H, device=dev) - corner_B2[:, :1]
    c_BW = torch.arange(W, device=dev) - corner_B2[:, 1:]
    inside_BHW = ((r_BH >= 0) & (r_BH < ERASE))[:, :, None] & \
        ((c_BW >= 0) & (c_BW < ERASE))[:, None, :]
    return x_B1HW.masked_fill(inside_BHW.unsqueeze(1), 0.0)


class EfficientCapsNetAugment:
    """``augment(images_BHW uint8, g) -> float32 (B, 1, 28, 28)``: the four steps in order."""

    def __init__(self):
        self.table = squish_table()

    def __call__(self, images_BHW: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.table.device != images_BHW.device:
            self.table = self.table.to(images_BHW.device)     # once, not every step
        p = draw(images_BHW.shape[0], g, images_BHW.device)
        x = rotate(to_float(images_BHW), p["angle"])
        x = shift(x, p["shift_dir"], p["shift_amt"])
        x = squish(x, p["squish_w"], p["squish_extra"], self.table)
        return erase(x, p["erase"])
