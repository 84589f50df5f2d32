"""White-box attacks in pixel space [0, 1] under an L-infinity bound, written once for every
family: they ascend the family's own classification loss (``ModelSpec.class_loss``: the margin
loss for CapsNet and Efficient-CapsNet, the spread loss at its final margin for EM capsules,
softmax cross-entropy for the CNN), through the model's forward, batched on the device.

  fgsm  Goodfellow, Shlens & Szegedy 2015: one step of ``eps`` along the gradient's sign.
  bim   Kurakin, Goodfellow & Bengio 2017 (basic iterative method, I-FGSM): ``steps`` steps of
        ``step_size``, each clipped back into the eps ball and [0, 1], from the image itself.
  pgd   Madry et al. 2018: bim from a uniformly random start inside the eps ball.
  cw    Carlini & Wagner's margin (the best other score minus the true class's) ascended by
        the same projected steps: the L-inf "CW" of Madry et al. and Croce & Hein, not C&W's
        L2 optimisation.

Targeted (``targeted``): the loss of the target class is descended instead (for cw: the
target's score minus the best other one is ascended). ``step_size`` defaults to 2.5 x eps /
steps (Madry et al.), so the walk can reach the ball's edge from anywhere inside it.

Shape legend: B batch, C channels, H/W image, J classes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from capsctl.adversarial import METHODS  # noqa: F401 - the methods' names, re-exported
from capsctl.device import autocast

ITERATIVE = ("bim", "pgd", "cw")
STEP_FACTOR = 2.5   # default step size = STEP_FACTOR * eps / steps (Madry et al.)


@dataclass(frozen=True)
class Attack:
    """One attack: ``method`` (METHODS), ``eps`` (L-inf bound in [0, 1] pixel units),
    ``steps`` (iterative methods), ``step_size`` (None: STEP_FACTOR * eps / steps),
    ``targeted``."""

    method: str
    eps: float
    steps: int = 10
    step_size: float | None = None
    targeted: bool = False

    @property
    def n_steps(self) -> int:
        return self.steps if self.method in ITERATIVE else 1

    @property
    def alpha(self) -> float:
        if self.method not in ITERATIVE:
            return self.eps
        return self.step_size if self.step_size is not None else \
            STEP_FACTOR * self.eps / self.steps

    @property
    def label(self) -> str:
        steps = f"-{self.steps}" if self.method in ITERATIVE else ""
        return f"{self.method}{steps}{' targeted' if self.targeted else ''}"


def cw_margin(scores_BJ: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
    """max over j != y of score_j, minus score_y: (B,); positive when the model is fooled."""
    s_BJ = scores_BJ.float()
    true_B = s_BJ.gather(1, y_B.unsqueeze(1)).squeeze(1)
    others_BJ = s_BJ.masked_fill(torch.nn.functional.one_hot(y_B, s_BJ.shape[1]).bool(),
                                 float("-inf"))
    return others_BJ.max(1).values - true_B


def objective(attack: Attack, class_loss: Callable, scores_BJ: torch.Tensor,
              y_B: torch.Tensor, target_B: torch.Tensor | None) -> torch.Tensor:
    """What the attack ascends, per example (B,)."""
    if attack.method == "cw":
        return -cw_margin(scores_BJ, target_B) if attack.targeted else cw_margin(scores_BJ, y_B)
    if attack.targeted:
        return -class_loss(scores_BJ, target_B)
    return class_loss(scores_BJ, y_B)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """The model in eval mode with its parameters out of autograd (only the input's gradient
    is computed); both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def perturb(model, class_loss: Callable, x_BCHW: torch.Tensor, y_B: torch.Tensor,
            attack: Attack, precision: str = "fp32", target_B: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The adversarial images (B, C, H, W) fp32 in [0, 1], within ``attack.eps`` of ``x_BCHW``
    in every pixel. ``model`` should be ``frozen``; ``target_B`` is required when targeted;
    ``generator`` draws pgd's random start (on the images' device)."""
    if attack.targeted and target_B is None:
        raise ValueError("a targeted attack needs target_B")
    x0 = x_BCHW.detach().float()
    lo, hi = (x0 - attack.eps).clamp(0, 1), (x0 + attack.eps).clamp(0, 1)
    x = x0.clone()
    if attack.method == "pgd":
        noise = torch.rand(x0.shape, generator=generator, device=x0.device)
        x = torch.min(torch.max(x0 + (2 * noise - 1) * attack.eps, lo), hi)
    for _ in range(attack.n_steps):
        x.requires_grad_(True)
        with autocast(x.device, precision):
            scores_BJ = model(x)["scores"]
        gain = objective(attack, class_loss, scores_BJ, y_B, target_B).sum()
        (grad,) = torch.autograd.grad(gain, x)
        x = torch.min(torch.max(x.detach() + attack.alpha * grad.sign(), lo), hi)
    return x.detach()


def random_targets(y_B: torch.Tensor, num_classes: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A target class other than the label for every example, uniformly (B,)."""
    shift = torch.randint(1, num_classes, y_B.shape, generator=generator, device=y_B.device)
    return (y_B + shift) % num_classes
