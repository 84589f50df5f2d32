"""Device choice, precision (autocast) and process set-up shared by every command.

torch is imported inside the functions that use it: the CLI calls tune_allocator() at start-up,
also for `--help` and `capsctl config`, which must not load torch."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import sys
from typing import TYPE_CHECKING

from capsctl.errors import CapsctlError

if TYPE_CHECKING:
    import torch


def resolve(name: str) -> torch.device:
    """The torch.device for ``name``: ``auto`` picks CUDA when present; asking for CUDA without
    it is an error, not a fallback."""
    import torch

    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise CapsctlError(f"--device {name}: CUDA is not available on this machine "
                               "(use --device cpu or --device auto)")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise CapsctlError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                               "device(s) present")
        return torch.device(name)
    raise CapsctlError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the matmuls and convolutions; a no-op for fp32."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_allocator() -> bool:
    """Keep freed large blocks in the process heap (glibc): no mmap/munmap churn per step.

    glibc hands every allocation above its mmap threshold back to the OS on free, so each
    training step faults tens of MB of fresh pages in again. Serving large blocks from the heap
    and never trimming it removes that system time. Returns True when applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module says; read
    once per process (every convolution's choice key holds it, on every call)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    """``device`` in words: the CUDA device's name, or the CPU with its thread count."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def compile_model(model, enabled: bool, warn):
    """``torch.compile(model)`` that falls back to the eager model, with one ``warn(message)``,
    when compiling fails - at wrapping time or at the first call (no C++ compiler, unsupported
    platform). Returns a callable with the model's forward signature."""
    if not enabled:
        return model
    import torch

    try:
        compiled = torch.compile(model)
    except Exception as e:  # compile unavailable on this platform / build
        warn(f"torch.compile unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
             "running without it")
        return model
    state = {"fn": compiled}

    def call(*args, **kwargs):
        if state["fn"] is model:
            return model(*args, **kwargs)
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # the backend failed to build the graph
            state["fn"] = model
            first = (str(e).splitlines() or [""])[0][:200]
            warn(f"torch.compile failed ({type(e).__name__}: {first}); running without it")
            return model(*args, **kwargs)

    return call


def use_channels_last(device: torch.device, precision: str) -> bool:
    """Whether to keep convolution weights and activations channels_last (NHWC).

    On CPUs (oneDNN) NCHW was faster for the CapsNet's two big convolutions in both fp32 and
    bf16 (capsctl bench, docs/performance.md); on CUDA, bf16 convolutions use tensor cores in
    NHWC, so channels_last is on there (not measured on a GPU yet)."""
    return device.type == "cuda" and precision == "bf16"
