"""The CNN baselines' configs (``cnn``, ``multimnist-cnn``), beside ``cnn.py`` and
``multimnist_cnn.py``; their losses have no options. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from capsctl.errors import ConfigError
from capsctl.fields import _f
from capsctl.models.capsnet_config import ImageInput


@dataclass
class CNNConfig(ImageInput):
    name: str = _f("cnn", "model family: cnn (the paper's baseline, softmax cross-entropy)")
    channels: list[int] = _f([256, 256, 128], "conv channels (5x5, stride 1, same padding, ReLU)",
                             min=1, max=65536)
    hidden: list[int] = _f([328, 192], "fully connected widths (ReLU, dropout)", min=1,
                           max=65536)
    pool: list[int] = _f([], "max-pooling window (= stride) after each conv, one per entry of "
                         "channels, 1 = none; [] = no pooling (Table 1 baseline)", min=1,
                         max=4096)
    dropout: float = _f(0.5, "dropout probability after each fully connected layer", min=0.0,
                        max=0.99)

    def check(self, source: str) -> None:
        if self.pool and len(self.pool) != len(self.channels):
            raise ConfigError(f"{source}: model.pool has {len(self.pool)} entries but "
                              f"model.channels has {len(self.channels)}; give one window per "
                              "conv (1 = no pooling) or [] for none")
        side = self.input_size
        for w in self.pool:
            side //= w
        if side < 1:
            raise ConfigError(f"{source}: model.pool {self.pool} shrinks the "
                              f"{self.input_size}x{self.input_size} input to nothing; use fewer "
                              "or smaller pooling windows")


@dataclass
class MultiMNISTCNNConfig(ImageInput):
    name: str = _f("multimnist-cnn", "model family: multimnist-cnn (the paper's MultiMNIST "
                   "baseline: conv + 2x2 max-pooling, sigmoid outputs, two labels)")
    channels: list[int] = _f([512, 256], "conv channels (5x5, same padding, ReLU, each followed "
                             "by 2x2 max-pooling)", min=1, max=65536)
    hidden: list[int] = _f([1024], "fully connected widths (ReLU, dropout)", min=1, max=65536)
    dropout: float = _f(0.5, "dropout probability after each fully connected layer", min=0.0,
                        max=0.99)

    def check(self, source: str) -> None:
        if self.input_size >> len(self.channels) < 1:
            raise ConfigError(f"{source}: model.input_size={self.input_size} is too small for "
                              f"{len(self.channels)} 2x2 poolings")


@dataclass
class NoLossOptions:
    """A loss with nothing to set (cross-entropy, binary cross-entropy)."""

    def check(self, source: str) -> None:
        pass
