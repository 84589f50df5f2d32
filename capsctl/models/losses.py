"""Losses as dicts of named terms (each a scalar averaged over the batch); ``total`` is optimised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capsctl import tasks
from capsctl.models.capsnet_config import MarginLossConfig


def margin_loss(lengths_BJ: torch.Tensor, targets_BJ: torch.Tensor, m_plus: float = 0.9,
                m_minus: float = 0.1, down_weight: float = 0.5) -> torch.Tensor:
    """Per-example margin loss summed over classes (paper eq. 4), shape (B,).

    ``targets_BJ`` is 1 for every present class (one for MNIST, two for MultiMNIST), else 0.
    """
    lengths_BJ, targets_BJ = lengths_BJ.float(), targets_BJ.float()
    present = targets_BJ * F.relu(m_plus - lengths_BJ).pow(2)
    absent = down_weight * (1.0 - targets_BJ) * F.relu(lengths_BJ - m_minus).pow(2)
    return (present + absent).sum(dim=1)


def margin_loss_of(scores_BJ: torch.Tensor, y_B: torch.Tensor,
                   cfg: MarginLossConfig) -> torch.Tensor:
    """The margin loss alone of one-label examples, per example (B,): the capsule families'
    ``class_loss`` (registry.ModelSpec)."""
    targets_BJ = F.one_hot(y_B, scores_BJ.shape[1])
    return margin_loss(scores_BJ, targets_BJ, cfg.m_plus, cfg.m_minus, cfg.down_weight)


def reconstruction_sse(recon_BN: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-example sum of squared pixel errors, shape (B,)."""
    return (recon_BN.float() - images.flatten(1).float()).pow(2).sum(dim=1)


def capsnet_losses(out: dict, batch: dict, cfg: MarginLossConfig, step: int = 0
                   ) -> dict[str, torch.Tensor]:
    """One label per image: the margin loss plus the weighted reconstruction error."""
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


def pair_targets(batch: dict, num_classes: int) -> torch.Tensor:
    """(B, J) 0/1 targets of a two-label batch: both labels present (the pair task's)."""
    return tasks.get(tasks.PAIR).targets(batch, num_classes)


def multimnist_losses(out: dict, batch: dict, cfg: MarginLossConfig, step: int = 0
                      ) -> dict[str, torch.Tensor]:
    """Two-digit CapsNet loss (paper section 6): the margin loss with both labels present, plus
    each digit reconstructed from its own capsule against its own source image (``x_a`` for
    ``y``, ``x_b`` for ``y2``), the two weighted SSEs summed. ``out["recon"]`` must be (B, 2, N):
    the model run with ``y = stack([y, y2], 1)``."""
    targets = pair_targets(batch, out["scores"].shape[1])
    losses = {"margin": margin_loss(out["scores"], targets, cfg.m_plus, cfg.m_minus,
                                    cfg.down_weight).mean()}
    total = losses["margin"]
    if "recon" in out and cfg.recon_weight > 0:
        recon = out["recon"]
        if recon.dim() != 3 or recon.shape[1] != 2:
            raise ValueError("multimnist_losses needs one reconstruction per digit, recon "
                             f"(B, 2, N); got {tuple(recon.shape)} (run the model with both "
                             "labels)")
        sse = reconstruction_sse(recon[:, 0], batch["x_a"]) + reconstruction_sse(recon[:, 1],
                                                                                 batch["x_b"])
        losses["reconstruction"] = cfg.recon_weight * sse.mean()
        total = total + losses["reconstruction"]
    losses["total"] = total
    return losses


def multilabel_bce_losses(out: dict, batch: dict, loss_cfg=None, step: int = 0
                          ) -> dict[str, torch.Tensor]:
    """Sigmoid outputs trained on every present label: binary cross-entropy summed over the
    classes, averaged over the batch (the MultiMNIST baseline CNN)."""
    logits = out["logits"].float()
    targets = pair_targets(batch, logits.shape[1]).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()
    return {"bce": bce, "total": bce}
