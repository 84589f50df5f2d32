"""The CNN baselines' configs (``cnn``, ``multimnist-cnn``), beside ``cnn.py`` and
``multimnist_cnn.py``; their losses have no options. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from capsctl.errors import ConfigError
from capsctl.fields import field
from capsctl.models.capsnet_config import ImageInput


@dataclass
class CNNConfig(ImageInput):
    name: str = field("cnn", "model family: cnn (the paper's baseline, softmax cross-entropy)")
    channels: list[int] = field([256, 256, 128],
                                "conv channels (5x5, stride 1, same padding, ReLU)", min=1,
                                max=65536)
    hidden: list[int] = field([328, 192], "fully connected widths (ReLU, dropout)", min=1,
                              max=65536)
    pool: list[int] = field([], "max-pooling window (= stride) after each conv, one per entry of "
                            "channels, 1 = none; [] = no pooling (Table 1 baseline)", min=1,
                            max=4096)
    dropout: float = field(0.5, "dropout probability after each fully connected layer", min=0.0,
                           max=0.99)
    decoder: bool = field(False, "class-conditional reconstruction decoder from the last hidden "
                          "layer (DARCCC's CNN; docs/adversarial.md): off in the Table 1 "
                          "baseline")
    decoder_hidden: list[int] = field([512, 1024], "decoder hidden layer widths (ReLU); output "
                                      "sigmoid pixels, as CapsNet's", min=1, max=65536)

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
    name: str = field("multimnist-cnn", "model family: multimnist-cnn (the paper's MultiMNIST "
                      "baseline: conv + 2x2 max-pooling, sigmoid outputs, two labels)")
    channels: list[int] = field([512, 256], "conv channels (5x5, same padding, ReLU, each followed "
                                "by 2x2 max-pooling)", min=1, max=65536)
    hidden: list[int] = field([1024], "fully connected widths (ReLU, dropout)", min=1, max=65536)
    dropout: float = field(0.5, "dropout probability after each fully connected layer", min=0.0,
                           max=0.99)

    def check(self, source: str) -> None:
        if self.input_size >> len(self.channels) < 1:
            raise ConfigError(f"{source}: model.input_size={self.input_size} is too small for "
                              f"{len(self.channels)} 2x2 poolings")


@dataclass
class CrossEntropyLossConfig:
    """Softmax cross-entropy, plus the weighted reconstruction error when the CNN has a
    decoder (model.decoder)."""

    recon_weight: float = field(0.0005, "weight of the reconstruction sum of squared errors "
                                "when model.decoder is true (0 disables the term); CapsNet's "
                                "weight", min=0.0)

    def check(self, source: str) -> None:
        pass


@dataclass
class NoLossConfig:
    """A loss with nothing to set (cross-entropy, binary cross-entropy)."""

    def check(self, source: str) -> None:
        pass
