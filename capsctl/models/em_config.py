"""The ``em-capsnet`` family's config (Hinton, Sabour & Frosst 2018), beside ``em_capsnet.py``,
and the spread loss's. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from capsctl.errors import ConfigError
from capsctl.fields import field
from capsctl.models.capsnet_config import ImageInput


@dataclass
class EMCapsNetConfig(ImageInput):
    name: str = field("em-capsnet", "model family: em-capsnet (matrix capsules, EM routing)")
    conv1_channels: int = field(32, "A, channels of ReLU Conv1 (5x5, stride 2)", min=1, max=65536)
    primary_types: int = field(32, "B, PrimaryCaps types (4x4 pose = 1x1 conv of Conv1, "
                               "activation = sigmoid)", min=1, max=4096)
    caps1_types: int = field(32, "C, ConvCaps1 types (K=3, stride 2)", min=1, max=4096)
    caps2_types: int = field(32, "D, ConvCaps2 types (K=3, stride 1)", min=1, max=4096)
    iterations: int = field(3, "EM routing iterations per capsule layer", min=1, max=100)
    inverse_temperature: float = field(0.01, "lambda, inverse temperature scale; iteration t (from "
                                       "0) uses lambda * (1 - inverse_temperature_rate^(t+1))",
                                       gt=0)
    inverse_temperature_rate: float = field(0.95, "rate of the inverse temperature schedule "
                                            "(0 = constant lambda)", min=0.0, max=0.999999)
    var_floor: float = field(1e-4, "floor added to every routing variance (keeps log sigma "
                             "finite, e.g. for a parent with one child)", gt=0)
    init_std: float = field(0.5, "std of the normal noise added to the identity to initialise "
                            "the 4x4 transformation matrices", min=0.0)
    coordinate_addition: bool = field(True, "add the scaled receptive-field centre (row, column) "
                                      "to the class capsules' votes")
    decoder: bool = field(True, "reconstruction decoder from the masked class pose")
    decoder_hidden: list[int] = field([512, 1024], "decoder hidden layer widths (ReLU)", min=1,
                                      max=65536)

    def check(self, source: str) -> None:
        if self.input_size < 17:  # (side - 5) // 2 + 1 -> (g - 3) // 2 + 1 -> g - 2 >= 1
            raise ConfigError(f"{source}: model.input_size={self.input_size} is too small for "
                              "em-capsnet (Conv1 5x5/2, ConvCaps 3x3/2 and 3x3/1 need at least "
                              "17)")


@dataclass
class SpreadLossConfig:
    """The spread loss with a rising margin, plus the weighted reconstruction error."""

    m_start: float = field(0.2, "spread loss: margin at step 0", min=0.0, max=1.0)
    m_end: float = field(0.9, "spread loss: final margin", min=0.0, max=1.0)
    m_steps: int = field(10000, "optimizer steps over which the margin rises linearly from "
                         "m_start to m_end (0 = m_end at once)", min=0)
    recon_weight: float = field(0.0005, "weight of the reconstruction sum of squared errors "
                                "(0 disables the term)", min=0.0)

    def check(self, source: str) -> None:
        if self.m_start > self.m_end:
            raise ConfigError(f"{source}: loss.m_start ({self.m_start}) must not exceed "
                              f"loss.m_end ({self.m_end})")
