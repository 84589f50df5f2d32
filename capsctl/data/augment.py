"""Batched placement of digits on a canvas with per-example integer shifts, on the data's device.

One gather per batch, no per-sample Python: each uint8 image is zero-padded by ``canvas_pad +
shift`` pixels and a window of ``H + 2 * canvas_pad`` pixels is cut at a per-example offset in
``[0, 2 * shift]`` (offset ``shift`` = centred). ``canvas_pad=0, shift=2`` is the paper's MNIST
augmentation; ``canvas_pad=6, shift=6`` places a 28x28 digit anywhere on a 40x40 canvas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (Python's hash() of str is salted)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def generator(device: torch.device, *parts: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(*parts))
    return g


def random_offsets(n: int, shift: int, g: torch.Generator, device) -> torch.Tensor:
    """(n, 2) integer window offsets (row, col) uniform in [0, 2 * shift]."""
    return torch.randint(0, 2 * shift + 1, (n, 2), generator=g, device=device)


def place(images_BHW: torch.Tensor, offsets_B2: torch.Tensor | None, canvas_pad: int,
          shift: int) -> torch.Tensor:
    """uint8 (B, H, W) -> uint8 (B, H + 2 canvas_pad, W + 2 canvas_pad), shifted per example.

    ``offsets_B2`` None means every image centred (offset = shift).
    """
    B, H, W = images_BHW.shape
    pad = canvas_pad + shift
    if shift == 0 or offsets_B2 is None:
        return F.pad(images_BHW, (canvas_pad,) * 4) if canvas_pad else images_BHW
    padded = F.pad(images_BHW, (pad, pad, pad, pad))
    out_h, out_w = H + 2 * canvas_pad, W + 2 * canvas_pad
    dev = images_BHW.device
    rows_BH = offsets_B2[:, :1] + torch.arange(out_h, device=dev)
    cols_BW = offsets_B2[:, 1:] + torch.arange(out_w, device=dev)
    b_idx = torch.arange(B, device=dev)[:, None, None]
    return padded[b_idx, rows_BH[:, :, None], cols_BW[:, None, :]]


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float32 (B, 1, H, W) in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255.0)


# --- natural images: (B, C, H, W), random crop of a padded image, left-right flip -----------------

def random_windows(n: int, room: int, g: torch.Generator, device) -> torch.Tensor:
    """(n, 2) integer window offsets (row, col) uniform in [0, room]."""
    return torch.randint(0, room + 1, (n, 2), generator=g, device=device)


def random_flips(n: int, g: torch.Generator, device) -> torch.Tensor:
    """(n,) bool: mirror example i left-right, each with probability 1/2."""
    return torch.randint(0, 2, (n,), generator=g, device=device).bool()


def crop_flip(images_BCHW: torch.Tensor, offsets_B2: torch.Tensor, flip_B: torch.Tensor | None,
              pad: int, crop: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8 (B, C, crop, crop): the window of side ``crop`` at
    ``offsets_B2`` (row, col) of each image zero-padded by ``pad`` px, mirrored left-right
    where ``flip_B``; one gather for the batch. Legend: S = crop."""
    B, C = images_BCHW.shape[:2]
    dev = images_BCHW.device
    padded = F.pad(images_BCHW, (pad,) * 4) if pad else images_BCHW
    ar_S = torch.arange(crop, device=dev)
    rows_BS = offsets_B2[:, :1] + ar_S
    cols_BS = ar_S.expand(B, crop) if flip_B is None else \
        torch.where(flip_B[:, None], crop - 1 - ar_S, ar_S)
    cols_BS = offsets_B2[:, 1:] + cols_BS
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return padded[b, c, rows_BS[:, None, :, None], cols_BS[:, None, None, :]]


def centre_crop(images_BCHW: torch.Tensor, crop: int) -> torch.Tensor:
    """The centre ``crop`` x ``crop`` window of each image (a view; the image when it fits)."""
    H, W = images_BCHW.shape[-2:]
    top, left = (H - crop) // 2, (W - crop) // 2
    return images_BCHW[..., top:top + crop, left:left + crop]


def unit_float(images_BCHW: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W) in [0, 1]."""
    return images_BCHW.float().div_(255.0)
