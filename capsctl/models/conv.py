"""One convolution, several formulations on a CPU, the fastest chosen by measuring it.

capsctl's models build their convolutions as ``capsctl.models.conv.Conv2d``: an ``nn.Conv2d``
(same parameters, same state_dict, same initialisation) whose forward, on a CPU, runs one of
FORMULATIONS:

  onednn         torch's convolution on NCHW tensors (oneDNN): the path before this module,
                 always used for convolutions under MIN_FLOPS, with groups or with dilation
  channels-last  the same convolution on NHWC tensors (the input and the weight reordered)
  wgrad-gemm     training only: the NHWC forward and backward-data of oneDNN, and the weight
                 gradient as matrix products of the output gradient with an im2col view of the
                 input (chunks of CHUNK_BYTES, summed in fp32). oneDNN's bf16 backward-weight of
                 the PrimaryCaps convolution (9x9, stride 2) runs far below the matmul peak
                 (docs/performance.md)

``$CAPSCTL_CONV`` picks: ``auto`` (default) measures the candidates once per (CPU, torch,
threads, precision, shapes, training or inference) and keeps the winner in ``CACHE_FILE`` in
capsctl's cache folder, beside the compiled routing kernel, so every later run on the machine
uses it without measuring (like cuDNN's benchmark mode); a formulation's name forces it wherever
it applies. ``capsctl bench`` shows what each convolution of the model runs. On CUDA the torch
convolution runs (cuDNN chooses its own algorithm). A CPU without matrix units keeps its fastest
path: ``auto`` picks ``onednn`` where nothing measures faster.

The measurement draws its random tensors from a generator of its own (the global random state
is untouched, so a resumed run stays exact) and never touches the module's parameters.

Shape legend: B batch, C input channels, O output channels, H W input side, h w output side,
k l kernel side, M = B*h*w rows of the im2col matrix, F = k*l*C its columns.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from capsctl.device import cpu_name
from capsctl.paths import cache_root

FORMULATIONS = ("onednn", "channels-last", "wgrad-gemm")
ENV_SWITCH = "CAPSCTL_CONV"  # auto | onednn | channels-last | wgrad-gemm
CACHE_FILE = "conv-choice.json"  # in cache_root() / "kernels"
MIN_FLOPS = 50e6      # forward FLOPs of one call under which oneDNN is used without measuring
CHUNK_BYTES = 32 << 20  # im2col bytes per chunk of examples (wgrad-gemm)
PROFILE_DATA = "capsctl conv backward-data"  # profiler labels of wgrad-gemm's backward
PROFILE_WEIGHT = "capsctl conv backward-weight"

_lock = threading.Lock()
_choices: dict[str, str] = {}  # key -> formulation, this process (and the cache file's)
_loaded = [False]
_override: list[str] = []  # set by ``forced``


def mode() -> str:
    """The switch: ``forced``'s formulation, else $CAPSCTL_CONV (``auto`` when unset)."""
    if _override:
        return _override[-1]
    return os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"


@contextmanager
def forced(how: str):
    """Run every convolution in the block by ``how`` (where it applies), never measuring:
    for FLOP counting and profiling, where a measurement would be counted too."""
    _override.append(how)
    try:
        yield
    finally:
        _override.pop()


def check_mode() -> None:
    """Raise ValueError naming the valid values when $CAPSCTL_CONV is not one of them."""
    m = mode()
    if m != "auto" and m not in FORMULATIONS:
        raise ValueError(f"{ENV_SWITCH}={m!r}: expected auto or one of {', '.join(FORMULATIONS)}")


def forward_flops(conv: nn.Conv2d, x_shape) -> float:
    """2 x multiply-adds of one forward call of ``conv`` on an input of ``x_shape``."""
    B, _, H, W = x_shape
    k, l = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    h = (H + 2 * ph - dh * (k - 1) - 1) // sh + 1
    w = (W + 2 * pw - dw * (l - 1) - 1) // sw + 1
    return 2.0 * B * h * w * conv.out_channels * (conv.in_channels // conv.groups) * k * l


def candidates(conv: nn.Conv2d, train: bool) -> tuple[str, ...]:
    """The formulations that apply to ``conv`` (training adds wgrad-gemm for plain convolutions
    without groups, dilation or string padding)."""
    plain = (conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
             and not isinstance(conv.padding, str))
    if not plain:
        return ("onednn",)
    return FORMULATIONS if train else FORMULATIONS[:2]


# --- the formulations -----------------------------------------------------------------------

def weight_grad(g_BOhw: torch.Tensor, x_BCHW: torch.Tensor, kernel, stride, padding
                ) -> torch.Tensor:
    """dL/dW (O, C, k, l) in fp32 (fp64 for fp64 inputs) as sum over chunks of examples of
    g_MO^T @ cols_MF, the im2col matrix a strided view of the NHWC input copied one chunk at a
    time."""
    B, O, h, w = g_BOhw.shape
    C = x_BCHW.shape[1]
    (k, l), (sh, sw), (ph, pw) = kernel, stride, padding
    x_BHWC = x_BCHW.permute(0, 2, 3, 1)  # a view when x is channels_last
    if ph or pw:
        x_BHWC = F.pad(x_BHWC, (0, 0, pw, pw, ph, ph))
    x_BHWC = x_BHWC.contiguous()
    g_BhwO = g_BOhw.permute(0, 2, 3, 1).contiguous()
    sB, sH, sW, sC = x_BHWC.stride()
    per_example = h * w * k * l * C * x_BHWC.element_size()
    chunk = max(1, CHUNK_BYTES // max(per_example, 1))
    wide = torch.promote_types(x_BHWC.dtype, torch.float32)  # fp32 sums (fp64 stays fp64)
    g_OF = torch.zeros(O, k * l * C, dtype=wide, device=g_BOhw.device)
    for b0 in range(0, B, chunk):
        x_b = x_BHWC[b0:b0 + chunk]
        n = x_b.shape[0]
        cols_MF = x_b.as_strided((n, h, w, k, l, C), (sB, sh * sH, sw * sW, sH, sW, sC)
                                 ).reshape(n * h * w, k * l * C)
        g_MO = g_BhwO[b0:b0 + chunk].reshape(n * h * w, O)
        g_OF += (g_MO.t() @ cols_MF).to(wide)
    return g_OF.view(O, k, l, C).permute(0, 3, 1, 2).contiguous()


class _WgradGemm(torch.autograd.Function):
    """NHWC oneDNN forward and backward-data; the weight gradient by ``weight_grad``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dtype):
        x_c = x.to(dtype=dtype, memory_format=torch.channels_last)
        w_c = weight.to(dtype=dtype, memory_format=torch.channels_last)
        b_c = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x_c, w_c)
        ctx.meta = (stride, padding, x.dtype, weight.dtype, bias is not None)
        return F.conv2d(x_c, w_c, b_c, stride, padding)

    @staticmethod
    def backward(ctx, g_BOhw):
        x_c, w_c = ctx.saved_tensors
        stride, padding, x_dtype, w_dtype, has_bias = ctx.meta
        g = g_BOhw.to(dtype=w_c.dtype, memory_format=torch.channels_last)
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            with record_function(PROFILE_DATA):
                g_x = torch.ops.aten.convolution_backward(
                    g, x_c, w_c, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
                    [True, False, False])[0].to(x_dtype)
        if ctx.needs_input_grad[1]:
            with record_function(PROFILE_WEIGHT):
                g_w = weight_grad(g, x_c, w_c.shape[2:], stride, padding).to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            wide = torch.promote_types(g.dtype, torch.float32)
            g_b = g.to(wide).sum((0, 2, 3)).to(w_dtype)
        return g_x, g_w, g_b, None, None, None


def run(conv: nn.Conv2d, x: torch.Tensor, how: str) -> torch.Tensor:
    """``conv(x)`` by formulation ``how`` (under the caller's autocast)."""
    if how == "onednn":
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                        conv.groups)
    if how == "channels-last":
        cl = torch.channels_last
        return F.conv2d(x.contiguous(memory_format=cl), conv.weight.contiguous(memory_format=cl),
                        conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if how == "wgrad-gemm":
        return _WgradGemm.apply(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                _compute_dtype(x))
    raise ValueError(f"unknown convolution formulation {how!r}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# --- the choice -------------------------------------------------------------------------------

def key(conv: nn.Conv2d, x: torch.Tensor, train: bool) -> str:
    """What a measured choice depends on: machine, torch, threads, precision, shapes, phase."""
    return "|".join([cpu_name(), torch.__version__, f"t{torch.get_num_threads()}",
                     str(_compute_dtype(x)).replace("torch.", ""), "train" if train else "infer",
                     "x" + "x".join(map(str, x.shape)),
                     "w" + "x".join(map(str, conv.weight.shape)),
                     f"s{conv.stride[0]}.{conv.stride[1]}p{conv.padding[0]}.{conv.padding[1]}"
                     f"b{int(conv.bias is not None)}"])


def cache_path():
    return cache_root() / "kernels" / CACHE_FILE


def _read_cache() -> None:
    if _loaded[0]:
        return
    _loaded[0] = True
    try:
        with open(cache_path()) as f:
            stored = json.load(f)
        if isinstance(stored, dict):
            _choices.update({k: v for k, v in stored.items()
                             if isinstance(k, str) and v in FORMULATIONS})
    except (OSError, ValueError):
        pass


def _write_cache() -> None:
    """Merge this process's choices into the cache file (atomic replace; a lost race costs one
    more measurement later, nothing else)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {}
        try:
            with open(path) as f:
                old = json.load(f)
            merged = old if isinstance(old, dict) else {}
        except (OSError, ValueError):
            pass
        merged.update(_choices)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _probe(conv: nn.Conv2d, x: torch.Tensor, train: bool):
    """A copy of ``conv`` and a random input of ``x``'s shape (a generator of its own)."""
    g = torch.Generator(device=x.device).manual_seed(0)
    xs = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
    probe = torch.nn.utils.skip_init(  # no initialisation: it would draw from the global RNG
        nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
        conv.padding, conv.dilation, conv.groups, conv.bias is not None, device=x.device,
        dtype=conv.weight.dtype)
    with torch.no_grad():
        probe.weight.copy_(conv.weight)
        if conv.bias is not None:
            probe.bias.copy_(conv.bias)
    return probe, xs.requires_grad_(train and x.requires_grad)


def measure(conv: nn.Conv2d, x: torch.Tensor, options, train: bool, reps: int = 3
            ) -> dict[str, float]:
    """Best seconds of each formulation in ``options`` for ``conv`` on random data of ``x``'s
    shape and precision (forward, and backward when ``train``): one warm-up call each, then
    ``reps`` rounds in turn, so that a change of load on a shared machine hits all alike."""
    probe, xs = _probe(conv, x, train)
    best = {how: float("inf") for how in options}
    with torch.enable_grad() if train else torch.no_grad():
        for r in range(reps + 1):
            for how in options:
                t0 = time.perf_counter()
                y = run(probe, xs, how)
                if train:
                    y.float().sum().backward()
                if r:
                    best[how] = min(best[how], time.perf_counter() - t0)
    return best


def forget() -> None:
    """Drop every measured choice (this process's and the cache file's): the next call of each
    convolution measures again."""
    with _lock:
        _choices.clear()
        _loaded[0] = True
        try:
            cache_path().unlink()
        except OSError:
            pass


def choose(conv: nn.Conv2d, x: torch.Tensor, train: bool) -> str:
    """The formulation for ``conv`` on ``x`` (see the module's docstring)."""
    if x.device.type != "cpu":
        return "onednn"
    options = candidates(conv, train)
    m = mode()
    if m != "auto":
        return m if m in options else "onednn"
    if len(options) == 1 or forward_flops(conv, x.shape) < MIN_FLOPS:
        return "onednn"
    k = key(conv, x, train)
    with _lock:
        _read_cache()
        if k in _choices:
            return _choices[k]
    if torch.compiler.is_compiling():
        return "onednn"
    times = measure(conv, x, options, train)
    best = min(options, key=lambda how: times[how])
    with _lock:
        _choices[k] = best
        _write_cache()
    return best


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose CPU forward runs the formulation ``choose`` picks. ``last`` is the
    formulation of the latest call, ``ran`` that of the latest training and inference call
    ({"train": ..., "infer": ...}, for ``capsctl bench``)."""

    last: str = "onednn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        train = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        how = choose(self, x, train)
        if not torch.compiler.is_compiling():
            self.last = how
            self.__dict__.setdefault("ran", {})["train" if train else "infer"] = how
        if how == "onednn":
            return super().forward(x)
        return run(self, x, how)


def choices(model: nn.Module) -> dict[str, dict[str, str]]:
    """Module name -> {"train": formulation, "infer": formulation} of its latest calls, for
    every ``Conv2d`` of ``model`` (a phase it has not run is absent)."""
    return {name: dict(m.__dict__.get("ran", {})) for name, m in model.named_modules()
            if isinstance(m, Conv2d)}
