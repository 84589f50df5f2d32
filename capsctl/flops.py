"""FLOPs per image of a model, and the machine's attainable matrix rate: the two numbers that turn
``capsctl bench``'s images/s into a fraction of what the cores can do.

How FLOPs are counted (every family the same way; docs/performance.md lists what each family's
count holds): one forward of the model in training mode, with labels, on a batch of 2, under
``torch.utils.flop_counter.FlopCounterMode``, with the routing kernel switched off so that the
routed layer runs as torch operations whose shapes the counter sees. The counter counts 2 x the
multiply-adds of convolutions, linear layers and matrix products (mm, bmm, addmm, baddbmm,
einsum's products): the prediction vectors, every routing pass's weighted sums and agreements,
the decoder. Elementwise work (squash, softmax, ReLU, batch norm, the loss) is not counted: it
is small beside the products and does not run on the matrix units.

  inference image = forward FLOPs / 2
  training image  = 3 x forward (the backward computes, for every product, the gradient of each
                    of its two operands, each as large as the forward) less the backward-data of
                    the first convolution (the input images need no gradient), / 2

The peak is the best rate of a square matrix product (``PEAK_N``) of the run's precision, and of
fp32, measured in the same process just before the phases, by torch's ``@`` and by oneDNN.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from capsctl.models import conv as conv_mod, routing_kernel

PEAK_N = {"cpu": 2048, "cuda": 8192}
PEAK_REPS = 5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(device: torch.device, precision: str, n: int | None = None) -> float:
    """The best GFLOP/s of ``PEAK_REPS`` products of two n x n matrices of ``precision``, each
    timed both as ``a @ b`` and (on a CPU) as the same product run by oneDNN, a 1 x 1
    convolution of n channels over n positions: on some CPUs torch's fp32 ``@`` goes through a
    BLAS that is far from the cores' rate (on the AMD Zen 5 here: 206 GFLOP/s against oneDNN's
    340), and the convolutions capsctl runs are oneDNN's."""
    n = n or PEAK_N.get(device.type, 2048)  # a multiple of 32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(n, n, generator=g, device=device).to(DTYPES[precision])
    b = torch.rand(n, n, generator=g, device=device).to(DTYPES[precision])
    products = [lambda: a @ b]
    if device.type == "cpu":
        x, w = b.reshape(1, n, 32, n // 32), a.reshape(n, n, 1, 1)  # n positions, 32 rows
        products.append(lambda: torch.nn.functional.conv2d(x, w))
    best = float("inf")
    for product in products:
        product()
        for _ in range(PEAK_REPS):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            product()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def first_conv(model: nn.Module) -> nn.Module | None:
    """The first convolution the input meets (registration order), or None."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def count(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """FLOPs per image of ``model``: {"forward", "infer", "train", "modules": {name: forward
    FLOPs per image of each top-level child}}. ``x`` and ``labels`` are a batch of any size
    (the first 2 examples are used), on any device; the model's mode is kept."""
    from torch.utils.flop_counter import FlopCounterMode

    xb = x[:2].float()
    yb = None if labels is None else labels[:2]
    n = xb.shape[0]
    was_training = model.training
    counter = FlopCounterMode(display=False, depth=1)
    try:
        model.train()
        with routing_kernel.switched(False), conv_mod.forced("onednn"), torch.no_grad(), counter:
            model(xb, yb)
    finally:
        model.train(was_training)
    fwd = counter.get_total_flops() / n
    modules = {name.removeprefix("Global."): sum(ops.values()) / n
               for name, ops in counter.get_flop_counts().items()
               if name != "Global" and name.count(".") == 1}
    conv = first_conv(model)
    first = 0.0
    if conv is not None:
        b, _, h, w = xb.shape
        first = conv_mod.forward_flops(conv, (1, conv.in_channels, h, w))
    return {"forward": fwd, "infer": fwd, "train": 3 * fwd - first, "modules": modules}


def conv_bound(conv1: nn.Module, primary: nn.Module, x: torch.Tensor) -> float:
    """FLOPs per image of bench's conv-only bound: Conv1 and PrimaryCaps' convolution forward and
    backward (Conv1 without backward-data)."""
    forward_flops = conv_mod.forward_flops
    _, c, h, w = x.shape
    f1 = forward_flops(conv1, (1, c, h, w))
    side = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(
        (h, w), conv1.kernel_size, conv1.stride, conv1.padding, conv1.dilation)]
    f2 = forward_flops(primary, (1, conv1.out_channels, *side))
    return 2 * f1 + 3 * f2
