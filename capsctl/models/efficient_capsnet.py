"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021), the MNIST model: four convolutions
(32 5x5, 64 3x3, 64 3x3, 128 3x3 stride 2; valid padding, ReLU, batch norm), primary capsules
from a depthwise 9x9 convolution (128 channels -> 16 capsules of 8D on MNIST), the paper's
squash, self-attention routing to 10 class capsules of 16D, and the CapsNet decoder (FC 512,
1024, sigmoid pixels) as the reconstruction regulariser. As the authors' code (EscVM/
Efficient-CapsNet: models/efficient_capsnet_graph_mnist.py, utils/layers.py).

Parameters on MNIST: 161,824 without the decoder (the paper's count: convolutions 130,112,
batch norm scales and shifts 576, depthwise convolution 10,496, W_ij 20,480, log priors b_ij
160; batch norm's running statistics are buffers, not parameters), 1,573,168 with it.

forward(x, y=None, keep_routing=False) returns the CapsNet's dict (capsctl/models/contract.py):
v (B, J, D), scores (B, J) = |v|, recon when there is a decoder, routing [c (B, I, J)] when
kept. Shape legend: B batch, C channels, G primary grid side, T primary types, P their
dimension, I = T*G*G primary capsules, J classes, D class dimension.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from capsctl.models.conv import Conv2d
from capsctl.models.capsnet import Decoder, masked_decode
from capsctl.models.capsules import safe_norm
from capsctl.models.efficient_config import EfficientCapsNetConfig, efficient_grid
from capsctl.models.routing.self_attention import SelfAttentionRouting

SQUASH_EPS = 1e-20  # inside the square root: a zero vector maps to zero with a finite gradient


def efficient_squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """The paper's squash, v = (1 - 1/e^|s|) s/|s|, in fp32 (it saturates more slowly than
    Sabour's |s|^2/(1+|s|^2) near zero)."""
    s32 = s.float() if s.dtype != torch.float64 else s
    n = torch.sqrt((s32 * s32).sum(dim, keepdim=True) + eps)
    return s32 * (-torch.expm1(-n) / n)


def he_normal_(w: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Keras' he_normal: normal truncated at 2 std, std = sqrt(2 / fan_in) after the
    truncation (the authors' initialiser of the convolutions, W_ij and the decoder)."""
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class DepthwisePrimaryCaps(nn.Module):
    """A depthwise convolution (one k x k filter per channel, linear), its channels grouped
    into capsules of ``dim`` (capsule i = type i // (G*G) at grid position i % (G*G); channels
    type*dim ... type*dim + dim - 1), each squashed."""

    def __init__(self, channels: int, kernel: int, dim: int):
        super().__init__()
        self.dim = dim
        self.conv = Conv2d(channels, channels, kernel, groups=channels)

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        a_BCGG = self.conv(h_BCHW)
        B, C, G, _ = a_BCGG.shape
        T = C // self.dim
        u_BIP = a_BCGG.view(B, T, self.dim, G, G).permute(0, 1, 3, 4, 2).reshape(B, -1, self.dim)
        return efficient_squash(u_BIP)


class EfficientCapsNet(nn.Module):
    """Honours capsctl/models/contract.py: vector class capsules ``v``, attention couplings."""

    capsule_key = "v"
    routing_label = "attention c_ij"

    def __init__(self, m: EfficientCapsNetConfig):
        super().__init__()
        self.cfg = m
        layers, width = [], m.in_channels
        for c, k, s in zip(m.conv_channels, m.conv_kernels, m.conv_strides):
            conv = Conv2d(width, c, k, s)
            he_normal_(conv.weight, width * k * k)
            nn.init.zeros_(conv.bias)
            # Keras' BatchNormalization: momentum 0.99 (torch: 0.01), epsilon 1e-3
            layers += [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)]
            width = c
        self.convs = nn.Sequential(*layers)
        self.primary = DepthwisePrimaryCaps(width, m.primary_kernel, m.primary_dim)
        self.grid = efficient_grid(m)
        self.types = width // m.primary_dim
        I, J, P, D = self.types * self.grid ** 2, m.num_classes, m.primary_dim, m.class_dim
        self.digits = SelfAttentionRouting(I, J, P, D, 1.0, efficient_squash)
        he_normal_(self.digits.W_IJDP.data, J * I * P)  # Keras' fan-in of W [J, I, P, D]
        self.decoder = (Decoder(J * D, m.decoder_hidden, m.in_channels * m.input_size ** 2)
                        if m.decoder else None)
        if self.decoder is not None:
            self._init_decoder()

    def _init_decoder(self) -> None:
        """He normal on the hidden layers, Glorot normal on the output, zero biases (Keras)."""
        linears = [mod for mod in self.decoder.net if isinstance(mod, nn.Linear)]
        for lin in linears[:-1]:
            he_normal_(lin.weight.data, lin.in_features)
        out = linears[-1]
        std = math.sqrt(2.0 / (out.in_features + out.out_features)) / 0.87962566103423978
        nn.init.trunc_normal_(out.weight, std=std, a=-2 * std, b=2 * std)
        for lin in linears:
            nn.init.zeros_(lin.bias)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @property
    def routing_layout(self) -> tuple[int, int, int]:
        """(types, H, W) of the routed primary capsules (MNIST: 16 x 1 x 1)."""
        return self.types, self.grid, self.grid

    def _primary(self, x: torch.Tensor) -> torch.Tensor:
        return self.primary(self.convs(x))

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        """The primary capsules' votes u_hat_j|i (B, I, J, D), for ``capsctl routes``."""
        return self.digits.predictions(self._primary(x))

    def decode(self, v_BJD: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, N) from the capsule of ``classes_B`` alone; (B, K) classes give
        (B, K, N)."""
        return masked_decode(self.decoder, v_BJD, classes_B)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                keep_routing: bool = False) -> dict:
        v_BJD, couplings = self.digits(self._primary(x), keep_routing)
        scores_BJ = safe_norm(v_BJD)
        out = {"v": v_BJD, "scores": scores_BJ}
        if self.decoder is not None:
            out["recon"] = self.decode(v_BJD, y if y is not None else scores_BJ.argmax(dim=1))
        if keep_routing:
            out["routing"] = couplings
        return out
