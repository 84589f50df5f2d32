"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018), ``model.name: em-capsnet``.

ReLU Conv1 (A, 5x5, stride 2) -> PrimaryCaps (B types: 4x4 pose = 1x1 conv, activation =
sigmoid of a 1x1 conv) -> ConvCaps1 (C types, K=3, stride 2) -> ConvCaps2 (D types, K=3,
stride 1) -> class capsules (one per class; transformation matrices shared across positions,
coordinate addition). No padding anywhere: 28x28 -> 12 -> 12 -> 5 -> 3; 32x32 -> 14 -> 14 -> 6 -> 4.

forward(x, y=None, keep_routing=False) returns a dict:
  scores   (B, classes)      class capsule activations (what the spread loss and argmax use)
  pose     (B, classes, 16)  class capsule poses (4x4 flattened row-major)
  recon    (B, C*H*W)        reconstruction from the pose of class ``y`` (training) or of the
                             prediction (evaluation), when ``model.decoder`` is true
  routing  list per iteration of the class layer's R, (B, I, classes), the I children being the
           ConvCaps2 capsules ordered (type, row, col): see ``routing_layout``

Shape legend: B batch, X/Y grid rows/columns, T capsule types, J parent types (classes in the
last layer), K kernel offsets, I children of a routing group, N routing groups, H 16 pose
components, 4x4 a pose matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsctl.models.conv import Conv2d
from capsctl.models.em_config import EMCapsNetConfig, SpreadLossConfig
from capsctl.models.capsnet import Decoder, masked_decode
from capsctl.models.routing.em import EMRouting, PatchSoftmax
from capsctl.models.losses import reconstruction_sse

CONV1_K, CONV1_S = 5, 2
CAPS_K = 3
STRIDES = {"caps1": 2, "caps2": 1}


def grid_sizes(side: int) -> list[int]:
    """Grid side after Conv1 (= PrimaryCaps), ConvCaps1 and ConvCaps2 for a ``side`` input."""
    g1 = (side - CONV1_K) // CONV1_S + 1
    g2 = (g1 - CAPS_K) // STRIDES["caps1"] + 1
    g3 = (g2 - CAPS_K) // STRIDES["caps2"] + 1
    return [g1, g2, g3]


def receptive_centres(n: int) -> torch.Tensor:
    """Input-pixel coordinate (pixel centres at +0.5) of the receptive-field centre of each of
    the ``n`` ConvCaps2 rows (or columns): composed through ConvCaps2, ConvCaps1 and Conv1."""
    pos = torch.arange(n, dtype=torch.float32)
    for k, s in ((CAPS_K, STRIDES["caps2"]), (CAPS_K, STRIDES["caps1"]), (CONV1_K, CONV1_S)):
        pos = pos * s + (k - 1) / 2
    return pos + 0.5


def coordinate_offsets(rows: int, cols: int, scale: float) -> torch.Tensor:
    """(X, Y, 4, 4) zeros except [.., 0, 3] = scaled row and [.., 1, 3] = scaled column of each
    position's receptive-field centre: added to the votes of the class capsules."""
    off_XY44 = torch.zeros(rows, cols, 4, 4)
    off_XY44[:, :, 0, 3] = (receptive_centres(rows) * scale)[:, None]
    off_XY44[:, :, 1, 3] = (receptive_centres(cols) * scale)[None, :]
    return off_XY44


def patch_child_index(rows: int, cols: int, k: int, stride: int) -> torch.Tensor:
    """(P, K) grid cell (row * cols + col) of each kernel offset of each output position."""
    out_r, out_c = (rows - k) // stride + 1, (cols - k) // stride + 1
    r_P = (torch.arange(out_r) * stride).repeat_interleave(out_c)
    c_P = (torch.arange(out_c) * stride).repeat(out_r)
    kr_K = torch.arange(k).repeat_interleave(k)
    kc_K = torch.arange(k).repeat(k)
    return (r_P[:, None] + kr_K[None, :]) * cols + (c_P[:, None] + kc_K[None, :])


class PrimaryMatrixCaps(nn.Module):
    """B capsule types per position: pose = 1x1 conv (16 per type), activation = sigmoid(1x1)."""

    def __init__(self, in_channels: int, types: int):
        super().__init__()
        self.types = types
        self.pose = Conv2d(in_channels, types * 16, 1)
        self.act = Conv2d(in_channels, types, 1)

    def forward(self, h):
        B, _, X, Y = h.shape
        pose_BXYTH = self.pose(h).view(B, self.types, 16, X, Y).permute(0, 3, 4, 1, 2)
        a_BXYT = torch.sigmoid(self.act(h)).permute(0, 2, 3, 1)
        return pose_BXYTH, a_BXYT


def _init_transforms(shape, std: float) -> nn.Parameter:
    """Identity plus normal noise of ``std``: votes start as noisy copies of the child pose."""
    w = torch.eye(4).expand(*shape, 4, 4) + std * torch.randn(*shape, 4, 4)
    return nn.Parameter(w.contiguous())


class ConvCaps(nn.Module):
    """Convolutional capsule layer: one 4x4 W per (kernel offset, child type, parent type),
    shared across positions; EM routing in every k x k patch, a child's R normalised over all
    the patches it appears in."""

    def __init__(self, in_types: int, out_types: int, k: int, stride: int, m: EMCapsNetConfig):
        super().__init__()
        self.k, self.stride, self.in_types, self.out_types = k, stride, in_types, out_types
        self.W_KTJ44 = _init_transforms((k * k, in_types, out_types), m.init_std)
        self.routing = EMRouting(out_types, m.iterations, m.inverse_temperature,
                                 m.inverse_temperature_rate, m.var_floor)
        self._index_cache: dict = {}

    def _child_index(self, rows: int, cols: int, device) -> torch.Tensor:
        key = (rows, cols, str(device))
        if key not in self._index_cache:
            self._index_cache[key] = patch_child_index(rows, cols, self.k, self.stride).to(device)
        return self._index_cache[key]

    def forward(self, pose_BXYTH, a_BXYT):
        B, X, Y, T, _ = pose_BXYTH.shape
        k, s, J = self.k, self.stride, self.out_types
        # patches: (B, X', Y', T, 16, k, k) -> (B*X'*Y', k*k*T, 4, 4)
        pp = pose_BXYTH.unfold(1, k, s).unfold(2, k, s)
        Xo, Yo = pp.shape[1], pp.shape[2]
        M_NI44 = pp.permute(0, 1, 2, 5, 6, 3, 4).reshape(B * Xo * Yo, k * k * T, 4, 4)
        a_NI = a_BXYT.unfold(1, k, s).unfold(2, k, s).permute(0, 1, 2, 4, 5, 3) \
            .reshape(B * Xo * Yo, k * k * T)
        W_IJ44 = self.W_KTJ44.reshape(k * k * T, J, 4, 4)
        V_NJIH = torch.einsum("nipq,ijqr->njipr", M_NI44, W_IJ44).reshape(
            B * Xo * Yo, J, k * k * T, 16)
        norm = PatchSoftmax(B, self._child_index(X, Y, pose_BXYTH.device), X * Y, T)
        mu_NJH, a_NJ, _ = self.routing(a_NI, V_NJIH, norm)
        return mu_NJH.view(B, Xo, Yo, J, 16), a_NJ.view(B, Xo, Yo, J)


class ClassCaps(nn.Module):
    """Fully connected capsules, one per class: one W per (child type, class) shared across
    positions, plus coordinate addition; EM routing over all B*X*Y*T children."""

    def __init__(self, in_types: int, classes: int, m: EMCapsNetConfig):
        super().__init__()
        self.W_TJ44 = _init_transforms((in_types, classes), m.init_std)
        self.routing = EMRouting(classes, m.iterations, m.inverse_temperature,
                                 m.inverse_temperature_rate, m.var_floor)
        self.coord_add = m.coordinate_addition
        self.scale = 1.0 / m.input_size   # coordinates in input sizes of the configured model
        self._offset_cache: dict = {}

    def offsets(self, rows: int, cols: int, device) -> torch.Tensor:
        key = (rows, cols, str(device))
        if key not in self._offset_cache:
            self._offset_cache[key] = coordinate_offsets(rows, cols, self.scale).to(device)
        return self._offset_cache[key]

    def votes(self, pose_BXYTH: torch.Tensor) -> torch.Tensor:
        """(B, J, T*X*Y, 16) votes, children ordered (type, row, col)."""
        B, X, Y, T, _ = pose_BXYTH.shape
        M_BTXY44 = pose_BXYTH.permute(0, 3, 1, 2, 4).reshape(B, T, X, Y, 4, 4)
        V_BJTXY44 = torch.einsum("btxypq,tjqr->bjtxypr", M_BTXY44, self.W_TJ44)
        if self.coord_add:
            off_XY44 = self.offsets(X, Y, pose_BXYTH.device)
            V_BJTXY44 = V_BJTXY44 + off_XY44.to(V_BJTXY44.dtype)
        return V_BJTXY44.reshape(B, -1, T * X * Y, 16)

    def forward(self, pose_BXYTH, a_BXYT, keep_routing: bool = False):
        V_BJIH = self.votes(pose_BXYTH)
        a_BI = a_BXYT.permute(0, 3, 1, 2).reshape(a_BXYT.shape[0], -1)
        return self.routing(a_BI, V_BJIH, keep_routing=keep_routing)


class EMCapsNet(nn.Module):
    """Honours capsctl/models/contract.py: matrix class capsules ``pose``, EM assignments."""

    capsule_key = "pose"
    routing_label = "assignment R"

    def __init__(self, m: EMCapsNetConfig):
        super().__init__()
        self.cfg = m
        A, Bt, C, D = m.conv1_channels, m.primary_types, m.caps1_types, m.caps2_types
        self.conv1 = Conv2d(m.in_channels, A, CONV1_K, CONV1_S)
        self.primary = PrimaryMatrixCaps(A, Bt)
        self.caps1 = ConvCaps(Bt, C, CAPS_K, STRIDES["caps1"], m)
        self.caps2 = ConvCaps(C, D, CAPS_K, STRIDES["caps2"], m)
        self.classes = ClassCaps(D, m.num_classes, m)
        self.decoder = (Decoder(m.num_classes * 16, m.decoder_hidden,
                                m.in_channels * m.input_size ** 2) if m.decoder else None)

    @property
    def routing_layout(self) -> tuple[int, int, int]:
        """(types, rows, cols) of the class layer's children for the configured input size:
        row i of a routing matrix is child (i // (rows*cols), (i // cols) % rows, i % cols)."""
        g = grid_sizes(self.cfg.input_size)[2]
        return (self.cfg.caps2_types, g, g)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def decode(self, pose_BJH: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
        """Reconstruct from the pose of ``classes_B`` alone (the others masked to zero);
        ``classes`` (B, K) decodes each of the K poses on its own: recon (B, K, N)."""
        return masked_decode(self.decoder, pose_BJH, classes_B)

    def encode(self, x: torch.Tensor, keep_routing: bool = False):
        h = F.relu(self.conv1(x))
        pose, a = self.primary(h)
        pose, a = self.caps1(pose, a)
        pose, a = self.caps2(pose, a)
        return self.classes(pose, a, keep_routing)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                keep_routing: bool = False) -> dict:
        pose_BJH, a_BJ, routing = self.encode(x, keep_routing)
        out = {"scores": a_BJ, "pose": pose_BJH}
        if self.decoder is not None:
            out["recon"] = self.decode(pose_BJH, y if y is not None else a_BJ.argmax(dim=1))
        if keep_routing:
            out["routing"] = routing
        return out


# --- spread loss ---------------------------------------------------------------------------

def spread_margin(step: int, start: float, end: float, steps: int) -> float:
    """The margin at optimizer step ``step``: linear from ``start`` to ``end`` over ``steps``."""
    if steps <= 0:
        return end
    return start + (end - start) * min(step / steps, 1.0)


def spread_loss(a_BJ: torch.Tensor, y_B: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-example spread loss sum_{i != t} max(0, m - (a_t - a_i))^2, shape (B,)."""
    a_BJ = a_BJ.float()
    a_t_B1 = a_BJ.gather(1, y_B.unsqueeze(1))
    gap_BJ = F.relu(margin - (a_t_B1 - a_BJ)).pow(2)
    wrong_BJ = 1.0 - F.one_hot(y_B, a_BJ.shape[1]).to(a_BJ.dtype)
    return (gap_BJ * wrong_BJ).sum(dim=1)


def spread_loss_of(a_BJ: torch.Tensor, y_B: torch.Tensor, lc: SpreadLossConfig) -> torch.Tensor:
    """The spread loss at its final margin (``m_end``), per example (B,): the family's
    ``class_loss`` (registry.ModelSpec)."""
    return spread_loss(a_BJ, y_B, lc.m_end)


def em_losses(out: dict, batch: dict, lc: SpreadLossConfig, step: int = 0
              ) -> dict[str, torch.Tensor]:
    """Spread loss (margin by ``step``) + optional reconstruction term."""
    m = spread_margin(step, lc.m_start, lc.m_end, lc.m_steps)
    losses = {"spread": spread_loss(out["scores"], batch["y"], m).mean()}
    total = losses["spread"]
    if "recon" in out and lc.recon_weight > 0:
        losses["reconstruction"] = lc.recon_weight * reconstruction_sse(
            out["recon"], batch["x"]).mean()
        total = total + losses["reconstruction"]
    losses["total"] = total
    return losses
