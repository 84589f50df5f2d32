"""Detection by reconstruction (Frosst, Sabour & Hinton 2018, "DARCCC"; Qin et al., ICLR 2020).

A model with a decoder reconstructs its input from the winning class alone (the contract's
``recon`` when no label is given: the predicted class's capsule, or the CNN's hidden layer in
that class's block). Two checks come from it:

  distance  the L2 distance ||x - recon||_2 over the pixels (DARCCC; Qin et al.'s "global
            threshold detector"): an input is flagged when it is above a threshold set on
            clean validation images, by default their 95th percentile (5% false positives).
  cycle     Qin et al.'s cycle-consistency check: the model's prediction for its own
            reconstruction differs from its prediction for the input. No threshold.

The threshold is kept in the checkpoint under ``DETECTOR_KEY`` (a plain dict, ``Detector``):
the trainer stores it in best.pt after the test; ``capsctl calibrate`` computes it for older
checkpoints.

Shape legend: B batch, C channels, H/W image, J classes, N pixels (C*H*W).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from capsctl.adversarial import DEFAULT_QUANTILE
from capsctl.device import autocast
from capsctl.errors import CapsctlError

DETECTOR_KEY = "detector"     # the checkpoint's key
MIN_IMAGES = 20               # fewer clean images set no threshold


@dataclass(frozen=True)
class Detector:
    """The stored detector: the ``threshold`` on the L2 reconstruction distance, the
    ``quantile`` of the clean distances it is, how many images (``n``) of which ``dataset`` and
    ``split`` set it, and the ``precision`` the model ran in."""

    threshold: float
    quantile: float
    n: int
    dataset: str
    split: str
    precision: str
    distance: str = "l2"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, state: dict) -> "Detector | None":
        """The detector stored in a checkpoint's ``state``, or None."""
        d = state.get(DETECTOR_KEY)
        if not isinstance(d, dict):
            return None
        try:
            return cls(**d)
        except TypeError:
            return None


def require_reconstruction(model, what: str) -> None:
    """One line unless the model declares a decoder (the detector needs one)."""
    if not model.has_decoder:
        raise CapsctlError(f"{what} needs a model with a reconstruction decoder; this "
                           f"{type(model).__name__} has none (train it with model.decoder: "
                           "true)")


def l2_distance(x_BCHW: torch.Tensor, recon_BN: torch.Tensor) -> torch.Tensor:
    """||x - recon||_2 per example over the pixels: (B,) fp32."""
    return (x_BCHW.flatten(1).float() - recon_BN.float()).norm(dim=1)


@torch.no_grad()
def examine(model, x_BCHW: torch.Tensor, precision: str, cycle: bool = True) -> dict:
    """The model on a batch: {"scores" (B, J), "pred" (B,), "recon" (B, N), "distance" (B,)}
    and with ``cycle`` "cycle" (B,) bool: the prediction for the reconstruction differs."""
    with autocast(x_BCHW.device, precision):
        out = model(x_BCHW)
    scores_BJ = out["scores"].float()
    r = {"scores": scores_BJ, "pred": scores_BJ.argmax(1), "recon": out["recon"].float(),
         "distance": l2_distance(x_BCHW, out["recon"])}
    if cycle:
        with autocast(x_BCHW.device, precision):
            again_BJ = model(r["recon"].view_as(x_BCHW).to(x_BCHW.dtype))["scores"]
        r["cycle"] = again_BJ.float().argmax(1) != r["pred"]
    return r


@torch.no_grad()
def distances(model, source, batch_size: int, device, precision: str,
              limit: int | None = None) -> torch.Tensor:
    """The L2 reconstruction distances of a source's images (first ``limit``), (n,) on the
    CPU."""
    was = model.training
    model.eval()
    try:
        parts = [examine(model, batch["x"], precision, cycle=False)["distance"].cpu()
                 for batch in source.batches(batch_size, limit)]
    finally:
        model.train(was)
    return torch.cat(parts) if parts else torch.zeros(0)


def calibrate(model, source, dataset: str, split: str, batch_size: int, device,
              precision: str, quantile: float = DEFAULT_QUANTILE,
              limit: int | None = None) -> Detector:
    """The threshold: the ``quantile`` of the clean distances of ``source`` (its ``split``)."""
    if not 0.0 < quantile < 1.0:
        raise CapsctlError(f"--quantile {quantile}: expected a number between 0 and 1 "
                           "(0.95: 5% of clean images flagged)")
    require_reconstruction(model, "the reconstruction detector")
    d_n = distances(model, source, batch_size, device, precision, limit)
    if len(d_n) < MIN_IMAGES:
        raise CapsctlError(f"the {split} split of {dataset} has {len(d_n)} images; the "
                           f"detector's threshold needs at least {MIN_IMAGES} clean images")
    threshold = float(torch.quantile(d_n.double(), quantile))
    return Detector(threshold, quantile, len(d_n), dataset, split, precision)


def calibrate_into(path, model, val, dataset: str, batch_size: int, device,
                   precision: str) -> dict | None:
    """``calibrate`` on the validation source ``val`` and keep the detector in the checkpoint
    at ``path`` (``checkpoint.add_entry``): what the trainer does to best.pt and `pretrained
    export` to model.pt. None, and nothing written, when ``val`` has fewer than MIN_IMAGES
    images."""
    from capsctl import checkpoint

    if len(val) < MIN_IMAGES:
        return None
    found = calibrate(model, val, dataset, "val", batch_size, device, precision).as_dict()
    checkpoint.add_entry(path, DETECTOR_KEY, found)
    return found


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float | None:
    """Area under the ROC curve of a score that should be higher for ``positives``: the chance
    that a random positive scores above a random negative, ties counting one half
    (Mann-Whitney U). None when either side is empty."""
    n0, n1 = len(negatives), len(positives)
    if n0 == 0 or n1 == 0:
        return None
    both = torch.cat([negatives.double().cpu(), positives.double().cpu()])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=torch.float64)
    values, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]          # tied values share their mean rank
    u = ranks[n0:].sum() - n1 * (n1 + 1) / 2
    return float(u / (n0 * n1))


def roc_points(negatives: torch.Tensor, positives: torch.Tensor,
               most: int = 200) -> list[tuple[float, float]]:
    """(false-positive rate, true-positive rate) at up to ``most`` thresholds, from (0, 0) to
    (1, 1): what the ROC picture draws."""
    both = torch.cat([negatives, positives]).double().cpu()
    qs = torch.linspace(0, 1, most, dtype=torch.float64)
    cuts = torch.quantile(both, qs) if len(both) else torch.zeros(0)
    points = [(1.0, 1.0)]
    for c in cuts.tolist():
        points.append((float((negatives > c).double().mean()),
                       float((positives > c).double().mean())))
    points.append((0.0, 0.0))
    return sorted(set(points))
