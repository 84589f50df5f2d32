"""Datasets by name: ``DATASETS[data.name]`` is a DatasetSpec. Plain dict, torch-free (builders
are imported only when data is built).

What a dataset declares: its options (the ``data`` section's dataclass; None for evaluation-only
sets), its image side (a function of its options), channels and classes (fixed, or functions of
its options: ``channel_counts(options)``, ``class_names(options, root_flag)``), the scale of its
pixels (``normalisation``) and its task kind, a module of capsctl/tasks:

- ``single``: batches ``{"x": (B, C, H, W) float, "y": (B,) int64}``
- ``pair`` (two digits per image, MultiMNIST): also ``"y2"`` (B,), the second label, and
  ``"x_a"``, ``"x_b"``: the two source images (each digit reconstructs its own).

Every source a builder returns (training stream, validation/test source) carries ``.task``;
``capsctl.tasks.get(kind)`` is what the kind means (labels, metrics, picture).
To add a dataset: write its options dataclass (with ``check(source)``), a builder
``fn(cfg, device, root_flag) -> DataBundle`` (``data/build.py``), and add one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from capsctl.data import image_sets_config as isc
from capsctl.data.mnist_config import ExpandedMNISTConfig, MNISTConfig, MultiMNISTConfig
from capsctl.data.smallnorb_config import SmallNORBConfig
from capsctl.tasks import PAIR, SINGLE  # noqa: F401  (the kinds the datasets below declare)
DIGITS = tuple(str(d) for d in range(10))
EXPANDED_SIDE = 40  # 28 + 2 x 6 px of canvas
UNIT, STANDARDISED = "unit", "standardised"
NORMALISATIONS = {UNIT: "pixel / 255, in [0, 1]",
                  STANDARDISED: "per image: zero mean, unit variance"}


@dataclass(frozen=True)
class DatasetSpec:
    """``options``: the ``data`` section's dataclass (None: evaluation only, no ``data.name``).
    ``build``: "module:function" giving the train/val/test bundle (training datasets) or one
    evaluation source (``fn(split, cfg, device, root_flag)``, evaluation-only sets).
    ``side(options)``: the image side; ``channels``: the channel counts it can give.
    ``normalisation``: what a pixel value of a batch means (``NORMALISATIONS``).
    ``channels_of(options)`` / ``classes_of(options, root_flag)``: set where the channels or
    classes depend on the options or the files; read them through ``channel_counts`` and
    ``class_names``, which fall back to the fixed ``channels`` / ``classes``."""

    options: type | None
    build: str
    task: str
    side: Callable
    channels: tuple[int, ...]
    classes: tuple[str, ...]
    summary: str
    normalisation: str = UNIT
    channels_of: Callable | None = None
    classes_of: Callable | None = None

    def channel_counts(self, options) -> tuple[int, ...]:
        """The channel counts this dataset gives with ``options`` (the first is the default)."""
        return self.channels_of(options) if self.channels_of else self.channels

    def class_names(self, options, root_flag: str | None = None) -> tuple[str, ...] | None:
        """The class names with ``options``; None when they come from files that cannot be
        found yet (a ``folder`` dataset whose root is given only by ``--data-root``)."""
        return self.classes_of(options, root_flag) if self.classes_of else self.classes


def _folder_classes(options, root_flag: str | None = None) -> tuple[str, ...] | None:
    from capsctl.data.folder import folder_classes  # torch-free; lists ROOT/train

    return folder_classes(options, root_flag)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(MNISTConfig, "capsctl.data.digits:build_mnist", SINGLE,
                         lambda o: 28, (1,), DIGITS, "MNIST digits, 28x28"),
    "expanded-mnist": DatasetSpec(ExpandedMNISTConfig, "capsctl.data.digits:build_expanded",
                                  SINGLE, lambda o: EXPANDED_SIDE, (1,), DIGITS,
                                  "MNIST digits placed on a 40x40 canvas"),
    "multimnist": DatasetSpec(MultiMNISTConfig, "capsctl.data.multimnist:build_bundle", PAIR,
                              lambda o: 28 + 2 * o.pad, (1,), DIGITS,
                              "two overlapping MNIST digits, (28 + 2 pad)^2"),
    "smallnorb": DatasetSpec(SmallNORBConfig, "capsctl.data.smallnorb:build_bundle", SINGLE,
                             lambda o: 32, (1, 2),
                             ("animal", "human", "airplane", "truck", "car"),
                             "smallNORB, 32x32 crops of 48x48 (1 or 2 cameras)", STANDARDISED),
    "affnist": DatasetSpec(None, "capsctl.data.build:affnist_source", SINGLE,
                           lambda o: EXPANDED_SIDE, (1,), DIGITS,
                           "affNIST (evaluation only), 40x40"),
    "affnist-synth": DatasetSpec(None, "capsctl.data.build:affnist_source", SINGLE,
                                 lambda o: EXPANDED_SIDE, (1,), DIGITS,
                                 "capsctl's synthetic affNIST (evaluation only), 40x40"),
    "fashion-mnist": DatasetSpec(isc.FashionMNISTConfig, "capsctl.data.idx_sets:build_fashion",
                                 SINGLE, lambda o: 28, (1,), isc.FASHION_CLASSES,
                                 "Fashion-MNIST clothing, 28x28 grey"),
    "kmnist": DatasetSpec(isc.KMNISTConfig, "capsctl.data.idx_sets:build_kmnist", SINGLE,
                          lambda o: 28, (1,), isc.KMNIST_CLASSES,
                          "Kuzushiji-MNIST cursive Japanese, 28x28 grey"),
    "emnist": DatasetSpec(isc.EMNISTConfig, "capsctl.data.idx_sets:build_emnist", SINGLE,
                          lambda o: 28, (1,), isc.EMNIST_CLASSES["balanced"],
                          "EMNIST letters and digits, 28x28 grey (split: data.split)",
                          classes_of=lambda o, root_flag=None: isc.EMNIST_CLASSES[o.split]),
    "cifar10": DatasetSpec(isc.CIFAR10Config, "capsctl.data.cifar:build_cifar10", SINGLE,
                           isc.natural_side, (3,), isc.CIFAR10_CLASSES,
                           "CIFAR-10, 32x32 colour (crops: data.crop)"),
    "cifar100": DatasetSpec(isc.CIFAR100Config, "capsctl.data.cifar:build_cifar100", SINGLE,
                            isc.natural_side, (3,), isc.CIFAR100_FINE,
                            "CIFAR-100, 32x32 colour, 100 classes or 20 superclasses",
                            classes_of=lambda o, root_flag=None: (
                                isc.CIFAR100_COARSE if o.labels == "coarse"
                                else isc.CIFAR100_FINE)),
    "svhn": DatasetSpec(isc.SVHNConfig, "capsctl.data.svhn:build_svhn", SINGLE,
                        isc.natural_side, (3,), isc.SVHN_CLASSES,
                        "SVHN house-number digits, 32x32 colour"),
    "folder": DatasetSpec(isc.FolderConfig, "capsctl.data.folder:build_folder", SINGLE,
                          isc.natural_side, (1, 3), (),
                          "your images, ROOT/{train,test,val}/<class>/ (any size, grey or RGB)",
                          channels_of=lambda o: (o.channels,), classes_of=_folder_classes),
}

TRAINING = tuple(n for n, s in DATASETS.items() if s.options is not None)
