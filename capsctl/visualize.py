"""Pictures of what the capsules learned. Images are float tensors in [0, 1], (3, H, W)."""

from __future__ import annotations

import torch
from torchvision.utils import make_grid


def pair_grid(inputs: torch.Tensor, recons: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """Inputs (top row) above their reconstructions (bottom row), upscaled by ``scale``."""
    x = inputs.detach().float().cpu()
    r = recons.detach().float().cpu().view_as(x)
    grid = make_grid(torch.cat([x, r]), nrow=len(x), padding=1, pad_value=0.5)
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).clamp(0, 1)
