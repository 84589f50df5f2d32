"""Attacks over a test set, and what they do to the classifier and to the detector.

For each attack (one method at one eps) on the first ``n`` test images:

  accuracy                 adversarial images classified as their label (over all n)
  success_rate             of the images the model got right, the share the attack fooled
                           (untargeted: any other class; targeted: the target class)
  max_linf                 the largest pixel change made (never above eps)
and, for a model with a decoder (detector.py):
  detection_rate           of the successful adversarial images, the share whose
                           reconstruction distance is above the threshold
  false_positive_rate      of the clean test images, the share above it (about 1 - quantile)
  auroc                    the distance as a score: successful adversarial images (positive)
                           against all clean test images (negative)
  undetected_success_rate  of the images the model got right, the share the attack fooled
                           without being flagged: what the detector leaves the attacker
  cycle_detection_rate / cycle_false_positive_rate
                           the same for Qin et al.'s cycle-consistency check (no threshold)

Shape legend: B batch, C channels, H/W image, J classes, N pixels, A attacks.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from capsctl.adversarial.attacks import Attack, frozen, perturb, random_targets
from capsctl.adversarial.detector import Detector, auroc, examine, roc_points
from capsctl.device import autocast


def _rate(mask: torch.Tensor, of: torch.Tensor) -> float | None:
    """The share of ``of`` where ``mask`` holds; None when ``of`` is empty."""
    total = int(of.sum())
    return None if total == 0 else int((mask & of).sum()) / total


class _Collected:
    """What the batches leave behind: labels, clean and per-attack predictions, distances,
    cycle flags, targets, the largest change (on the device while collecting, on the CPU after
    ``cat``: one copy at the end, no host sync per batch); and ``examples``, the first
    batch's first ``keep`` images for the picture: {"y", "clean", "adv": one per attack},
    each view {"x", "pred", "recon" or None}."""

    def __init__(self, n_attacks: int, keep: int):
        self.keep = keep
        self.parts: dict[str, list] = {"y": [], "pred": [], "dist": [], "cycle": []}
        self.adv: list[dict[str, list]] = [{"pred": [], "dist": [], "cycle": [], "target": [],
                                            "linf": []} for _ in range(n_attacks)]
        self.examples: dict | None = None

    def view(self, r: dict, x_BCHW: torch.Tensor) -> dict:
        """The first ``keep`` images of a batch as the model saw them, on the CPU."""
        x = x_BCHW[:self.keep]
        return {"x": x.float().cpu(), "pred": r["pred"][:self.keep].cpu(),
                "recon": r["recon"][:self.keep].view_as(x).cpu() if "recon" in r else None}

    def cat(self) -> None:
        def join(d):
            return {k: torch.cat(v).cpu() if v else None for k, v in d.items()}
        self.parts = join(self.parts)
        self.adv = [join(a) for a in self.adv]


def _clean(model, x_BCHW, precision: str, decoder: bool) -> dict:
    if decoder:
        return examine(model, x_BCHW, precision)
    with torch.no_grad(), autocast(x_BCHW.device, precision):
        scores_BJ = model(x_BCHW)["scores"].float()
    return {"scores": scores_BJ, "pred": scores_BJ.argmax(1)}


def collect(model, class_loss, source, attacks: list[Attack], batch_size: int, device,
            precision: str, limit: int | None, seed: int = 0, keep: int = 8,
            progress=None) -> _Collected:
    """Run every attack on the source's first ``limit`` images, batch by batch."""
    decoder = bool(model.has_decoder)
    g = torch.Generator(device=device).manual_seed(seed)
    c = _Collected(len(attacks), keep)
    n = 0
    with frozen(model):
        for batch in source.batches(batch_size, limit):
            x_BCHW, y_B = batch["x"].float(), batch["y"]
            clean = _clean(model, x_BCHW, precision, decoder)
            c.parts["y"].append(y_B)
            c.parts["pred"].append(clean["pred"])
            if decoder:
                c.parts["dist"].append(clean["distance"])
                c.parts["cycle"].append(clean["cycle"])
            views = []
            for a, attack in enumerate(attacks):
                target_B = random_targets(y_B, clean["scores"].shape[1], g) \
                    if attack.targeted else None
                x_adv = perturb(model, class_loss, x_BCHW, y_B, attack, precision, target_B, g)
                r = _clean(model, x_adv, precision, decoder)
                got = c.adv[a]
                got["pred"].append(r["pred"])
                got["linf"].append((x_adv - x_BCHW).abs().flatten(1).amax(1))
                if target_B is not None:
                    got["target"].append(target_B)
                if decoder:
                    got["dist"].append(r["distance"])
                    got["cycle"].append(r["cycle"])
                if c.examples is None:
                    views.append(c.view(r, x_adv))
            if c.examples is None:
                c.examples = {"y": y_B[:keep].cpu(), "clean": c.view(clean, x_BCHW),
                              "adv": views}
            n += len(y_B)
            if progress is not None:
                progress(n)
    c.cat()
    return c


def summarise(c: _Collected, attacks: list[Attack], detector: Detector | None,
              roc: bool = False) -> list[dict]:
    """One row per attack (the module docstring's numbers); with ``roc`` each row also has
    "roc": its (false-positive rate, detection rate) points."""
    y_n, pred_n = c.parts["y"], c.parts["pred"]
    right_n = pred_n == y_n
    rows = []
    for attack, got in zip(attacks, c.adv):
        adv_n = got["pred"]
        fooled_n = (adv_n == got["target"]) if attack.targeted else (adv_n != y_n)
        success_n = right_n & fooled_n
        row = {**asdict(attack), "label": attack.label, "step_size": attack.alpha,
               "n": len(y_n), "clean_accuracy": float(right_n.double().mean()),
               "accuracy": float((adv_n == y_n).double().mean()),
               "success_rate": _rate(fooled_n, right_n), "successes": int(success_n.sum()),
               "max_linf": float(got["linf"].max())}
        if got["dist"] is not None and detector is not None:
            flagged_n = got["dist"] > detector.threshold
            clean_flag_n = c.parts["dist"] > detector.threshold
            everyone = torch.ones_like(right_n)
            row.update({
                "detection_rate": _rate(flagged_n, success_n),
                "false_positive_rate": _rate(clean_flag_n, everyone),
                "auroc": auroc(c.parts["dist"], got["dist"][success_n]),
                "undetected_success_rate": _rate(success_n & ~flagged_n, right_n),
                "cycle_detection_rate": _rate(got["cycle"], success_n),
                "cycle_false_positive_rate": _rate(c.parts["cycle"], everyone)})
            if roc:
                row["roc"] = roc_points(c.parts["dist"], got["dist"][success_n])
        rows.append(row)
    return rows
