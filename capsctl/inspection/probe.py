"""Running a model through its declared contract (capsctl/models/contract.py) to get what the
pictures show: reconstructions, perturbed class capsules, routing maps, confident examples.

What is read from a model, and nothing else:
  model.capsule_key     "v" (vector capsules), "pose" (matrix capsules) or None: the output key
                        of the class capsules (B, J, D)
  model.has_decoder     whether model.decode(capsules_BJD, classes_B) -> recon (B, N) exists
  model.routing_layout  (T, H, W) of the routed children, or None when the model does not route;
                        forward(x, keep_routing=True)["routing"] is then a list of (B, I, J)
  model.votes(x)        the routed children's predictions u_hat (B, I, J, D); vector capsules
  forward(x)["scores"]  (B, J) always

Shape legend (suffixes on tensor names):
  B batch   C image channels   H, W image (or routed grid) side   N pixels (C*H*W)
  I child capsules   J parent (class) capsules   D class capsule dimension
  T capsule types   R routing passes   K perturbation offsets (or labels per example)
"""

from __future__ import annotations

import math

import torch

from capsctl.errors import CapsctlError
from capsctl.models.contract import CanDecode, CapsctlModel, ModelOutput

MAX_OFFSETS = 101   # perturbation columns


def require_decoder(model: CapsctlModel, what: str) -> None:
    """Raise a one-line CapsctlError unless the model declares a decoder."""
    if not model.has_decoder:
        raise CapsctlError(f"{what} needs a model with a reconstruction decoder; this "
                           f"{type(model).__name__} has none (trained with model.decoder: "
                           "false, or not a capsule model)")


def capsules(model: CapsctlModel, out: ModelOutput) -> torch.Tensor:
    """The class capsules (B, J, D) the decoder reads: ``out[model.capsule_key]`` (CapsNet's
    vectors ``v`` or a matrix capsule model's flattened poses ``pose``), as float."""
    if model.capsule_key is None:
        raise CapsctlError(f"this {type(model).__name__} has no class capsules")
    return out[model.capsule_key].float()


def decode(model: CanDecode, caps_BJD: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
    """The decoder's reconstruction (B, N) from the capsule of ``classes_B`` alone (the others
    masked to zero), as in training."""
    return model.decode(caps_BJD, classes_B).float()


def decode_each(model: CanDecode, caps_BJD: torch.Tensor,
                classes_BK: torch.Tensor) -> torch.Tensor:
    """One reconstruction per listed class, each from its capsule alone: (B, K, N)."""
    B, K = classes_BK.shape
    caps_bJD = caps_BJD.unsqueeze(1).expand(B, K, *caps_BJD.shape[1:]).reshape(
        B * K, *caps_BJD.shape[1:])
    return decode(model, caps_bJD, classes_BK.reshape(-1)).view(B, K, -1)


@torch.no_grad()
def reconstruct_batch(model: CapsctlModel, x_BCHW: torch.Tensor, y_B: torch.Tensor,
                      mask: str = "predicted"):
    """(recon (B, C, H, W), prediction (B,), scores (B, J)); the decoder sees only the capsule of
    the prediction (``mask="predicted"``) or of the label (``"label"``)."""
    require_decoder(model, "reconstruction")
    out = model(x_BCHW)
    scores_BJ = out["scores"].float()
    pred_B = scores_BJ.argmax(1)
    classes_B = y_B if mask == "label" else pred_B
    recon_BN = decode(model, capsules(model, out), classes_B)
    return recon_BN.view_as(x_BCHW), pred_B, scores_BJ


@torch.no_grad()
def segmentation_recons(model: CapsctlModel, x_BCHW: torch.Tensor, y_B2: torch.Tensor):
    """For two-digit inputs with labels ``y_B2`` (B, 2): (prediction (B, 2) = the two longest
    capsules, recon from them (B, 2, N), recon from the labels (B, 2, N))."""
    require_decoder(model, "the segmentation picture")
    out = model(x_BCHW)
    pred_B2 = out["scores"].float().topk(2, dim=1).indices
    caps_BJD = capsules(model, out)
    return pred_B2, decode_each(model, caps_BJD, pred_B2), decode_each(model, caps_BJD, y_B2)


# --- perturbations (Figure 4) -------------------------------------------------------------------

def offsets_for(range_: float, step: float) -> torch.Tensor:
    """-range .. +range in steps of ``step``, with an exact 0 in the middle: (K,), K at most
    MAX_OFFSETS; a one-line CapsctlError for anything else."""
    if not (math.isfinite(step) and math.isfinite(range_)):
        raise CapsctlError(f"--range {range_} and --step {step} must be finite numbers")
    if not (step > 0 and range_ > 0):
        raise CapsctlError(f"--range {range_} and --step {step} must both be > 0")
    ratio = range_ / step
    if not math.isfinite(ratio) or 2 * ratio + 1 > MAX_OFFSETS + 0.5:
        raise CapsctlError(f"--range/--step gives {2 * ratio + 1:.3g} columns; at most "
                           f"{MAX_OFFSETS}")
    k = round(ratio)
    if k < 1 or abs(k * step - range_) > 1e-6 * max(1.0, range_):
        raise CapsctlError(f"--range {range_} must be a whole multiple of --step {step} "
                           "(e.g. --range 0.25 --step 0.05)")
    return torch.arange(-k, k + 1, dtype=torch.float32) * step


@torch.no_grad()
def perturbations(model: CanDecode, v_JD: torch.Tensor, cls: int,
                  offsets_K: torch.Tensor) -> torch.Tensor:
    """Decode capsule ``cls`` of one example with offsets added to one dimension at a time (the
    other capsules masked): recon (D, K, N). Column ``K // 2`` (offset 0) is the plain
    reconstruction."""
    require_decoder(model, "perturb")
    J, D = v_JD.shape
    K = offsets_K.numel()
    eye_DD = torch.eye(D, device=v_JD.device, dtype=v_JD.dtype)
    delta_DKD = offsets_K.to(v_JD.device, v_JD.dtype).view(1, K, 1) * eye_DD.view(D, 1, D)
    v_DKJD = v_JD.expand(D, K, J, D).clone()
    v_DKJD[:, :, cls] += delta_DKD
    classes = torch.full((D * K,), cls, dtype=torch.long, device=v_JD.device)
    recon = decode(model, v_DKJD.reshape(D * K, J, D), classes)
    return recon.float().view(D, K, -1)


def dimension_change(recon_DKN: torch.Tensor) -> torch.Tensor:
    """Per dimension, the mean absolute pixel change from the unperturbed reconstruction over the
    non-zero offsets: (D,)."""
    D, K, _ = recon_DKN.shape
    diff_DKN = (recon_DKN - recon_DKN[:, K // 2:K // 2 + 1]).abs()
    return diff_DKN.mean(-1).sum(1) / max(K - 1, 1)


# --- routing ------------------------------------------------------------------------------------

def require_routing(model: CapsctlModel) -> tuple[int, int, int]:
    """The model's routing layout (T, H, W); a one-line CapsctlError when it does not route."""
    layout = model.routing_layout
    if layout is None:
        raise CapsctlError(f"routes needs a capsule model with routing between capsule layers; "
                           f"this {type(model).__name__} has none (e.g. a CNN baseline)")
    return tuple(int(n) for n in layout)


def _votes(model: CapsctlModel, x_BCHW: torch.Tensor) -> torch.Tensor | None:
    """u_hat_j|i (B, I, J, D) for vector capsules routed by agreement; None for other models."""
    if model.capsule_key != "v":
        return None
    return model.votes(x_BCHW).float()


@torch.no_grad()
def routing_maps(model: CapsctlModel, x_BCHW: torch.Tensor) -> dict:
    """Coupling coefficients of every routing pass and the agreement of the predictions.

    Returns ``coupling`` (B, R, I, J), ``coupling_grid`` (B, R, J, H, W) (the mean over the T
    capsule types at each grid position; sums to one over J like c itself), ``scores`` (B, J),
    ``layout`` (T, H, W), ``score_name`` ("|v|" or "a"), and, for vector capsules (whose votes
    the model gives), ``agreement`` (B, I, J) = u_hat_j|i . v_j with the final v and
    ``agreement_grid`` (B, J, H, W) summed over types. Child i is type i // (H W) at row
    (i // W) % H, column i % W (``model.routing_layout`` = (T, H, W)).
    """
    T, H, W = require_routing(model)
    out = model(x_BCHW, keep_routing=True)
    passes = out.get("routing") or []
    if not passes:
        raise CapsctlError(f"routes: this {type(model).__name__} returned no coupling "
                           "coefficients (no routing between capsule layers)")
    c_BRIJ = torch.stack([c.float() for c in passes], 1)
    B, R, I, J = c_BRIJ.shape
    if I != T * H * W:
        raise CapsctlError(f"routes: the model routes {I} children but its layout {T}x{H}x{W} "
                           f"describes {T * H * W}")
    grid = c_BRIJ.view(B, R, T, H, W, J).mean(2).permute(0, 1, 4, 2, 3)
    result = {"coupling": c_BRIJ, "coupling_grid": grid, "scores": out["scores"].float(),
              "layout": (T, H, W), "score_name": "|v|" if model.capsule_key == "v" else "a"}
    u_hat_BIJD = _votes(model, x_BCHW)
    if u_hat_BIJD is not None:
        a_BIJ = torch.einsum("bijd,bjd->bij", u_hat_BIJD, capsules(model, out))
        result["agreement"] = a_BIJ
        result["agreement_grid"] = a_BIJ.view(B, T, H, W, J).sum(1).permute(0, 3, 1, 2)
    return result


@torch.no_grad()
def routing_statistics(model: CapsctlModel, source, n: int, device, batch: int = 100) -> dict:
    """How far the routing coefficients are from uniform, over the first ``n`` examples of
    ``source``. For every routing pass, the means over examples of: ``to_predicted``, the mean
    over the children of c_ij to the predicted parent (uniform: 1/J); ``largest_to_predicted``,
    the largest such c_ij of one child; ``entropy``, the entropy of each child's coefficients
    (normalised to sum to one over the parents) over log J, averaged over the children (1 =
    uniform, 0 = every child to one parent); ``decided``, the share of children that send more
    than half to one parent. Returns those as lists over the passes, plus ``examples``,
    ``children``, ``parents``."""
    require_routing(model)
    totals_R4, seen = None, 0
    for start in range(0, n, batch):
        idx_B = torch.arange(start, min(start + batch, n), device=device)
        out = model(source.get(idx_B)["x"], keep_routing=True)
        c_BRIJ = torch.stack([c.float() for c in out.get("routing") or []], 1)
        B, R, I, J = c_BRIJ.shape
        pred_BRI1 = out["scores"].argmax(1).view(B, 1, 1, 1).expand(B, R, I, 1)
        to_pred_BRI = c_BRIJ.gather(3, pred_BRI1).squeeze(3)
        p_BRIJ = c_BRIJ / c_BRIJ.sum(3, keepdim=True).clamp_min(1e-30)
        entropy_BRI = -(p_BRIJ * p_BRIJ.clamp_min(1e-30).log()).sum(3) / math.log(J)
        stats_BR4 = torch.stack([to_pred_BRI.mean(2), to_pred_BRI.amax(2), entropy_BRI.mean(2),
                                 (c_BRIJ.amax(3) > 0.5).float().mean(2)], 2)
        totals_R4 = stats_BR4.sum(0) if totals_R4 is None else totals_R4 + stats_BR4.sum(0)
        seen += B
    mean_4R = (totals_R4 / seen).T.cpu().tolist()
    return {"examples": seen, "children": I, "parents": J, "to_predicted": mean_4R[0],
            "largest_to_predicted": mean_4R[1], "entropy": mean_4R[2], "decided": mean_4R[3]}


# --- choosing examples --------------------------------------------------------------------------

@torch.no_grad()
def confident_examples(model: CapsctlModel, source, classes: list[int], device, pool: int = 1000,
                       batch_size: int = 250) -> dict[int, int]:
    """For each class, the index (among the first ``pool`` examples) of the correctly classified
    example with the longest capsule of that class (or, if none is correct, the longest)."""
    n = min(pool, len(source))
    scores, labels = [], []
    for start in range(0, n, batch_size):
        batch = source.get(torch.arange(start, min(start + batch_size, n), device=device))
        scores.append(model(batch["x"])["scores"].float())
        labels.append(batch["y"])
    scores_BJ, y_B = torch.cat(scores), torch.cat(labels)
    right_B = scores_BJ.argmax(1) == y_B
    picks = {}
    for k in classes:
        of_k = y_B == k
        if not bool(of_k.any()):
            raise CapsctlError(f"no example of class {k} among the first {n} of the split; "
                               "choose one with --index")
        eligible = of_k & right_B if bool((of_k & right_B).any()) else of_k
        picks[k] = int(torch.where(eligible, scores_BJ[:, k], -1.0).argmax())
    return picks
