"""Losses as dicts of named terms (each a scalar averaged over the batch); ``total`` is optimised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capsctl.config import LossConfig


def margin_loss(lengths_BJ: torch.Tensor, targets_BJ: torch.Tensor, m_plus: float = 0.9,
                m_minus: float = 0.1, down_weight: float = 0.5) -> torch.Tensor:
    """Per-example margin loss summed over classes (paper eq. 4), shape (B,).

    ``targets_BJ`` is 1 for every present class (one for MNIST, two for MultiMNIST), else 0.
    """
    lengths_BJ, targets_BJ = lengths_BJ.float(), targets_BJ.float()
    present = targets_BJ * F.relu(m_plus - lengths_BJ).pow(2)
    absent = down_weight * (1.0 - targets_BJ) * F.relu(lengths_BJ - m_minus).pow(2)
    return (present + absent).sum(dim=1)


def reconstruction_sse(recon_BN: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-example sum of squared pixel errors, shape (B,)."""
    return (recon_BN.float() - images.flatten(1).float()).pow(2).sum(dim=1)


def capsnet_losses(out: dict, batch: dict, cfg: LossConfig) -> dict[str, torch.Tensor]:
    targets = F.one_hot(batch["y"], out["scores"].shape[1])
    losses = {"margin": margin_loss(out["scores"], targets, cfg.m_plus, cfg.m_minus,
                                    cfg.down_weight).mean()}
    total = losses["margin"]
    if "recon" in out and cfg.recon_weight > 0:
        losses["reconstruction"] = cfg.recon_weight * reconstruction_sse(out["recon"],
                                                                          batch["x"]).mean()
        total = total + losses["reconstruction"]
    losses["total"] = total
    return losses
