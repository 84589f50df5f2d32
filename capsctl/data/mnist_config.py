"""Options of the MNIST-based datasets (``mnist``, ``expanded-mnist``, ``multimnist``), beside
``mnist.py``, ``digits.py`` and ``multimnist.py``. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from capsctl.errors import ConfigError
from capsctl.fields import field


@dataclass
class DataFiles:
    """Where the files are, and the held-out validation slice: every training dataset has these."""

    name: str = field("", "dataset")
    root: str | None = field(None, "folder with the dataset's files (flag --data-root and "
                             "CAPSCTL_DATA apply when this is null)")
    download: bool = field(False, "download the files (torchvision / the official site) when they "
                           "are missing")
    val_size: int = field(5000, "images held out from the end of the training set for validation",
                          min=0, max=10_000_000)

    def check(self, source: str) -> None:
        pass


@dataclass
class MNISTConfig(DataFiles):
    name: str = field("mnist", "dataset: mnist (28x28 digits, LeCun et al.)")
    shift: int = field(2, "random integer shift in pixels each way (zero padding), training only",
                       min=0, max=13)
    augment: str = field("shift", "training augmentation: shift (data.shift, the paper's) or "
                         "efficient-capsnet (Efficient-CapsNet's authors' rotate, shift within "
                         "the margins, squish and erase; needs data.shift 0)",
                         choices=("shift", "efficient-capsnet"))

    def check(self, source: str) -> None:
        if self.augment == "efficient-capsnet" and self.shift:
            raise ConfigError(f"{source}: data.augment=efficient-capsnet shifts by its own rule; "
                              f"set data.shift=0 (it is {self.shift})")


@dataclass
class ExpandedMNISTConfig(DataFiles):
    name: str = field("expanded-mnist", "dataset: expanded-mnist (each digit on a 40x40 canvas, "
                      "paper 5.2)")
    shift: int = field(6, "random integer offset of the digit on the canvas, up to N px each way, "
                       "training only (6 = anywhere it fits)", min=0, max=6)


@dataclass
class MultiMNISTConfig(DataFiles):
    name: str = field("multimnist", "dataset: multimnist (two overlapping digits, paper section 6)")
    shift: int = field(4, "shift of each digit, up to N px each way (paper 4; the authors' README "
                       "used 6)", min=0, max=64)
    pad: int = field(4, "canvas border, canvas side = 28 + 2 x pad (paper: 36)", min=0, max=64)
    per_digit: int = field(1000, "overlays per test digit in the fixed test stream (paper: 1,000 = "
                           "10M)", min=1, max=100000)
    val_per_digit: int = field(2, "overlays per held-out validation digit (fixed, evaluated every "
                               "epoch)", min=1, max=100000)
    test_limit: int = field(100000, "test examples evaluated by default (the final test, eval "
                            "without --limit); 0 = all", min=0)
    seed: int = field(0, "seed of the fixed validation and test pairs (independent of train.seed, "
                      "so runs share one test set)", min=0, max=2 ** 63 - 1)

    def check(self, source: str) -> None:
        if self.shift > self.pad + 14:
            raise ConfigError(f"{source}: data.shift={self.shift} moves a digit off the "
                              f"{28 + 2 * self.pad}-px canvas; use data.shift <= data.pad + 14")
