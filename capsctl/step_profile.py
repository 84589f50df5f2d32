"""``capsctl bench --profile``: where a training step's time goes.

Two views, both of the step ``capsctl bench`` times (``training.step.train_step``):

1. The step under ``torch.profiler`` (CPU activities; CUDA too on a GPU), its operators' self
   time summed into CATEGORIES by operator name (a plain dict: first matching prefix wins) and by
   the step's part (train_step labels forward, loss, backward and optimizer with
   ``record_function``; their totals are listed apart, not added to the categories). oneDNN
   computes a convolution's backward-data and backward-weight in one operator; the
   ``wgrad-gemm`` formulation labels its two halves (LABELS), and every operator run inside a
   label counts to the label's category.
2. Every convolution of the model on its own, at the step's shapes and precision, by the
   formulation it runs: forward, backward-data and backward-weight, each timed alone
   (``aten.convolution_backward`` with one output asked for), with its FLOPs and rate.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from capsctl.models import conv as conv_mod

# operator name (prefix) -> category; order matters: the first match wins
CATEGORIES = {
    "aten::mkldnn_convolution_backward": "convolution backward (data + weight)",
    "aten::convolution_backward": "convolution backward (data + weight)",
    "aten::cudnn_convolution_backward": "convolution backward (data + weight)",
    "aten::mkldnn_convolution": "convolution forward",
    "aten::cudnn_convolution": "convolution forward",
    "aten::_convolution": "convolution forward",
    "aten::convolution": "convolution forward",
    "capsctl::routed_layer_backward": "routed layer backward (C kernel)",
    "capsctl::routed_layer": "routed layer: predictions + routing (C kernel)",
    "aten::bmm": "matrix products (predictions, routing, attention)",
    "aten::baddbmm": "matrix products (predictions, routing, attention)",
    "aten::matmul": "matrix products (predictions, routing, attention)",
    "aten::addmm": "linear layers (decoder, classifier)",
    "aten::mm": "linear layers (decoder, classifier)",
    "aten::linear": "linear layers (decoder, classifier)",
    "aten::_fused_adam": "optimizer",
    "aten::_to_copy": "casts (dtype changes)",
    "aten::copy_": "copies and layout reorders",
    "aten::clone": "copies and layout reorders",
    "aten::contiguous": "copies and layout reorders",
    "aten::to_mkldnn": "copies and layout reorders",
    "aten::_to_dense": "copies and layout reorders",
}
# labelled regions: every operator inside counts to the region's category
LABELS = {conv_mod.PROFILE_DATA: "convolution backward-data",
          conv_mod.PROFILE_WEIGHT: "convolution backward-weight"}
OTHER = "elementwise and reductions (squash, softmax, ReLU, loss, ...)"
PARTS = ("capsctl forward", "capsctl loss", "capsctl backward", "capsctl optimizer")


def category(op: str) -> str:
    for prefix, name in CATEGORIES.items():
        if op.startswith(prefix):
            return name
    return OTHER


def step_profile(step: Callable[[], None], steps: int = 3) -> dict:
    """Profile ``steps`` calls of ``step`` (already warmed up): {"total_ms": per step,
    "categories": {category: ms per step}, "parts": {part: ms per step}} (CPU self time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     else [])
    prof = profile(activities=acts)
    with _quiet_stderr():  # the profiler library logs its start and stop on fd 2
        prof.start()
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            step()
    finally:
        wall = (time.perf_counter() - t0) / steps
        with _quiet_stderr():
            prof.stop()
    cats: dict[str, float] = {}
    parts: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key in PARTS or ev.key in LABELS:
            name = ev.key.removeprefix("capsctl ")
            parts[name] = parts.get(name, 0.0) + ev.cpu_time_total / 1e3 / steps
    for ev in prof.events():
        name = _labelled(ev) or category(ev.name)
        cats[name] = cats.get(name, 0.0) + ev.self_cpu_time_total / 1e3 / steps
    cats = {k: v for k, v in sorted(cats.items(), key=lambda kv: -kv[1]) if v > 0.005}
    return {"wall_ms": 1e3 * wall, "categories": cats, "parts": parts}


def _labelled(ev) -> str | None:
    """The category of the labelled region (wgrad-gemm's backward halves) ``ev`` runs in."""
    while ev is not None:
        if ev.name in LABELS:
            return LABELS[ev.name]
        ev = ev.cpu_parent
    return None


@contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the block (native libraries' own logging)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _best_ms(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def conv_table(model: nn.Module, x: torch.Tensor, precision: str) -> list[dict]:
    """Each ``Conv2d`` of ``model`` at the shapes a forward on ``x`` gives it: forward,
    backward-data and backward-weight ms alone (torch's convolution in the formulation's memory
    layout; wgrad-gemm's weight gradient by its own products), FLOPs of each and GFLOP/s."""
    shapes: dict[str, torch.Size] = {}

    def keep(name):
        def hook(_module, args):
            shapes.setdefault(name, args[0].shape)  # returns None: the call's input is kept
        return hook

    hooks = [m.register_forward_pre_hook(keep(name))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), conv_mod.forced("onednn"):
            model(x[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    rows = []
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mods = dict(model.named_modules())
    for i, (name, shape) in enumerate(shapes.items()):
        # the first convolution's input is the images: training never computes its gradient
        rows.append(_conv_row(name, mods[name], (x.shape[0], *shape[1:]), dtype, x.device,
                              with_data=i > 0))
    return rows


def _conv_row(name: str, conv: nn.Conv2d, shape, dtype, device, with_data: bool) -> dict:
    ran = conv_mod.choices(conv).get("", {}) if isinstance(conv, conv_mod.Conv2d) else {}
    how = ran.get("train", "onednn")
    fmt = torch.contiguous_format if how == "onednn" else torch.channels_last
    g = torch.Generator(device=device).manual_seed(0)
    xs = torch.rand(shape, generator=g, device=device).to(dtype).contiguous(memory_format=fmt)
    w = conv.weight.detach().to(dtype).contiguous(memory_format=fmt)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    y = torch.nn.functional.conv2d(xs, w, None, *args)
    gy = torch.rand(y.shape, generator=g, device=device).to(dtype).contiguous(memory_format=fmt)

    def back(mask):
        return lambda: torch.ops.aten.convolution_backward(
            gy, xs, w, None, list(conv.stride), list(conv.padding), list(conv.dilation), False,
            [0, 0], conv.groups, mask)

    flops = conv_mod.forward_flops(conv, shape)
    fwd = _best_ms(lambda: torch.nn.functional.conv2d(xs, w, None, *args))
    data = _best_ms(back([True, False, False])) if with_data else None
    if how == "wgrad-gemm":
        weight = _best_ms(lambda: conv_mod.weight_grad(gy, xs, conv.kernel_size, conv.stride,
                                                        conv.padding))
    else:
        weight = _best_ms(back([False, True, False]))
    return {"conv": name, "formulation": how, "input": list(shape), "gflop": flops / 1e9,
            "forward_ms": fwd, "backward_data_ms": data, "backward_weight_ms": weight,
            "forward_gflops": flops / fwd / 1e6,
            "backward_data_gflops": flops / data / 1e6 if data else None,
            "backward_weight_gflops": flops / weight / 1e6}
