"""The ``capsnet`` family's config (Sabour et al. 2017), beside ``capsnet.py``; and the margin
loss's, beside ``losses.py``. Torch-free: ``capsctl config`` reads it without loading torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from capsctl.errors import ConfigError
from capsctl.fields import field
from capsctl.models import routing


@dataclass
class ImageInput:
    """What every family takes: the image and the classes (they must match the dataset)."""

    name: str = field("", "model family")
    input_size: int | None = field(None, "side of the square input image in pixels; null = the "
                                   "dataset's (a different value is an error)", min=8, max=4096)
    in_channels: int | None = field(None, "input channels; null = the dataset's", min=1, max=64)
    num_classes: int | None = field(None, "number of classes (class capsules); null = the "
                                    "dataset's", min=2, max=100000)


@dataclass
class CapsNetConfig(ImageInput):
    name: str = field("capsnet", "model family: capsnet (Sabour et al. 2017; model.routing picks "
                      "the routed layer's algorithm)")
    conv1_channels: int = field(256, "Conv1 output channels", min=1, max=65536)
    conv1_kernel: int = field(9, "Conv1 kernel size (stride 1, no padding, ReLU)", min=1)
    primary_types: int = field(32, "PrimaryCaps capsule types (channels = types x dim)", min=1,
                               max=65536)
    primary_dim: int = field(8, "PrimaryCaps capsule dimension", min=1, max=1024)
    primary_kernel: int = field(9, "PrimaryCaps kernel size", min=1)
    primary_stride: int = field(2, "PrimaryCaps stride", min=1)
    class_dim: int = field(16, "DigitCaps (class capsule) dimension", min=1, max=1024)
    routing: Any = dataclasses.field(default_factory=routing.DynamicConfig, metadata={
        "help": "the routed layer's algorithm and its options (docs/routing.md): a mapping with "
                "name (" + ", ".join(routing.ROUTINGS) + ") and that routing's keys (tables "
                "below), or the name alone",
        "nested": routing.set_routing, "variants": routing.reference_tables})
    transform_init_std: float = field(0.01, "std of the normal init of the W_ij matrices", gt=0)
    primary_scale: float = field(1.0, "scale applied to PrimaryCaps before the squash "
                                 "(authors' code: 1/32; paper: 1)", gt=0)
    decoder: bool = field(True, "reconstruction decoder from the masked class capsules")
    decoder_hidden: list[int] = field([512, 1024], "decoder hidden layer widths (ReLU); output "
                                      "is sigmoid of input_size^2 x in_channels", min=1,
                                      max=65536)

    def moved_key(self, key: str, value: Any) -> tuple[str, Any]:
        """The flat routing keys of format 2 (``model.routing_iterations``, ``class_bias``,
        ``leaky_routing``) now live in ``model.routing``."""
        moved = routing.from_flat(self.routing, key, value)
        return (key, value) if moved is None else ("routing", moved)

    def check(self, source: str) -> None:
        conv1_out = self.input_size - self.conv1_kernel + 1
        if conv1_out < 1 or primary_grid(self) < 1:
            raise ConfigError(f"{source}: model.input_size={self.input_size} is too small for "
                              f"conv1_kernel={self.conv1_kernel} and primary_kernel="
                              f"{self.primary_kernel}; use a larger input or smaller kernels")


def primary_grid(m: CapsNetConfig) -> int:
    """Side of the PrimaryCaps grid: Conv1 (valid, stride 1), then PrimaryCaps (valid,
    ``primary_stride``)."""
    conv1_out = m.input_size - m.conv1_kernel + 1
    return (conv1_out - m.primary_kernel) // m.primary_stride + 1


@dataclass
class MarginLossConfig:
    """The margin loss (paper eq. 4) plus the weighted reconstruction error."""

    m_plus: float = field(0.9, "margin loss: target length for the present class", min=0.0, max=1.0)
    m_minus: float = field(0.1, "margin loss: ceiling for absent classes", min=0.0, max=1.0)
    down_weight: float = field(0.5, "margin loss: lambda, down-weighting of absent classes",
                               min=0.0)
    recon_weight: float = field(0.0005, "weight of the reconstruction sum of squared errors "
                                "(0 disables the term)", min=0.0)

    def check(self, source: str) -> None:
        if self.m_minus >= self.m_plus:
            raise ConfigError(f"{source}: loss.m_minus ({self.m_minus}) must be below "
                              f"loss.m_plus ({self.m_plus})")
