"""Segmentation by reconstruction on MultiMNIST (the paper's Figure 5).

For each example, one column: the input; the two digits reconstructed from the two longest
capsules, overlaid in red (longest) and green (second), pixel values clipped at 1; and, only
when the pair is wrong, the reconstruction from the two true labels (red = L's first label,
green = its second). The caption gives the labels (L) and the prediction (P); a wrong pair is
captioned in red and its third picture is marked "*".
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from capsctl.errors import CapsctlError

GAP, CAPTION, FONT_SIZE = 4, 30, 13
BG, FAIL_RGB, OK_RGB = (48, 48, 48), (255, 90, 90), (235, 235, 235)


def _overlay(recon_B2N: torch.Tensor, side: int) -> torch.Tensor:
    """(B, 2, N) -> (B, 3, side, side): first reconstruction red, second green, clipped at 1."""
    r = recon_B2N.float().clamp(0, 1).view(-1, 2, side, side)
    return torch.stack([r[:, 0], r[:, 1], torch.zeros_like(r[:, 0])], 1)


@torch.no_grad()
def segmentation_grid(model, batch: dict, device: torch.device, scale: int = 3,
                      columns: int = 8) -> torch.Tensor:
    """The Figure-5 picture of ``batch`` (a MultiMNIST batch dict: x, y, y2), (3, H, W) in [0, 1].

    ``model`` is a CapsNet with a decoder whose ``forward(x, y)`` accepts ``y`` of shape (B, 2).
    """
    if "y2" not in batch:
        raise CapsctlError("segmentation pictures need two-digit (multimnist) examples")
    was = model.training
    model.eval()
    try:
        x = batch["x"].to(device).float()
        y_B2 = torch.stack([batch["y"], batch["y2"]], 1).to(device)
        out = model(x)
        if "v" not in out or getattr(model, "decoder", None) is None:
            raise CapsctlError("segmentation pictures need a CapsNet with a decoder (this "
                               "model has no reconstruction)")
        pred_B2 = out["scores"].float().topk(2, dim=1).indices
        recon_pred = model(x, pred_B2)["recon"]
        recon_true = model(x, y_B2)["recon"]
    finally:
        model.train(was)
    side = x.shape[-1]
    wrong_B = (torch.sort(pred_B2, 1).values != torch.sort(y_B2, 1).values).any(1)
    inputs = x[:, :1].clamp(0, 1).expand(-1, 3, -1, -1)
    tiles = torch.stack([inputs, _overlay(recon_pred, side), _overlay(recon_true, side)], 1)
    tiles[~wrong_B, 2] = 0.0  # the true-label picture only for failures
    return _draw(tiles.cpu(), y_B2.cpu().tolist(), pred_B2.cpu().tolist(),
                 wrong_B.cpu().tolist(), scale, columns)


def _draw(tiles: torch.Tensor, labels, preds, wrong, scale: int, columns: int) -> torch.Tensor:
    """tiles (B, 3 pictures, 3, S, S) -> the captioned grid as a (3, H, W) tensor."""
    B, P, _, S, _ = tiles.shape
    cell = S * scale
    cols = min(columns, B)
    rows = (B + cols - 1) // cols
    cell_h = P * cell + (P - 1) * GAP + CAPTION
    width = cols * cell + (cols + 1) * GAP
    height = rows * cell_h + (rows + 1) * GAP
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=FONT_SIZE)  # Pillow >= 10.1
    except TypeError:
        font = ImageFont.load_default()
    big = tiles.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for b in range(B):
        x0 = GAP + (b % cols) * (cell + GAP)
        y0 = GAP + (b // cols) * (cell_h + GAP)
        for p in range(P):
            if p == 2 and not wrong[b]:
                continue
            canvas.paste(Image.fromarray(np.ascontiguousarray(pixels[b, p])),
                         (x0, y0 + p * (cell + GAP)))
        if wrong[b]:
            draw.text((x0 + 3, y0 + 2 * (cell + GAP) + 1), "*", fill=FAIL_RGB, font=font)
        ty = y0 + P * cell + (P - 1) * GAP + 1
        colour = FAIL_RGB if wrong[b] else OK_RGB
        draw.text((x0 + 2, ty), f"L:({labels[b][0]},{labels[b][1]})", fill=colour, font=font)
        draw.text((x0 + 2, ty + 14), f"P:({preds[b][0]},{preds[b][1]})", fill=colour, font=font)
    arr = torch.from_numpy(np.asarray(canvas).copy())
    return arr.permute(2, 0, 1).float().div_(255.0)


def save_png(image_3HW: torch.Tensor, path) -> None:
    """Write a (3, H, W) float image in [0, 1] as a PNG."""
    arr = (image_3HW.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
