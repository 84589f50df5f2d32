"""MultiMNIST (Sabour et al. 2017, section 6): two digits of different classes from the same split,
each shifted on its own, merged pixel-wise with min(a + b, 1).

A 28x28 digit is placed on a canvas of ``28 + 2 * pad`` pixels (36 for the paper's pad 4) by
``augment.place()`` with a per-digit integer shift in ``[-shift, shift]`` each way (the paper: 4;
the authors' README used 6, which can crop a digit's empty border). The merge is done on uint8:
``min(a + b, 255)``.

Training pairs (``MultiTrainStream``) are drawn afresh for every step on the data's device: the
first digit walks a per-epoch permutation of the training digits (one epoch = every digit once as
the first digit), its partner is drawn uniformly among the training digits of the other classes,
and both shifts come from a generator seeded by (seed, step). No pair is ever stored.

The evaluation set (``MultiEvalSource``) is fixed by the seed: example ``i`` overlays digit
``i % N`` (N source digits) on a partner with shifts that are a hash of (seed, i), so any index
range can be computed on its own, in any batch size, with no host sync; ``per_digit`` overlays per
digit (the paper: 1,000, i.e. 10M test examples from the 10k test digits). Evaluation takes a
fixed prefix by default (``default_limit``); the first ``k * N`` examples hold every digit k times.

Every batch is a dict: x (B, 1, S, S) the composite, y (B,) first label, y2 (B,) second label,
x_a / x_b (B, 1, S, S) the two source digits placed exactly as in the composite; all float in
[0, 1] (S = canvas side).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from capsctl.data.augment import generator, mix_seed, place, random_offsets
from capsctl.data.datasets import DataBundle, ImageSet, TrainStream
from capsctl.tasks import PAIR
from capsctl.tasks.pair import bbox_overlap

STREAM_PAIRS, STREAM_EVAL_PAIRS = 11, 12
MASK32 = 0xFFFFFFFF


class ClassIndex:
    """Digits sorted by class, so that "a digit of another class than c" is one integer draw.

    The digits of class c are ``order[start[c] : start[c] + count[c]]``; the other classes' digits
    are the ``N - count[c]`` positions outside that run: draw r in [0, N - count[c]) and skip the
    run (``r + count[c]`` when ``r >= start[c]``). Uniform over every digit of another class.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int = 10):
        self.order = torch.argsort(labels, stable=True)
        self.count = torch.bincount(labels, minlength=num_classes)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.n = int(labels.shape[0])

    def partner(self, labels_B: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
        """Indices of partners of another class; ``u_B`` uniform in [0, 1) (float64)."""
        others_B = self.n - self.count[labels_B]
        r_B = torch.minimum((u_B * others_B).long(), others_B - 1)
        pos_B = torch.where(r_B >= self.start[labels_B], r_B + self.count[labels_B], r_B)
        return self.order[pos_B]


def compose(data: ImageSet, idx_a: torch.Tensor, idx_b: torch.Tensor, off_a: torch.Tensor,
            off_b: torch.Tensor, pad: int, shift: int) -> dict[str, torch.Tensor]:
    """The batch dict of the pairs (idx_a[k], idx_b[k]) placed at the given window offsets."""
    a_u8 = place(data.images[idx_a], off_a, pad, shift)
    b_u8 = place(data.images[idx_b], off_b, pad, shift)
    merged_u8 = (a_u8.to(torch.int16) + b_u8).clamp_(max=255).to(torch.uint8)
    to_f = lambda t: t.unsqueeze(1).float().div_(255.0)  # noqa: E731
    return {"x": to_f(merged_u8), "y": data.labels[idx_a], "y2": data.labels[idx_b],
            "x_a": to_f(a_u8), "x_b": to_f(b_u8)}


class MultiTrainStream(TrainStream):
    """Fresh MultiMNIST training pairs per draw: ``batch(epoch, k, step)`` like ``TrainStream``."""

    task = PAIR

    def __init__(self, data: ImageSet, batch_size: int, seed: int, shift: int = 4, pad: int = 4):
        super().__init__(data, batch_size, seed, shift=shift, canvas_pad=pad)
        self.classes = ClassIndex(data.labels)

    def batch(self, epoch: int, k: int, step: int) -> dict[str, torch.Tensor]:
        dev = self.data.device
        idx_a = self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        g = generator(dev, self.seed, STREAM_PAIRS, step)
        n = len(idx_a)
        u = torch.rand(n, generator=g, device=dev, dtype=torch.float64)
        idx_b = self.classes.partner(self.data.labels[idx_a], u)
        off_a = random_offsets(n, self.shift, g, dev)
        off_b = random_offsets(n, self.shift, g, dev)
        return compose(self.data, idx_a, idx_b, off_a, off_b, self.canvas_pad, self.shift)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (values kept below 2^32: no overflow anywhere)."""
    x = x & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


class MultiEvalSource:
    """The fixed MultiMNIST evaluation stream over ``data``: ``per_digit * len(data)`` examples,
    each computed from its index (never stored)."""

    task = PAIR

    def __init__(self, data: ImageSet, name: str, per_digit: int, seed: int, shift: int = 4,
                 pad: int = 4, default_limit: int | None = None):
        self.data, self.name, self.per_digit = data, name, per_digit
        self.shift, self.pad = shift, pad
        self.key = mix_seed(seed, STREAM_EVAL_PAIRS) & MASK32
        self.classes = ClassIndex(data.labels)
        n = len(self)
        self.default_limit = min(default_limit, n) if default_limit else None

    def __len__(self) -> int:
        return len(self.data) * self.per_digit

    def _field(self, idx: torch.Tensor, f: int) -> torch.Tensor:
        """A 32-bit hash of (seed, example index, field)."""
        return hash32(hash32(idx ^ self.key) * 8 + f)

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at ``idx`` (int64, on the data's device), identical on every call."""
        idx = idx.long()
        idx_a = idx % len(self.data)
        u = self._field(idx, 0).double() / 2.0 ** 32
        idx_b = self.classes.partner(self.data.labels[idx_a], u)
        span = 2 * self.shift + 1
        off = [(self._field(idx, f) * span) >> 32 for f in (1, 2, 3, 4)]
        off_a, off_b = torch.stack(off[:2], 1), torch.stack(off[2:], 1)
        return compose(self.data, idx_a, idx_b, off_a, off_b, self.pad, self.shift)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict]:
        """The first ``limit`` examples (default: ``default_limit``, else all) in order."""
        limit = limit if limit is not None else self.default_limit
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield self.get(torch.arange(start, min(start + batch_size, n),
                                        device=self.data.device))


def overlap_stats(batches, limit: int | None = None) -> dict[str, float]:
    """Mean bounding-box overlap over batches of pairs (dicts with x_a, x_b)."""
    sums, n = {}, 0
    for batch in batches:
        for k, v in bbox_overlap(batch["x_a"], batch["x_b"]).items():
            sums[k] = sums.get(k, 0) + v.sum()
        n += batch["x_a"].shape[0]
        if limit is not None and n >= limit:
            break
    return {"n": n, **{f"overlap_{k}": float(v) / max(n, 1) for k, v in sums.items()}}


def expected_frame_overlap(shift: int, side: int = 28) -> float:
    """Mean overlap of the two digits' 28x28 frames (intersection / frame area) when each digit is
    shifted uniformly in [-shift, shift] each way: 0.80 for the paper's shift of 4 (exact)."""
    span = range(-shift, shift + 1)
    per_axis = sum(max(side - abs(a - b), 0) for a in span for b in span) / (len(span) ** 2 * side)
    return per_axis ** 2


def build_bundle(cfg, device: torch.device, root_flag: str | None = None) -> DataBundle:
    """The ``multimnist`` dataset: pairs from the MNIST training digits (the validation digits are
    held out as for MNIST and paired among themselves) and from the test digits."""
    from capsctl.data.digits import load_mnist_sets
    from capsctl.errors import DataError

    d = cfg.data
    train, val, test = load_mnist_sets(d, device, root_flag)
    for split, s in (("training", train), ("validation", val), ("test", test)):
        if s is not None and len(torch.unique(s.labels)) < 2:
            raise DataError(f"multimnist needs digits of at least two classes in the {split} "
                            "split")
    seed = d.seed  # the fixed pairs do not depend on train.seed: runs compare
    stream = MultiTrainStream(train, cfg.train.batch_size, cfg.train.seed, d.shift, d.pad)
    val_src = (MultiEvalSource(val, "val", d.val_per_digit, seed, d.shift, d.pad)
               if val is not None else None)
    test_src = MultiEvalSource(test, "test", d.per_digit, seed, d.shift, d.pad,
                               default_limit=d.test_limit or None)
    return DataBundle(stream, val_src, test_src, 28 + 2 * d.pad, PAIR)
