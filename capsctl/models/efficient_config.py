"""The ``efficient-capsnet`` family's config (Mazzia, Salvetti & Chiaberge 2021), beside
``efficient_capsnet.py``; its loss is the CapsNet's margin loss plus reconstruction
(``MarginLossConfig``). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from capsctl.errors import ConfigError
from capsctl.fields import field
from capsctl.models.capsnet_config import ImageInput


@dataclass
class EfficientCapsNetConfig(ImageInput):
    name: str = field("efficient-capsnet", "model family: efficient-capsnet (depthwise primary "
                      "capsules, self-attention routing; Mazzia et al. 2021)")
    conv_channels: list[int] = field([32, 64, 64, 128], "channels of the convolutions (valid "
                                     "padding, ReLU, batch norm after each)", min=1, max=65536)
    conv_kernels: list[int] = field([5, 3, 3, 3], "kernel size of each convolution", min=1,
                                    max=64)
    conv_strides: list[int] = field([1, 1, 1, 2], "stride of each convolution", min=1, max=64)
    primary_kernel: int = field(9, "kernel of the depthwise convolution making the primary "
                                "capsules (MNIST: 9 = the whole 9x9 map, one position)", min=1,
                                max=4096)
    primary_dim: int = field(8, "primary capsule dimension (types = last conv_channels / this)",
                             min=1, max=1024)
    class_dim: int = field(16, "class capsule dimension", min=1, max=1024)
    decoder: bool = field(True, "reconstruction decoder from the masked class capsules (the "
                          "paper's regulariser; not in its 161,824 parameters)")
    decoder_hidden: list[int] = field([512, 1024], "decoder hidden layer widths (ReLU); output is "
                                      "sigmoid of input_size^2 x in_channels", min=1, max=65536)

    def check(self, source: str) -> None:
        n = len(self.conv_channels)
        if not n or len(self.conv_kernels) != n or len(self.conv_strides) != n:
            raise ConfigError(f"{source}: model.conv_channels, model.conv_kernels and "
                              f"model.conv_strides need one entry per convolution (got "
                              f"{n}, {len(self.conv_kernels)}, {len(self.conv_strides)})")
        if self.conv_channels[-1] % self.primary_dim:
            raise ConfigError(f"{source}: the last of model.conv_channels "
                              f"({self.conv_channels[-1]}) must be a multiple of "
                              f"model.primary_dim ({self.primary_dim})")
        if efficient_grid(self) < 1:
            raise ConfigError(f"{source}: model.input_size={self.input_size} is too small for "
                              f"the convolutions {self.conv_kernels} / strides "
                              f"{self.conv_strides} and primary_kernel={self.primary_kernel}")


def efficient_grid(m: EfficientCapsNetConfig) -> int:
    """Side of the primary capsule grid: the valid convolutions, then the depthwise one
    (stride 1). 1 for the paper's MNIST model."""
    side = m.input_size
    for k, s in zip(m.conv_kernels, m.conv_strides):
        side = (side - k) // s + 1 if side >= k else 0
    return side - m.primary_kernel + 1
