"""Options of the datasets beyond MNIST (``fashion-mnist``, ``kmnist``, ``emnist``, ``cifar10``,
``cifar100``, ``svhn``, ``folder``) and their class names, beside ``idx_sets.py``, ``cifar.py``,
``svhn.py`` and ``folder.py``. Torch-free: ``capsctl config`` reads them without loading torch.

Augmentation keys (the training stream, ``natural.py``; evaluation never augments):

- ``shift`` (digit-like sets): random integer shift up to N px each way over a zero border,
  the MNIST augmentation.
- ``pad``, ``crop``, ``flip`` (natural images): a random ``crop`` x ``crop`` window of the image
  zero-padded by ``pad`` px, mirrored left-right with probability 1/2 when ``flip``. Evaluation
  takes the centre ``crop`` x ``crop`` window of the unpadded image. ``crop`` 0 = the whole image;
  ``crop`` is the model's input side (the paper's CIFAR-10 model: 24x24 patches of 32x32).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from capsctl.data.mnist_config import DataFiles
from capsctl.errors import ConfigError
from capsctl.fields import field

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
_MERGED = set("cijklmopsuvwxyz")  # lowercase letters EMNIST merges into their capitals
EMNIST_CLASSES = {
    "balanced": tuple(sorted(set(string.digits + string.ascii_letters) - _MERGED)),
    "bymerge": tuple(sorted(set(string.digits + string.ascii_letters) - _MERGED)),
    "byclass": tuple(sorted(string.digits + string.ascii_letters)),
    "letters": tuple(string.ascii_lowercase),   # labels 1-26 in the files, 0-25 here
    "digits": tuple(string.digits),
    "mnist": tuple(string.digits),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR100_FINE = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl
boy bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud
cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster
house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm""".split())
CIFAR100_COARSE = tuple("""aquatic_mammals fish flowers food_containers fruit_and_vegetables
household_electrical_devices household_furniture insects large_carnivores
large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1
vehicles_2""".split())
SVHN_CLASSES = tuple(string.digits)


def _check_crop(o, side: int, source: str) -> None:
    if o.crop > side:
        raise ConfigError(f"{source}: data.crop={o.crop} is larger than the {side}x{side} "
                          f"images of {o.name}; use data.crop <= {side} (0 = whole image)")


# --- digit-like sets in IDX files (28x28 grey) ----------------------------------------------------

@dataclass
class FashionMNISTConfig(DataFiles):
    name: str = field("fashion-mnist", "dataset: fashion-mnist (Zalando's 28x28 grey clothing, 10 "
                      "classes, MNIST's IDX files)")
    shift: int = field(2, "random integer shift in pixels each way (zero padding), training only",
                       min=0, max=13)
    flip: bool = field(False, "mirror training images left-right at random")


@dataclass
class KMNISTConfig(DataFiles):
    name: str = field("kmnist", "dataset: kmnist (Kuzushiji-MNIST, 28x28 cursive Japanese, 10 "
                      "classes)")
    shift: int = field(2, "random integer shift in pixels each way (zero padding), training only",
                       min=0, max=13)


@dataclass
class EMNISTConfig(DataFiles):
    name: str = field("emnist", "dataset: emnist (28x28 handwritten letters and digits, NIST)")
    split: str = field("balanced", "EMNIST split: balanced (47 classes), letters (26), digits "
                       "(10), mnist (10), bymerge (47), byclass (62)",
                       choices=tuple(EMNIST_CLASSES))
    shift: int = field(2, "random integer shift in pixels each way (zero padding), training only",
                       min=0, max=13)


# --- natural images ---------------------------------------------------------------------------

@dataclass
class CIFAR10Config(DataFiles):
    name: str = field("cifar10", "dataset: cifar10 (32x32 colour, 10 classes; the python "
                      "batches)")
    crop: int = field(0, "side of the random training patch and of the centre test patch, the "
                      "model's input side (0 = the whole 32x32 image; the paper's CapsNet: 24 "
                      "with pad 0)", min=0, max=32)
    pad: int = field(4, "zero padding in pixels around the image before the random crop",
                     min=0, max=16)
    flip: bool = field(True, "mirror training images left-right at random")

    def check(self, source: str) -> None:
        _check_crop(self, 32, source)


@dataclass
class CIFAR100Config(CIFAR10Config):
    name: str = field("cifar100", "dataset: cifar100 (32x32 colour, 100 classes or 20 "
                      "superclasses; the python batches)")
    labels: str = field("fine", "fine (100 classes) or coarse (20 superclasses)",
                        choices=("fine", "coarse"))


@dataclass
class SVHNConfig(DataFiles):
    name: str = field("svhn", "dataset: svhn (Street View House Numbers, 32x32 colour digits; the "
                      "cropped-digits .mat files)")
    crop: int = field(0, "side of the random training patch and of the centre test patch (0 = "
                      "the whole 32x32 image)", min=0, max=32)
    pad: int = field(2, "zero padding in pixels around the image before the random crop (with "
                     "crop 0: a random shift of up to N px)", min=0, max=16)
    extra: bool = field(False, "also train on the 531,131 'extra' images (extra_32x32.mat)")

    def check(self, source: str) -> None:
        _check_crop(self, 32, source)


@dataclass
class FolderConfig(DataFiles):
    name: str = field("folder", "dataset: folder (your images: ROOT/train/<class>/*.png|jpg, "
                      "ROOT/test/<class>/..., optional ROOT/val/<class>/...)")
    root: str | None = field(None, "the image folder ROOT (flag --data-root applies when this is "
                             "null)")
    val_size: int = field(1000, "validation images: all of ROOT/val when it exists, else this "
                          "many training images held out at random (fixed seed); 0 = none",
                          min=0, max=10_000_000)
    image_size: int = field(32, "side the images are resized to (shorter side, then the centre "
                            "square), once, when decoded", min=8, max=1024)
    channels: int = field(3, "1 (grey) or 3 (RGB): every image is converted to this", min=1,
                          max=3)
    crop: int = field(0, "side of the random training patch and of the centre test patch (0 = "
                      "the whole image_size image)", min=0, max=1024)
    pad: int = field(0, "zero padding in pixels around the image before the random crop",
                     min=0, max=256)
    flip: bool = field(False, "mirror training images left-right at random (not for digits or "
                       "text)")
    skip_bad_images: bool = field(False, "skip images that cannot be decoded (and count them) "
                                  "instead of stopping with an error naming the file")
    workers: int = field(0, "processes decoding the images (0 = one per CPU core)", min=0,
                         max=1024)

    def check(self, source: str) -> None:
        if self.download:
            raise ConfigError(f"{source}: data.download does not apply to the folder dataset "
                              "(its images are yours); set data.download=false")
        if self.channels == 2:
            raise ConfigError(f"{source}: config key 'data.channels' must be 1 (grey) or 3 "
                              "(RGB), got 2")
        _check_crop(self, self.image_size, source)


def natural_side(o) -> int:
    """The model's input side for a natural-image set: the crop, or the whole image."""
    full = o.image_size if isinstance(o, FolderConfig) else 32
    return o.crop or full
