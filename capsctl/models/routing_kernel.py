"""The CPU capsule-layer kernel (``routing_kernel.c``): compiled on first use, loaded with ctypes.

On a CPU, the routed capsule layer (predictions u_hat = W u and routing by agreement, forward
and backward) runs in this C kernel: per example, its predictions stay in the core's L2 cache
across all routing passes and every pass walks them once (agreement, softmax and weighted sum
fused), none of which torch's batched products can do. See docs/performance.md.

The source is compiled once per machine with the system's C compiler (``$CC``, else ``cc``;
``-O3 -march=native``, with OpenMP when the compiler has it: the kernel then runs on torch's own
OpenMP threads, ``torch.get_num_threads()`` of them) into a cache folder (``$CAPSCTL_CACHE``,
else ``$XDG_CACHE_HOME/capsctl`` or ``~/.cache/capsctl``, then the temp folder; the file name is
a hash of the source, the flags, the compiler and the CPU's feature flags; written atomically).
Where that fails (no compiler, not Linux or macOS, nowhere to write), or with
``CAPSCTL_ROUTING_KERNEL=0``, ``load()`` returns None and the layer uses its torch path, with
one warning that says why. Both paths compute the same function; the tests hold them to each
other and to a plain loop reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("routing_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c11", "-fPIC",
         "-shared"]
# OpenMP: the kernel then shares torch's thread pool (same runtime); without it, one thread
OPENMP = ["-fopenmp"]
ENV_SWITCH = "CAPSCTL_ROUTING_KERNEL"  # "0": always the torch path
VL = 16    # floats per vector in the kernel: the children axis is padded to a multiple
MAX_R = 64  # routing passes the kernel takes

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "why": the reason when None


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    if os.environ.get("CAPSCTL_CACHE"):
        return Path(os.environ["CAPSCTL_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capsctl" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compile(cc: str) -> Path:
    """Build (or find) the library: with OpenMP where the compiler has it, else without."""
    errors = []
    for flags in (FLAGS + OPENMP, FLAGS):
        try:
            return _build(cc, flags)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError(errors[-1])


def _build(cc: str, flags: list[str]) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), cc, *version,
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"capsctl-kernels-{os.getuid()}"):
        target = folder / f"routing_kernel-{key}{suffix}"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix)
            os.close(fd)
        except OSError:
            continue
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip()[:300]}")
            os.replace(tmp, target)  # atomic: another process may be compiling the same file
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("no writable folder for the compiled kernel")


def _bind(path: Path):
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.capsctl_layer_forward.argtypes = [p, p, i, i, i, i, i, i, p, i, p, p, p]
    lib.capsctl_layer_backward.argtypes = [p, p, i, i, i, i, i, i, i, p, p, p, p, p, p]
    lib.capsctl_layer_forward.restype = lib.capsctl_layer_backward.restype = i
    return lib


def load():
    """The loaded kernel library, or None: switched off, or it could not be built (then the
    torch path is used, with one warning that says why; the outcome is kept for the process)."""
    if not enabled():
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = None, None
            cc = os.environ.get("CC") or "cc"
            if os.name != "posix":
                _state["why"] = "only built on Linux and macOS"
            elif shutil.which(cc) is None:
                _state["why"] = f"no C compiler ({cc}) found"
            else:
                try:
                    _state["lib"] = _bind(_compile(cc))
                except Exception as e:  # any failure: fall back to the torch path
                    _state["why"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if _state["lib"] is None:
                warnings.warn(f"capsctl: CPU routing kernel unavailable ({_state['why']}); "
                              "using the slower torch routing", RuntimeWarning, stacklevel=2)
        return _state["lib"]


def status() -> str:
    """Which capsule layer a CPU runs, for reports: 'C kernel' or 'torch (why)'."""
    if not enabled():
        return f"torch ({ENV_SWITCH}=0)"
    return "C kernel" if load() is not None else f"torch ({_state['why']})"


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("capsule layer kernel: out of memory for its scratch buffers")


def _threads(B: int) -> int:
    return max(1, min(torch.get_num_threads(), B))


def forward(u_BVPL: torch.Tensor, W_VKPL: torch.Tensor, J: int, R: int,
            bias_K: torch.Tensor | None):
    """v (B, J, D), couplings c (R, B, J, I) and pre-squash sums s (R, B, J, D) of the layer,
    from u and W in the tiled layouts (contiguous fp32; I = V * VL children, K = J * D)."""
    lib = load()
    B, V, P, _ = u_BVPL.shape
    I, D = V * VL, W_VKPL.shape[1] // J
    v = u_BVPL.new_empty(B, J, D)
    c = u_BVPL.new_empty(R, B, J, I)
    s = u_BVPL.new_empty(R, B, J, D)
    _check(lib.capsctl_layer_forward(_ptr(u_BVPL), _ptr(W_VKPL), B, I, J, D, P, R, _ptr(bias_K),
                                     _threads(B), _ptr(v), _ptr(c), _ptr(s)))
    return v, c, s


def backward(u_BVPL: torch.Tensor, W_VKPL: torch.Tensor, J: int, R: int, c: torch.Tensor,
             s: torch.Tensor, g_v_BJD: torch.Tensor):
    """(dL/du (B, V, P, VL), dL/dW (V, K, P, VL), dL/ds (R, B, J, D)) from dL/dv: the gradients
    in the same tiled layouts as u and W."""
    lib = load()
    B, V, P, _ = u_BVPL.shape
    K = W_VKPL.shape[1]
    n = _threads(B)
    g_u = torch.empty_like(u_BVPL)
    g_Ws = W_VKPL.new_zeros(n, *W_VKPL.shape)  # one per thread, summed below
    g_s = s.new_empty(s.shape)
    g_v = g_v_BJD.contiguous()
    _check(lib.capsctl_layer_backward(_ptr(u_BVPL), _ptr(W_VKPL), B, V * VL, J, K // J, P, R, n,
                                      _ptr(c), _ptr(s), _ptr(g_v), _ptr(g_u), _ptr(g_Ws),
                                      _ptr(g_s)))
    return g_u, (g_Ws[0] if n == 1 else g_Ws.sum(0)), g_s
